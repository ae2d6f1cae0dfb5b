"""Soft labels on the wire: tensors to bytes and back, checksums and chunking.

A :class:`~stkd_dist.serving.proto_gen.teacher_pb2.LabelChunk` carries whole windows only. Its
size is kept under a maximum message size by giving each chunk at most
:func:`windows_per_chunk` windows; a window that alone does not fit is an error (raise the limit).

Checksum: CRC-32C (Castagnoli, via ``google_crc32c``, hardware accelerated) over the window
indices as int64 little-endian bytes, then the prediction bytes, then the spread bytes. It guards
against corruption between the teacher's output and the student (gRPC's TCP/TLS checksums do not
cover bugs or memory errors in the layers above them).

Servers send :func:`encode_chunk_bytes` and clients read :func:`decode_chunk_bytes`: both handle
the label bytes as few times as Python allows (the protobuf message API copies them on every
construction and access); :func:`encode_chunk` / :func:`decode_chunk` are the plain protobuf
equivalents.

All tensors are row-major, little-endian. Servers compute in float32; ``float16`` rounds to the
nearest half, ``bfloat16`` rounds to nearest even (done by torch) and keeps float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numpy as np
import torch

from stkd_dist.errors import InputError
from stkd_dist.serving.proto_gen import teacher_pb2 as pb

WIRE_DTYPES: dict[str, int] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
}
_ITEMSIZE = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}
# Room for everything in a chunk but the tensors and indices: tags, shapes, dtypes, cursor, total,
# crc and a teacher version string of up to a few hundred characters.
CHUNK_OVERHEAD_BYTES = 1024
# A window index costs at most 10 bytes as a packed varint.
INDEX_BYTES = 10
DEFAULT_MAX_MESSAGE_BYTES = 3 * 1024 * 1024


class ChecksumError(Exception):
    """A chunk's bytes do not match its checksum (the receiver retries)."""


def wire_dtype(name: str | int) -> int:
    """The protobuf enum value of a wire dtype given by name (``"float16"``) or enum value."""
    if isinstance(name, int):
        if name == pb.WIRE_DTYPE_UNSPECIFIED:
            return pb.FLOAT32
        if name not in _ITEMSIZE:
            raise InputError(f"unknown wire dtype value {name}", where="wire_dtype")
        return name
    key = name.strip().lower()
    if key not in WIRE_DTYPES:
        raise InputError(
            f"unknown wire dtype {name!r}; choose one of {', '.join(WIRE_DTYPES)}",
            where="wire_dtype",
        )
    return WIRE_DTYPES[key]


def dtype_name(value: int) -> str:
    """Name of a wire dtype enum value."""
    for name, v in WIRE_DTYPES.items():
        if v == wire_dtype(value):
            return name
    raise AssertionError(value)  # pragma: no cover - wire_dtype() validated it


def tensor_bytes(array: np.ndarray, dtype: str | int) -> bytes:
    """The raw little-endian bytes of ``array`` in wire dtype ``dtype``."""
    code = wire_dtype(dtype)
    a = np.ascontiguousarray(array, dtype=np.float32)
    if code == pb.FLOAT32:
        return a.astype("<f4", copy=False).tobytes()
    if code == pb.FLOAT16:
        with np.errstate(over="ignore"):  # beyond ±65504 becomes ±inf, as a half must
            return a.astype("<f2").tobytes()
    # bfloat16 = upper 16 bits of float32, rounded to nearest even by torch
    bits = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy()
    return bits.astype("<i2", copy=False).tobytes()


def encode_tensor(array: np.ndarray, dtype: str | int) -> pb.Tensor:
    """Encode a float array as a :class:`Tensor` of wire dtype ``dtype``."""
    code = wire_dtype(dtype)
    return pb.Tensor(shape=list(array.shape), dtype=code, data=tensor_bytes(array, code))


