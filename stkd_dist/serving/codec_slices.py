"""Windows larger than one message: split along the node axis, reassembled by the client.

When at least one whole window fits the message limit, chunks carry whole windows, as many as
fit (:func:`~stkd_dist.serving.codec.windows_per_chunk`). Otherwise (a large graph, or a client
asking for small messages) every window is sent as *node slices*: consecutive chunks of one
window index each, with the labels ``[1, H, n, C]`` (and hidden states ``[1, n, F]``: their node
axis is 1) of nodes ``node_start .. node_stop - 1``, in node order from 0 to ``node_count`` (see
:func:`chunk_layout`). Each slice carries its own CRC-32C,
which covers its node range too.

Cursor rule: the cursor of every slice but the last is the window's own sequence position (a
stream resumed there sends the whole window again, from node 0); only the last slice's cursor
moves past the window. A client keeps the slices of one window at a time
(:class:`WindowAssembler`), hands the window on when its last slice has arrived, and drops the
partial window when the stream breaks before that, so every window is still delivered exactly
once.

The lower bound: one node's labels of one window (``[H, 1, C]`` per output, plus ``[1, F]`` of
hidden states) must fit in a message with its headers (:func:`min_message_bytes`); a smaller
limit is an :class:`InputError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stkd_dist.errors import InputError
from stkd_dist.serving import codec
from stkd_dist.serving.codec import ChecksumError, DecodedChunk, EncodedChunk, NodeSlice
from stkd_dist.serving.label_arrays import NODE_AXIS, NumpyLabels, node_slice, take_rows

# node_start, node_stop and node_count: a one-byte tag and a varint of at most 10 bytes each
SLICE_FIELD_BYTES = 3 * 11


@dataclass(frozen=True)
class ChunkLayout:
    """How the windows of a request are cut into messages.

    Attributes:
        windows: windows per chunk (1 when windows are split into node slices).
        nodes: nodes per slice; 0 = whole windows.
    """

    windows: int
    nodes: int = 0

    @property
    def split(self) -> bool:
        """Whether windows travel as node slices."""
        return self.nodes > 0


def node_row_bytes(
    window_shape: tuple[int, ...], dtype: str | int, outputs: int, hidden_dim: int = 0
) -> int:
    """Bytes of one node's labels of one window, ``[H, 1, C]`` per output (and ``[1, F]`` of
    hidden states with ``hidden_dim`` F), in wire ``dtype``."""
    horizon, _, channels = window_shape
    return codec.window_payload_bytes((horizon, 1, channels), dtype, outputs, hidden_dim)


def min_message_bytes(
    window_shape: tuple[int, ...], dtype: str | int, outputs: int, hidden_dim: int = 0
) -> int:
    """The smallest message limit labels of ``window_shape`` ``[H, N, C]`` can be sent under:
    one node's labels of one window with the chunk's headers."""
    return (
        codec.CHUNK_OVERHEAD_BYTES
        + codec.INDEX_BYTES
        + SLICE_FIELD_BYTES
        + node_row_bytes(window_shape, dtype, outputs, hidden_dim)
    )


def chunk_layout(
    window_shape: tuple[int, ...],
    dtype: str | int,
    outputs: int,
    max_message_bytes: int,
    hidden_dim: int = 0,
) -> ChunkLayout:
    """Whole windows per chunk when at least one fits ``max_message_bytes``, else node slices.

    Args:
        window_shape: ``(H, N, C)`` labels of one window.
        dtype: wire dtype.
        outputs: tensors per window shaped like the prediction (1, or 2 with spread).
        max_message_bytes: the message limit (the server's, or the request's when lower).
        hidden_dim: F of the hidden states ``[N, F]`` each window also carries (0: none).

    Raises:
        InputError: not even one node's labels of one window fit (``where="max_message_bytes"``).
    """
    per_window = (
        codec.window_payload_bytes(window_shape, dtype, outputs, hidden_dim) + codec.INDEX_BYTES
    )
    if max_message_bytes - codec.CHUNK_OVERHEAD_BYTES >= per_window:
        # unchanged from before node slices: as many whole windows as fit
        return ChunkLayout(
            codec.windows_per_chunk(window_shape, dtype, outputs, max_message_bytes, hidden_dim)
        )
    minimum = min_message_bytes(window_shape, dtype, outputs, hidden_dim)
    row = node_row_bytes(window_shape, dtype, outputs, hidden_dim)
    if max_message_bytes < minimum:
        horizon, _, channels = window_shape
        hidden = f" and [1, {hidden_dim}] of hidden states" if hidden_dim else ""
        raise InputError(
            f"a message limit of {max_message_bytes} bytes cannot hold even one node's labels "
            f"of one window ([{horizon}, 1, {channels}] x {outputs} output(s){hidden} in "
            f"{codec.dtype_name(codec.wire_dtype(dtype))}: {row} bytes, plus "
            f"{minimum - row} for headers); the minimum is {minimum} bytes",
            where="max_message_bytes",
        )
    budget = max_message_bytes - codec.CHUNK_OVERHEAD_BYTES - codec.INDEX_BYTES - SLICE_FIELD_BYTES
    # fewer than N: a whole window did not fit, and the slice fields only take room away
    return ChunkLayout(1, budget // row)


def node_slices(count: int, per_slice: int) -> list[NodeSlice]:
    """The slices of a window of ``count`` nodes, ``per_slice`` nodes each (the last may be
    smaller), in node order."""
    assert count >= 1 and per_slice >= 1, (count, per_slice)
    return [NodeSlice(a, min(a + per_slice, count), count) for a in range(0, count, per_slice)]


def encode_node_slices(
    indices: np.ndarray,
    labels: NumpyLabels,
    *,
    nodes_per_slice: int,
    position: int,
    dtype: str | int,
    teacher_version: str,
    total: int,
) -> Iterator[EncodedChunk]:
    """The node-slice messages of windows ``indices`` (``labels`` ``[n, H, N, C]``, hidden
    ``[n, N, F]``), window after window, each encoded only when asked for (one slice's bytes at a
    time, not a window's).

    Args:
        indices: ``[n]`` window indices, at sequence positions ``position .. position + n - 1``.
        nodes_per_slice: nodes per message (:attr:`ChunkLayout.nodes`).
        position: sequence position of ``indices[0]``.

    The cursor of a slice is its window's position, except for the window's last slice: the
    position after the window (see the module docstring).
    """
    count = labels.prediction.shape[2]
    slices = node_slices(count, nodes_per_slice)
    for i in range(len(indices)):
        window = take_rows(labels, slice(i, i + 1))
        for s in slices:
            # [1, H, s.stop - s.start, C] (hidden [1, s.stop - s.start, F]) views: tensor_bytes
            # gathers them in its one copy
            yield codec.encode_chunk_bytes(
                indices[i : i + 1],
                node_slice(window, s.start, s.stop),
                dtype=dtype,
                teacher_version=teacher_version,
                cursor=position + i + 1 if s.last else position + i,
                total=total,
                nodes=s,
            )


class WindowAssembler:
    """Reassembles node slices into whole windows, one window at a time (the client's side).

    :meth:`add` takes every verified chunk of a stream in order: a chunk of whole windows passes
    through; the slices of a split window are copied into one window's buffers
    (``[1, H, N, C]``, hidden ``[1, N, F]``) and the window is returned with its last slice. Use one assembler per
    call: a broken stream drops its partial window with it.
    """

    def __init__(self) -> None:
        self._index: int | None = None  # the window being assembled
        self._nodes: NodeSlice | None = None  # its last slice so far
        # the window's outputs by name: prediction, spread [1, H, N, C], hidden [1, N, F]
        self._arrays: dict[str, np.ndarray] | None = None
        self._bytes = 0

    @property
    def partial(self) -> bool:
        """Whether slices of an unfinished window are held."""
        return self._index is not None

    def add(self, chunk: DecodedChunk, cursor: int) -> DecodedChunk | None:
        """The whole-window chunk ``chunk`` completes, or None while a window is partial.

        Args:
            chunk: the next verified chunk of the stream.
            cursor: the client's resume cursor (the position of the next window it wants).

        Raises:
            ChecksumError: the chunk does not continue the stream where it stands (the client
                resumes at ``cursor``, which drops the partial window).
        """
        nodes = chunk.nodes
        if nodes is None:
            if self.partial:
                raise ChecksumError(
                    f"a chunk of whole windows arrived before window {self._index} was complete"
                )
            if chunk.cursor - len(chunk.indices) != cursor:
                raise ChecksumError(
                    f"chunk covers [{chunk.cursor - len(chunk.indices)}, {chunk.cursor}), "
                    f"expected it to start at {cursor}"
                )
            return chunk
        expected = cursor + 1 if nodes.last else cursor
        if chunk.cursor != expected:
            raise ChecksumError(
                f"node slice [{nodes.start}, {nodes.stop}) of {nodes.count} has cursor "
                f"{chunk.cursor}, expected {expected}"
            )
        if nodes.start == 0:
            self._begin(chunk)
        else:
            self._check_continues(chunk)
        assert self._arrays is not None
        for name, part in chunk.labels.named().items():
            # each output along its own node axis (2 for labels, 1 for hidden states)
            where = (slice(None),) * NODE_AXIS[name] + (slice(nodes.start, nodes.stop),)
            self._arrays[name][where] = part
        self._nodes = nodes
        self._bytes += chunk.payload_bytes
        if not nodes.last:
            return None
        arrays = self._arrays
        whole = DecodedChunk(
            indices=chunk.indices,
            prediction=arrays["prediction"],
            spread=arrays.get("spread"),
            teacher_version=chunk.teacher_version,
            cursor=chunk.cursor,
            total=chunk.total,
            payload_bytes=self._bytes,
            hidden=arrays.get("hidden"),
        )
        self.reset()
        return whole

    def _begin(self, chunk: DecodedChunk) -> None:
        if self.partial:
            raise ChecksumError(
                f"window {int(chunk.indices[0])} began before window {self._index} was complete"
            )
        assert chunk.nodes is not None
        count = chunk.nodes.count
        self._index = int(chunk.indices[0])
        self._arrays = {}
        for name, part in chunk.labels.named().items():
            # the whole window's shape: the slice's, with every node on the node axis
            shape = list(part.shape)
            shape[NODE_AXIS[name]] = count
            self._arrays[name] = np.empty(shape, dtype=np.float32)
        self._bytes = 0

    def _check_continues(self, chunk: DecodedChunk) -> None:
        nodes, last, arrays = chunk.nodes, self._nodes, self._arrays
        assert nodes is not None
        if last is None or arrays is None:
            raise ChecksumError(
                f"node slice [{nodes.start}, {nodes.stop}) of window {int(chunk.indices[0])} "
                "arrived without the slices before it"
            )
        parts = chunk.labels.named()
        if (
            int(chunk.indices[0]) != self._index
            or nodes.start != last.stop
            or nodes.count != last.count
            or parts.keys() != arrays.keys()
            or any(not _continues(name, a.shape, arrays[name].shape) for name, a in parts.items())
        ):
            raise ChecksumError(
                f"node slice [{nodes.start}, {nodes.stop}) of {nodes.count} of window "
                f"{int(chunk.indices[0])} does not continue window {self._index} after node "
                f"{last.stop} of {last.count}"
            )

    def reset(self) -> None:
        """Drop the partial window (if any)."""
        self._index = self._nodes = self._arrays = None
        self._bytes = 0


def _continues(name: str, part: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    """Whether a slice of output ``name`` shaped ``part`` fits the window's buffer ``whole``:
    equal on every axis but the node axis."""
    axis = NODE_AXIS[name]
    return (
        len(part) == len(whole)
        and part[:axis] + part[axis + 1 :] == whole[:axis] + whole[axis + 1 :]
    )
