"""Protobuf wire-format primitives of the hand-written fast paths in :mod:`~.codec`.

The codec serializes and parses :class:`LabelChunk` messages partly by hand, to copy the label
bytes as few times as Python allows; these are the few pieces of the protobuf wire format that
needs (varints, length-delimited fields, walking the top-level fields of a message).
"""

from __future__ import annotations


class ChecksumError(Exception):
    """A chunk's bytes do not match its checksum (the receiver retries)."""


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def length_delimited(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field (wire type 2)."""
    return varint(field_number << 3 | 2) + varint(length)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos]`` and the position after it; raises :class:`ChecksumError`."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ChecksumError("truncated or malformed chunk (varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Top-level fields of the message ``data[lo:hi]``: ``(number, start, value_start, end)``;
    for length-delimited fields ``value_start`` is where the value's bytes begin."""
    out = []
    pos = lo
    while pos < hi:
        start = pos
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = read_varint(data, pos)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            length, value = read_varint(data, pos)
            pos = value + length
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise ChecksumError(f"malformed chunk (wire type {wire})")
        if pos > hi:
            raise ChecksumError("truncated chunk")
        out.append((number, start, value, pos))
    return out
