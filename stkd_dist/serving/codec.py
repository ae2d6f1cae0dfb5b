"""Soft labels on the wire: tensors to bytes and back, checksums and chunking.

A :class:`~stkd_dist.serving.proto_gen.teacher_pb2.LabelChunk` carries whole windows, at most
:func:`windows_per_chunk` of them so that it stays under the maximum message size. A window that
alone does not fit travels as *node slices*, one chunk each with a :class:`NodeSlice` (see
:mod:`~stkd_dist.serving.codec_slices`, which splits windows and reassembles them).

Checksum: CRC-32C (Castagnoli, via ``google_crc32c``, hardware accelerated) over the window
indices as int64 little-endian bytes, then (node slices only) ``node_start, node_stop,
node_count`` as int64 little-endian bytes, then the prediction bytes, then the spread bytes. It
guards against corruption between the teacher's output and the student (gRPC's TCP/TLS checksums
do not cover bugs or memory errors in the layers above them).

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
from stkd_dist.serving.wire import (
    ChecksumError as ChecksumError,  # re-exported: codec.ChecksumError
)
from stkd_dist.serving.wire import fields, length_delimited

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


@dataclass(frozen=True)
class NodeSlice:
    """Nodes ``[start, stop)`` of a window of ``count`` nodes: the part a node-slice chunk holds."""

    start: int
    stop: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.count:
            raise ChecksumError(f"malformed node slice [{self.start}, {self.stop}) of {self.count}")

    @property
    def last(self) -> bool:
        """Whether this slice completes its window."""
        return self.stop == self.count

    def as_bytes(self) -> bytes:
        """The range as the checksum covers it: three int64 little-endian values."""
        return np.array([self.start, self.stop, self.count], dtype="<i8").tobytes()


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
    # no copy of a contiguous float32 array; a node slice (a strided view) is gathered in
    # row-major order by tobytes(), in the one copy it makes anyway
    a = np.asarray(array, dtype=np.float32)
    if code == pb.FLOAT32:
        return a.astype("<f4", copy=False).tobytes()
    if code == pb.FLOAT16:
        with np.errstate(over="ignore"):  # beyond ±65504 becomes ±inf, as a half must
            return a.astype("<f2").tobytes()
    # bfloat16 = upper 16 bits of float32, rounded to nearest even by torch
    bits = torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).view(torch.int16).numpy()
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


def checksum(indices: np.ndarray, *parts: bytes, nodes: NodeSlice | None = None) -> int:
    """CRC-32C of ``indices`` (as int64 little-endian), the node range of a node slice (``nodes``,
    see :meth:`NodeSlice.as_bytes`), then ``parts``."""
    crc = google_crc32c.value(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    if nodes is not None:
        crc = google_crc32c.extend(crc, nodes.as_bytes())
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

    Raises :class:`InputError` when not even one window fits (then
    :func:`~stkd_dist.serving.codec_slices.chunk_layout` splits windows along the node axis).
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
    nodes: NodeSlice | None = None,
) -> EncodedChunk:
    """Serialize the chunk of windows ``indices`` with labels ``[n, H, N, C]``.

    The bytes parse to the same message as :func:`encode_chunk` builds, made with two copies of
    the label bytes (the checksum needs a ``bytes`` object, then the message is joined) instead
    of four: the small fields are serialized by protobuf, and each tensor is appended as its
    length-delimited field (protobuf parsers merge concatenated fields).

    ``nodes``: the node range of a node-slice chunk, whose labels (one window) are then
    ``[1, H, nodes.stop - nodes.start, C]`` (a strided view is fine); None for whole windows.
    """
    n = len(indices)
    assert prediction.shape[0] == n, (prediction.shape, n)
    assert nodes is None or (n, prediction.shape[2]) == (1, nodes.stop - nodes.start), nodes
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
        crc32c=checksum(np.asarray(indices), *(data for _, _, data in tensors), nodes=nodes),
        **_node_fields(nodes),
    ).SerializeToString()
    parts = [head]
    for field_number, array, data in tensors:
        meta = pb.Tensor(shape=list(array.shape), dtype=code).SerializeToString()
        data_tag = length_delimited(3, len(data))  # Tensor.data
        parts += [
            length_delimited(field_number, len(meta) + len(data_tag) + len(data)),
            meta,
            data_tag,
            data,
        ]
    payload = sum(len(data) for _, _, data in tensors)
    # a node slice delivers its window with the last slice only
    windows = n if nodes is None else int(nodes.last)
    return EncodedChunk(b"".join(parts), windows, payload, cursor)


def _node_fields(nodes: NodeSlice | None) -> dict[str, int]:
    if nodes is None:
        return {}  # whole windows: the fields stay unset, the message is as before slicing
    return {"node_start": nodes.start, "node_stop": nodes.stop, "node_count": nodes.count}


def encode_chunk(
    indices: np.ndarray,
    prediction: np.ndarray,
    spread: np.ndarray | None,
    *,
    dtype: str | int,
    teacher_version: str,
    cursor: int,
    total: int,
    nodes: NodeSlice | None = None,
) -> pb.LabelChunk:
    """Build a chunk message for windows ``indices`` with their labels ``[n, H, N, C]``
    (``nodes``: see :func:`encode_chunk_bytes`)."""
    assert prediction.shape[0] == len(indices), (prediction.shape, len(indices))
    pred = encode_tensor(prediction, dtype)
    chunk = pb.LabelChunk(
        window_indices=np.asarray(indices, dtype=np.int64).tolist(),
        prediction=pred,
        teacher_version=teacher_version,
        cursor=cursor,
        total=total,
        **_node_fields(nodes),
    )
    spread_bytes = b""
    if spread is not None:
        assert spread.shape == prediction.shape, (spread.shape, prediction.shape)
        chunk.spread.CopyFrom(encode_tensor(spread, dtype))
        spread_bytes = chunk.spread.data
    chunk.crc32c = checksum(np.asarray(indices), pred.data, spread_bytes, nodes=nodes)
    return chunk


@dataclass(frozen=True)
class DecodedChunk:
    """A verified chunk: window indices ``[n]``, labels ``[n, H, N, C]`` float32; a node slice
    (``nodes`` set) has one window and labels ``[1, H, nodes.stop - nodes.start, C]``."""

    indices: np.ndarray
    prediction: np.ndarray
    spread: np.ndarray | None
    teacher_version: str
    cursor: int
    total: int
    payload_bytes: int = 0
    nodes: NodeSlice | None = None


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
    nodes = None
    if chunk.node_start or chunk.node_stop or chunk.node_count:  # a node slice
        nodes = NodeSlice(int(chunk.node_start), int(chunk.node_stop), int(chunk.node_count))
    if checksum(indices, pred_bytes, spread_bytes, nodes=nodes) != chunk.crc32c:
        raise ChecksumError(
            f"checksum mismatch in the chunk ending at cursor {chunk.cursor} "
            f"({len(indices)} windows{'' if nodes is None else f', nodes {nodes}'})"
        )
    prediction = decode_tensor(pred_meta, pred_bytes)
    spread = None if spread_meta is None else decode_tensor(spread_meta, spread_bytes)
    if (
        prediction.shape[:1] != (len(indices),)
        or (spread is not None and spread.shape != prediction.shape)
        or (nodes is not None and not _is_slice_shape(prediction.shape, nodes))
    ):
        raise ChecksumError(
            f"chunk shapes do not match its {len(indices)} windows ({nodes}): prediction "
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
        nodes=nodes,
    )


def _is_slice_shape(shape: tuple[int, ...], nodes: NodeSlice) -> bool:
    """Whether labels of ``shape`` are one window's ``[1, H, n, C]`` with n the slice's nodes."""
    return len(shape) == 4 and shape[0] == 1 and shape[2] == nodes.stop - nodes.start


def _split_tensor(data: bytes, lo: int, hi: int) -> tuple[pb.Tensor, bytes]:
    meta, payload = [], None
    for number, start, value, end in fields(data, lo, hi):
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
    for number, start, value, end in fields(data, 0, len(data)):
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
