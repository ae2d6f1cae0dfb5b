"""Soft labels on the wire: tensors to bytes and back, checksums and chunking.

A :class:`~stkd_dist.serving.proto_gen.teacher_pb2.LabelChunk` carries whole windows, at most
:func:`windows_per_chunk` of them so that it stays under the maximum message size. A window that
alone does not fit travels as *node slices*, one chunk each with a :class:`NodeSlice` (see
:mod:`~stkd_dist.serving.codec_slices`, which splits windows and reassembles them).

A chunk's tensors are the outputs a request asked for (a
:class:`~stkd_dist.serving.label_arrays.LabelArrays`): ``prediction`` ``[n, H, N, C]`` (field 2),
``spread`` shaped like it (field 3) and ``hidden`` ``[n, N, F]`` (field 11, the teacher's hidden
representation); a chunk without spread or hidden is byte for byte what it was before they
existed.

Checksum: CRC-32C (Castagnoli, via ``google_crc32c``, hardware accelerated) over the window
indices as int64 little-endian bytes, then (node slices only) ``node_start, node_stop,
node_count`` as int64 little-endian bytes, then the prediction bytes, then the spread bytes, then
the hidden bytes. It guards against corruption between the teacher's output and the student
(gRPC's TCP/TLS checksums do not cover bugs or memory errors in the layers above them).

Servers send :func:`encode_chunk_bytes` and clients read :func:`decode_chunk_bytes`: both handle
the label bytes as few times as Python allows (the protobuf message API copies them on every
construction and access); :func:`encode_chunk` / :func:`decode_chunk` are the plain protobuf
equivalents.

All tensors are row-major, little-endian. Servers compute in float32; ``float16`` rounds to the
nearest half, ``bfloat16`` rounds to nearest even (done by torch) and keeps float32's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stkd_dist.serving.codec_tensors import (
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    INDEX_BYTES,
    WIRE_DTYPES,
    NodeSlice,
    checksum,
    decode_tensor,
    dtype_name,
    encode_tensor,
    tensor_bytes,
    window_payload_bytes,
    windows_per_chunk,
    wire_dtype,
)
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.wire import ChecksumError, fields, length_delimited

# the tensor-level pieces of codec_tensors are re-exported: codec.wire_dtype, codec.checksum, ...
__all__ = [
    "CHUNK_OVERHEAD_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INDEX_BYTES",
    "TENSOR_FIELDS",
    "WIRE_DTYPES",
    "ChecksumError",
    "DecodedChunk",
    "EncodedChunk",
    "NodeSlice",
    "checksum",
    "decode_chunk",
    "decode_chunk_bytes",
    "decode_tensor",
    "dtype_name",
    "encode_chunk",
    "encode_chunk_bytes",
    "encode_tensor",
    "tensor_bytes",
    "window_payload_bytes",
    "windows_per_chunk",
    "wire_dtype",
]

#: the LabelChunk field number of each output's Tensor
TENSOR_FIELDS = {"prediction": 2, "spread": 3, "hidden": 11}
_FIELD_OUTPUTS = {number: name for name, number in TENSOR_FIELDS.items()}


@dataclass(frozen=True)
class EncodedChunk:
    """A serialized :class:`LabelChunk` ready for the wire, with what the server logs about it."""

    data: bytes
    windows: int
    payload_bytes: int
    cursor: int


def _check_shapes(indices: np.ndarray, labels: NumpyLabels, nodes: NodeSlice | None) -> None:
    """Assert that ``labels`` are the labels of ``indices`` (and of the node slice ``nodes``)."""
    n, pred = len(indices), labels.prediction
    assert pred.shape[0] == n, (pred.shape, n)
    assert nodes is None or (n, pred.shape[2]) == (1, nodes.stop - nodes.start), nodes
    if labels.spread is not None:
        assert labels.spread.shape == pred.shape, (labels.spread.shape, pred.shape)
    if labels.hidden is not None:
        # [n, N, F]: the same windows and nodes as the prediction
        assert labels.hidden.ndim == 3, labels.hidden.shape
        assert labels.hidden.shape[:2] == (n, pred.shape[2]), (labels.hidden.shape, pred.shape)


def encode_chunk_bytes(
    indices: np.ndarray,
    labels: NumpyLabels,
    *,
    dtype: str | int,
    teacher_version: str,
    cursor: int,
    total: int,
    nodes: NodeSlice | None = None,
) -> EncodedChunk:
    """Serialize the chunk of windows ``indices`` with ``labels`` (every output present).

    The bytes parse to the same message as :func:`encode_chunk` builds, made with two copies of
    the label bytes (the checksum needs a ``bytes`` object, then the message is joined) instead
    of four: the small fields are serialized by protobuf, and each tensor is appended as its
    length-delimited field (protobuf parsers merge concatenated fields).

    ``nodes``: the node range of a node-slice chunk, whose labels (one window) are then
    ``[1, H, nodes.stop - nodes.start, C]`` (hidden ``[1, nodes.stop - nodes.start, F]``; strided
    views are fine); None for whole windows.
    """
    n = len(indices)
    _check_shapes(indices, labels, nodes)
    code = wire_dtype(dtype)
    # in OUTPUT_NAMES order: the order the checksum covers them in
    tensors = [
        (TENSOR_FIELDS[name], array, tensor_bytes(array, code))
        for name, array in labels.named().items()
    ]
    start, stop, count = _node_range(nodes)
    head = pb.LabelChunk(
        window_indices=np.asarray(indices, dtype=np.int64).tolist(),
        teacher_version=teacher_version,
        cursor=cursor,
        total=total,
        crc32c=checksum(np.asarray(indices), *(data for _, _, data in tensors), nodes=nodes),
        node_start=start,
        node_stop=stop,
        node_count=count,
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


def _node_range(nodes: NodeSlice | None) -> tuple[int, int, int]:
    if nodes is None:
        # whole windows: zeros, which proto3 does not serialize (the message is as before slicing)
        return 0, 0, 0
    return nodes.start, nodes.stop, nodes.count


def encode_chunk(
    indices: np.ndarray,
    labels: NumpyLabels,
    *,
    dtype: str | int,
    teacher_version: str,
    cursor: int,
    total: int,
    nodes: NodeSlice | None = None,
) -> pb.LabelChunk:
    """Build a chunk message for windows ``indices`` with their ``labels`` (``nodes``: see
    :func:`encode_chunk_bytes`)."""
    _check_shapes(indices, labels, nodes)
    start, stop, count = _node_range(nodes)
    chunk = pb.LabelChunk(
        window_indices=np.asarray(indices, dtype=np.int64).tolist(),
        teacher_version=teacher_version,
        cursor=cursor,
        total=total,
        node_start=start,
        node_stop=stop,
        node_count=count,
    )
    data: list[bytes] = []
    for name, array in labels.named().items():
        field = getattr(chunk, name)
        field.CopyFrom(encode_tensor(array, dtype))
        data.append(field.data)
    chunk.crc32c = checksum(np.asarray(indices), *data, nodes=nodes)
    return chunk


@dataclass(frozen=True)
class DecodedChunk:
    """A verified chunk: window indices ``[n]``, labels ``[n, H, N, C]`` float32 (hidden
    ``[n, N, F]``); a node slice (``nodes`` set) has one window and labels
    ``[1, H, nodes.stop - nodes.start, C]`` (hidden ``[1, nodes.stop - nodes.start, F]``)."""

    indices: np.ndarray
    prediction: np.ndarray
    spread: np.ndarray | None
    teacher_version: str
    cursor: int
    total: int
    payload_bytes: int = 0
    nodes: NodeSlice | None = None
    hidden: np.ndarray | None = None

    @property
    def labels(self) -> NumpyLabels:
        """The chunk's outputs as one record."""
        return LabelArrays(self.prediction, self.spread, self.hidden)