def decode_tensor(tensor: pb.Tensor, data: bytes | None = None) -> np.ndarray:
    """Decode a :class:`Tensor` to a float32 array (read-only when the wire dtype is float32).

    ``data``: the tensor's bytes when already taken out of the message (each access to
    ``tensor.data`` copies them).
    """
    code = wire_dtype(tensor.dtype)
    raw = tensor.data if data is None else data
    shape = tuple(int(s) for s in tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[code]
    if len(raw) != expected:
        raise ChecksumError(
            f"tensor of shape {list(shape)} and dtype {dtype_name(code)} needs {expected} bytes, "
            f"got {len(raw)}"
        )
    if code == pb.FLOAT32:
        return np.frombuffer(raw, dtype="<f4").reshape(shape)
    if code == pb.FLOAT16:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return bits.view(np.float32).reshape(shape)


def checksum(indices: np.ndarray, *parts: bytes) -> int:
    """CRC-32C of ``indices`` (as int64 little-endian) followed by ``parts``."""
    crc = google_crc32c.value(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    for part in parts:
        if part:
            crc = google_crc32c.extend(crc, part)
    return int(crc)


def window_payload_bytes(window_shape: tuple[int, ...], dtype: str | int, outputs: int) -> int:
    """Bytes of the tensors of one window: ``prod(window_shape) * itemsize * outputs``."""
    return int(np.prod(window_shape, dtype=np.int64)) * _ITEMSIZE[wire_dtype(dtype)] * outputs


def windows_per_chunk(
    window_shape: tuple[int, ...], dtype: str | int, outputs: int, max_message_bytes: int
) -> int:
    """How many whole windows fit in one chunk of at most ``max_message_bytes``.

    Raises :class:`InputError` when not even one window fits.
    """
    per_window = window_payload_bytes(window_shape, dtype, outputs) + INDEX_BYTES
    n = (max_message_bytes - CHUNK_OVERHEAD_BYTES) // per_window
    if n < 1:
        raise InputError(
            f"one window of labels takes {per_window} bytes, more than the message limit of "
            f"{max_message_bytes} bytes (less {CHUNK_OVERHEAD_BYTES} for headers); raise it",
            where="max_message_bytes",
        )
    return int(n)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def _length_delimited(field_number: int, length: int) -> bytes:
    """Tag and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(length)


@dataclass(frozen=True)
class EncodedChunk:
    """A serialized :class:`LabelChunk` ready for the wire, with what the server logs about it."""

    data: bytes
    windows: int
    payload_bytes: int
    cursor: int


def encode_chunk_bytes(
    indices: np.ndarray,
    prediction: np.ndarray,
    spread: np.ndarray | None,
    *,
    dtype: str | int,
    teacher_version: str,
    cursor: int,
    total: int,
) -> EncodedChunk:
    """Serialize the chunk of windows ``indices`` with labels ``[n, H, N, C]``.

    The bytes parse to the same message as :func:`encode_chunk` builds, made with two copies of
    the label bytes (the checksum needs a ``bytes`` object, then the message is joined) instead
    of four: the small fields are serialized by protobuf, and each tensor is appended as its
    length-delimited field (protobuf parsers merge concatenated fields).
    """
    n = len(indices)
    assert prediction.shape[0] == n, (prediction.shape, n)
    code = wire_dtype(dtype)
    tensors = [(2, prediction, tensor_bytes(prediction, code))]
    if spread is not None:
        assert spread.shape == prediction.shape, (spread.shape, prediction.shape)
        tensors.append((3, spread, tensor_bytes(spread, code)))
    head = pb.LabelChunk(
        window_indices=np.asarray(indices, dtype=np.int64).tolist(),
        teacher_version=teacher_version,
        cursor=cursor,
        total=total,
        crc32c=checksum(np.asarray(indices), *(data for _, _, data in tensors)),
    ).SerializeToString()
    parts = [head]
    for field_number, array, data in tensors:
        meta = pb.Tensor(shape=list(array.shape), dtype=code).SerializeToString()
        data_tag = _length_delimited(3, len(data))  # Tensor.data
        parts += [
            _length_delimited(field_number, len(meta) + len(data_tag) + len(data)),
            meta,
            data_tag,
            data,
        ]
    payload = sum(len(data) for _, _, data in tensors)
    return EncodedChunk(b"".join(parts), n, payload, cursor)


def encode_chunk(
    indices: np.ndarray,
    prediction: np.ndarray,
    spread: np.ndarray | None,
    *,
    dtype: str | int,
    teacher_version: str,
    cursor: int,
    total: int,
) -> pb.LabelChunk:
    """Build a chunk message for windows ``indices`` with their labels ``[n, H, N, C]``."""
    assert prediction.shape[0] == len(indices), (prediction.shape, len(indices))
    pred = encode_tensor(prediction, dtype)
    chunk = pb.LabelChunk(
        window_indices=np.asarray(indices, dtype=np.int64).tolist(),
        prediction=pred,
        teacher_version=teacher_version,
        cursor=cursor,
        total=total,
    )
    spread_bytes = b""
    if spread is not None:
        assert spread.shape == prediction.shape, (spread.shape, prediction.shape)
        chunk.spread.CopyFrom(encode_tensor(spread, dtype))
        spread_bytes = chunk.spread.data
    chunk.crc32c = checksum(np.asarray(indices), pred.data, spread_bytes)
    return chunk


@dataclass(frozen=True)
class DecodedChunk:
    """A verified chunk: window indices ``[n]``, labels ``[n, H, N, C]`` float32."""

    indices: np.ndarray
    prediction: np.ndarray
    spread: np.ndarray | None
    teacher_version: str
    cursor: int
    total: int
    payload_bytes: int = 0


def decode_chunk(chunk: pb.LabelChunk) -> DecodedChunk:
    """Verify a chunk's checksum and shapes and decode it; raises :class:`ChecksumError`."""
    indices = np.asarray(chunk.window_indices, dtype=np.int64)
    has_spread = chunk.HasField("spread")
    pred_bytes = chunk.prediction.data  # each access copies: take the bytes once
    spread_bytes = chunk.spread.data if has_spread else b""
    spread_meta = chunk.spread if has_spread else None
    return _verified(chunk, indices, chunk.prediction, pred_bytes, spread_meta, spread_bytes)


def _verified(
    chunk: pb.LabelChunk,
    indices: np.ndarray,
    pred_meta: pb.Tensor,
    pred_bytes: bytes,
    spread_meta: pb.Tensor | None,
    spread_bytes: bytes,
) -> DecodedChunk:
    """Check a chunk's checksum and shapes, then decode its tensors (both decoders end here)."""
    if checksum(indices, pred_bytes, spread_bytes) != chunk.crc32c:
        raise ChecksumError(
            f"checksum mismatch in the chunk ending at cursor {chunk.cursor} "
            f"({len(indices)} windows)"
        )
    prediction = decode_tensor(pred_meta, pred_bytes)
    spread = None if spread_meta is None else decode_tensor(spread_meta, spread_bytes)
    if prediction.shape[:1] != (len(indices),) or (
        spread is not None and spread.shape != prediction.shape
    ):
        raise ChecksumError(
            f"chunk shapes do not match its {len(indices)} windows: prediction "
            f"{list(prediction.shape)}, spread {None if spread is None else list(spread.shape)}"
        )
    return DecodedChunk(
        indices=indices,
        prediction=prediction,
        spread=spread,
        teacher_version=chunk.teacher_version,
        cursor=int(chunk.cursor),
        total=int(chunk.total),
        payload_bytes=len(pred_bytes) + len(spread_bytes),
    )


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
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


def _fields(data: bytes, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Top-level fields of the message ``data[lo:hi]``: ``(number, start, value_start, end)``;
    for length-delimited fields ``value_start`` is where the value's bytes begin."""
    out = []
    pos = lo
    while pos < hi:
        start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
            value = pos
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            length, value = _read_varint(data, pos)
            pos = value + length
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise ChecksumError(f"malformed chunk (wire type {wire})")
        if pos > hi:
            raise ChecksumError("truncated chunk")
        out.append((number, start, value, pos))
    return out


def _split_tensor(data: bytes, lo: int, hi: int) -> tuple[pb.Tensor, bytes]:
    meta, payload = [], None
    for number, start, value, end in _fields(data, lo, hi):
        if number == 3:
            if payload is not None:
                raise ChecksumError("malformed chunk (two data fields in a tensor)")
            payload = data[value:end]  # the one copy of the label bytes
        else:
            meta.append(data[start:end])
    return pb.Tensor.FromString(b"".join(meta)), payload if payload is not None else b""


def decode_chunk_bytes(data: bytes) -> DecodedChunk:
    """:func:`decode_chunk` of a serialized chunk, copying the label bytes once.

    Parsing the whole message with protobuf and then reading ``Tensor.data`` copies every label
    byte twice; here the small fields are parsed by protobuf and each tensor's bytes are sliced
    out of ``data`` directly. Raises :class:`ChecksumError` on a malformed or corrupted chunk.
    """
    head: list[bytes] = []
    tensors: dict[int, tuple[pb.Tensor, bytes]] = {}
    for number, start, value, end in _fields(data, 0, len(data)):
        if number in (2, 3):  # prediction, spread
            if number in tensors:
                raise ChecksumError("malformed chunk (a tensor field twice)")
            tensors[number] = _split_tensor(data, value, end)
        else:
            head.append(data[start:end])
    try:
        chunk = pb.LabelChunk.FromString(b"".join(head))
    except Exception as e:  # protobuf's DecodeError: bytes damaged in the small fields
        raise ChecksumError(f"malformed chunk ({e})") from e
    if 2 not in tensors:
        raise ChecksumError("malformed chunk (no prediction)")
    indices = np.asarray(chunk.window_indices, dtype=np.int64)
    pred_meta, pred_bytes = tensors[2]
    spread_meta, spread_bytes = tensors.get(3, (None, b""))
    return _verified(chunk, indices, pred_meta, pred_bytes, spread_meta, spread_bytes)
