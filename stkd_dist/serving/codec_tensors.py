"""The pieces of the wire codec below a chunk: wire dtypes, tensors, checksums, chunk sizes.

:mod:`~stkd_dist.serving.codec` builds and reads whole :class:`LabelChunk` messages from these
and re-exports every public name here (``codec.wire_dtype``, ``codec.checksum``, ...).

All tensors are row-major, little-endian. Servers compute in float32; ``float16`` rounds to the
nearest half, ``bfloat16`` rounds to nearest even (done by torch) and keeps float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import google_crc32c
import numpy as np
import torch

from stkd_dist.errors import InputError
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.wire import ChecksumError

__all__ = [
    "CHUNK_OVERHEAD_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INDEX_BYTES",
    "WIRE_DTYPES",
    "NodeSlice",
    "checksum",
    "decode_tensor",
    "dtype_name",
    "encode_tensor",
    "tensor_bytes",
    "window_payload_bytes",
    "windows_per_chunk",
    "wire_dtype",
]

WIRE_DTYPES: dict[str, pb.WireDtype] = {
    "float32": pb.FLOAT32,
    "float16": pb.FLOAT16,
    "bfloat16": pb.BFLOAT16,
}
_ITEMSIZE: dict[int, int] = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}
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


def wire_dtype(name: str | int) -> pb.WireDtype:
    """The protobuf enum value of a wire dtype given by name (``"float16"``) or enum value."""
    if isinstance(name, int):
        if name == pb.WIRE_DTYPE_UNSPECIFIED:
            return pb.FLOAT32
        if name not in _ITEMSIZE:
            raise InputError(f"unknown wire dtype value {name}", where="wire_dtype")
        return cast(pb.WireDtype, name)  # a protobuf enum value is its int
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


def window_payload_bytes(
    window_shape: tuple[int, ...], dtype: str | int, outputs: int, hidden_dim: int = 0
) -> int:
    """Bytes of the tensors of one window: ``prod(window_shape) * itemsize * outputs`` for the
    outputs shaped like the prediction, plus ``N * hidden_dim * itemsize`` for hidden states."""
    itemsize = _ITEMSIZE[wire_dtype(dtype)]
    labels = int(np.prod(window_shape, dtype=np.int64)) * itemsize * outputs
    return labels + int(window_shape[1]) * int(hidden_dim) * itemsize


def windows_per_chunk(
    window_shape: tuple[int, ...],
    dtype: str | int,
    outputs: int,
    max_message_bytes: int,
    hidden_dim: int = 0,
) -> int:
    """How many whole windows fit in one chunk of at most ``max_message_bytes``.

    ``outputs``: tensors shaped like the prediction (1, or 2 with spread); ``hidden_dim``: F of
    the hidden states the chunks carry (0: none).

    Raises :class:`InputError` when not even one window fits (then
    :func:`~stkd_dist.serving.codec_slices.chunk_layout` splits windows along the node axis).
    """
    per_window = window_payload_bytes(window_shape, dtype, outputs, hidden_dim) + INDEX_BYTES
    n = (max_message_bytes - CHUNK_OVERHEAD_BYTES) // per_window
    if n < 1:
        raise InputError(
            f"one window of labels takes {per_window} bytes, more than the message limit of "
            f"{max_message_bytes} bytes (less {CHUNK_OVERHEAD_BYTES} for headers); raise it",
            where="max_message_bytes",
        )
    return int(n)