# an output's tensor as it came off the wire: its metadata and its bytes
_Wire = dict[str, tuple[pb.Tensor, bytes]]


def decode_chunk(chunk: pb.LabelChunk) -> DecodedChunk:
    """Verify a chunk's checksum and shapes and decode it; raises :class:`ChecksumError`."""
    indices = np.asarray(chunk.window_indices, dtype=np.int64)
    # each access to Tensor.data copies: take the bytes once
    tensors: _Wire = {"prediction": (chunk.prediction, chunk.prediction.data)}
    for name in ("spread", "hidden"):
        if chunk.HasField(name):
            tensor = getattr(chunk, name)
            tensors[name] = (tensor, tensor.data)
    return _verified(chunk, indices, tensors)


def _verified(chunk: pb.LabelChunk, indices: np.ndarray, tensors: _Wire) -> DecodedChunk:
    """Check a chunk's checksum and shapes, then decode its tensors (both decoders end here)."""
    nodes = None
    if chunk.node_start or chunk.node_stop or chunk.node_count:  # a node slice
        nodes = NodeSlice(int(chunk.node_start), int(chunk.node_stop), int(chunk.node_count))
    # in OUTPUT_NAMES order, as the sender checksummed them; absent outputs add nothing
    data = [tensors[name][1] if name in tensors else b"" for name in TENSOR_FIELDS]
    if checksum(indices, *data, nodes=nodes) != chunk.crc32c:
        raise ChecksumError(
            f"checksum mismatch in the chunk ending at cursor {chunk.cursor} "
            f"({len(indices)} windows{'' if nodes is None else f', nodes {nodes}'})"
        )
    arrays = {name: decode_tensor(meta, raw) for name, (meta, raw) in tensors.items()}
    prediction, spread, hidden = arrays["prediction"], arrays.get("spread"), arrays.get("hidden")
    if (
        prediction.shape[:1] != (len(indices),)
        or (spread is not None and spread.shape != prediction.shape)
        or (hidden is not None and not _is_hidden_shape(hidden.shape, prediction.shape))
        or (nodes is not None and not _is_slice_shape(prediction.shape, nodes))
    ):
        raise ChecksumError(
            f"chunk shapes do not match its {len(indices)} windows ({nodes}): prediction "
            f"{list(prediction.shape)}, spread {None if spread is None else list(spread.shape)}, "
            f"hidden {None if hidden is None else list(hidden.shape)}"
        )
    return DecodedChunk(
        indices=indices,
        prediction=prediction,
        spread=spread,
        teacher_version=chunk.teacher_version,
        cursor=int(chunk.cursor),
        total=int(chunk.total),
        payload_bytes=sum(len(raw) for raw in data),
        nodes=nodes,
        hidden=hidden,
    )


def _is_hidden_shape(hidden: tuple[int, ...], prediction: tuple[int, ...]) -> bool:
    """Whether hidden states of shape ``hidden`` ``[n, N, F]`` go with labels ``[n, H, N, C]``."""
    return (
        len(hidden) == 3 and len(prediction) == 4 and hidden[:2] == (prediction[0], prediction[2])
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
    tensors: _Wire = {}
    for number, start, value, end in fields(data, 0, len(data)):
        name = _FIELD_OUTPUTS.get(number)
        if name is not None:  # prediction, spread, hidden
            if name in tensors:
                raise ChecksumError("malformed chunk (a tensor field twice)")
            tensors[name] = _split_tensor(data, value, end)
        else:
            head.append(data[start:end])
    try:
        chunk = pb.LabelChunk.FromString(b"".join(head))
    except Exception as e:  # protobuf's DecodeError: bytes damaged in the small fields
        raise ChecksumError(f"malformed chunk ({e})") from e
    if "prediction" not in tensors:
        raise ChecksumError("malformed chunk (no prediction)")
    indices = np.asarray(chunk.window_indices, dtype=np.int64)
    return _verified(chunk, indices, tensors)
