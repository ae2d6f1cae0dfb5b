"""Node slices of windows larger than a message: layout, bit-exact round trips, golden bytes,
checksums and the client's reassembly, with and without the teacher's hidden states (sliced on
their node axis, 1)."""

from __future__ import annotations

import dataclasses

import google_crc32c
import numpy as np
import pytest
import torch

from stkd_dist.errors import InputError
from stkd_dist.serving import codec, codec_slices
from stkd_dist.serving.codec import NodeSlice
from stkd_dist.serving.codec_slices import ChunkLayout, WindowAssembler
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.proto_gen import teacher_pb2 as pb

H, N, C = 12, 37, 2
SHAPE = (H, N, C)
F = 5  # hidden width


@pytest.fixture
def labels() -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, spread)`` ``[3, H, N, C]`` float32."""
    rng = np.random.default_rng(5)
    pred = rng.normal(50, 20, size=(3, *SHAPE)).astype(np.float32)
    return pred, (-pred / 100).astype(np.float32)


@pytest.fixture
def hidden() -> np.ndarray:
    """Hidden states ``[3, N, F]`` float32."""
    return np.random.default_rng(6).normal(0, 2, size=(3, N, F)).astype(np.float32)


def _encode(
    labels: tuple[np.ndarray, np.ndarray],
    *,
    per_slice: int = 10,
    dtype: str = "float32",
    with_spread: bool = True,
    position: int = 40,
    hidden: np.ndarray | None = None,
) -> list[codec.EncodedChunk]:
    pred, spread = labels
    return list(
        codec_slices.encode_node_slices(
            np.array([7, 3, 11]),
            LabelArrays(pred, spread if with_spread else None, hidden),
            nodes_per_slice=per_slice,
            position=position,
            dtype=dtype,
            teacher_version="t-e1-abc",
            total=100,
        )
    )


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """What ``a`` becomes on the wire in ``dtype``, computed without the codec."""
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    return a


# -- layout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [4096, 65536, 3 * 2**20])
def test_whole_windows_when_one_fits(limit: int) -> None:
    shape = (12, 10, 2)  # 1920 bytes a window (2 outputs): fits every limit here
    layout = codec_slices.chunk_layout(shape, "float32", 2, limit)
    assert layout == ChunkLayout(codec.windows_per_chunk(shape, "float32", 2, limit), 0)
    assert not layout.split


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("outputs", [1, 2])
@pytest.mark.parametrize("limit", [1500, 8192, 65536])
def test_slices_stay_under_the_message_limit(dtype: str, outputs: int, limit: int) -> None:
    shape = (12, 5000, 1)  # 240 KB per float32 window: larger than every limit here
    layout = codec_slices.chunk_layout(shape, dtype, outputs, limit)
    assert layout.split and layout.windows == 1 and 1 <= layout.nodes < shape[1]
    rng = np.random.default_rng(2)
    pred = rng.normal(size=(1, *shape)).astype(np.float32)
    spread = pred / 3 if outputs == 2 else None
    # the widest varints: a huge window index, cursor and total, a long teacher version
    idx = np.array([10**12])
    sizes = []
    for msg in codec_slices.encode_node_slices(
        idx,
        LabelArrays(pred, spread),
        nodes_per_slice=layout.nodes,
        position=10**12,
        dtype=dtype,
        teacher_version="v" * 200,
        total=10**13,
    ):
        sizes.append(len(msg.data))
    assert max(sizes) <= limit
    assert len(sizes) == -(-shape[1] // layout.nodes)
    # and the limit is used: one more node per slice would not fit the payload budget
    row = codec_slices.node_row_bytes(shape, dtype, outputs)
    headers = codec_slices.min_message_bytes(shape, dtype, outputs) - row
    assert (layout.nodes + 1) * row > limit - headers


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_slices_with_hidden_states_stay_under_the_message_limit(dtype: str) -> None:
    shape, features, limit = (12, 5000, 1), 16, 8192
    layout = codec_slices.chunk_layout(shape, dtype, 1, limit, hidden_dim=features)
    # a node row carries [H, 1, C] of labels and [1, F] of hidden states: fewer nodes a slice
    assert layout.nodes < codec_slices.chunk_layout(shape, dtype, 1, limit).nodes
    rng = np.random.default_rng(4)
    sent = LabelArrays(
        rng.normal(size=(1, *shape)).astype(np.float32),
        hidden=rng.normal(size=(1, shape[1], features)).astype(np.float32),
    )
    messages = list(
        codec_slices.encode_node_slices(
            np.array([10**12]), sent, nodes_per_slice=layout.nodes, position=10**12,
            dtype=dtype, teacher_version="v" * 200, total=10**13,
        )
    )  # fmt: skip
    assert max(len(m.data) for m in messages) <= limit
    row = codec_slices.node_row_bytes(shape, dtype, 1, features)
    assert row == (12 + features) * (4 if dtype == "float32" else 2)
    headers = codec_slices.min_message_bytes(shape, dtype, 1, features) - row
    assert (layout.nodes + 1) * row > limit - headers


def test_limit_below_one_node_row_is_an_input_error() -> None:
    shape = (12, 300, 1)
    minimum = codec_slices.min_message_bytes(shape, "float32", 2)
    assert minimum == codec.CHUNK_OVERHEAD_BYTES + codec.INDEX_BYTES + 33 + 12 * 1 * 1 * 4 * 2
    assert codec_slices.chunk_layout(shape, "float32", 2, minimum) == ChunkLayout(1, 1)
    with pytest.raises(InputError, match=f"the minimum is {minimum} bytes") as info:
        codec_slices.chunk_layout(shape, "float32", 2, minimum - 1)
    assert info.value.where == "max_message_bytes"
    assert "[12, 1, 1]" in info.value.message
    # hidden states raise the minimum by one node's [1, F]
    with_hidden = codec_slices.min_message_bytes(shape, "float32", 2, hidden_dim=8)
    assert with_hidden == minimum + 8 * 4
    with pytest.raises(InputError, match="hidden states"):
        codec_slices.chunk_layout(shape, "float32", 2, minimum, hidden_dim=8)


# -- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_spread", [False, True])
def test_split_windows_round_trip_bit_exactly(
    labels: tuple[np.ndarray, np.ndarray], dtype: str, with_spread: bool
) -> None:
    messages = _encode(labels, dtype=dtype, with_spread=with_spread)
    assert len(messages) == 3 * 4  # 37 nodes: slices of 10, 10, 10 and 7
    assert [m.windows for m in messages] == [0, 0, 0, 1] * 3  # a window counts with its last
    assembler, cursor, out = WindowAssembler(), 40, []
    for m in messages:
        whole = assembler.add(codec.decode_chunk_bytes(m.data), cursor)
        if whole is not None:
            cursor = whole.cursor
            out.append(whole)
    assert not assembler.partial and cursor == 43
    assert [int(w.indices[0]) for w in out] == [7, 3, 11]
    pred, spread = labels
    got = np.concatenate([w.prediction for w in out])
    assert got.shape == (3, *SHAPE) and np.array_equal(got, _rounded(pred, dtype))
    if with_spread:
        np.testing.assert_array_equal(
            np.concatenate([w.spread for w in out]), _rounded(spread, dtype)
        )
    else:
        assert all(w.spread is None for w in out)
    per_window = H * N * C * (4 if dtype == "float32" else 2) * (2 if with_spread else 1)
    assert [w.payload_bytes for w in out] == [per_window] * 3
    assert all(w.hidden is None for w in out)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_spread", [False, True])
def test_split_windows_with_hidden_states_round_trip_bit_exactly(
    labels: tuple[np.ndarray, np.ndarray], hidden: np.ndarray, dtype: str, with_spread: bool
) -> None:
    messages = _encode(labels, dtype=dtype, with_spread=with_spread, hidden=hidden)
    for k, m in enumerate(messages):  # each slice: [1, n, F] of the slice's nodes n
        msg = pb.LabelChunk.FromString(m.data)
        assert list(msg.hidden.shape) == [1, msg.node_stop - msg.node_start, F], k
    assembler, cursor, out = WindowAssembler(), 40, []
    for m in messages:
        whole = assembler.add(codec.decode_chunk_bytes(m.data), cursor)
        if whole is not None:
            cursor = whole.cursor
            out.append(whole)
    assert cursor == 43 and [int(w.indices[0]) for w in out] == [7, 3, 11]
    got = np.concatenate([w.hidden for w in out if w.hidden is not None])
    assert got.shape == (3, N, F) and np.array_equal(got, _rounded(hidden, dtype))
    pred = labels[0]
    assert np.array_equal(np.concatenate([w.prediction for w in out]), _rounded(pred, dtype))
    assert all((w.spread is not None) == with_spread for w in out)
    itemsize = 4 if dtype == "float32" else 2
    per_window = (H * N * C * (2 if with_spread else 1) + N * F) * itemsize
    assert [w.payload_bytes for w in out] == [per_window] * 3


def test_golden_slice_layout_from_numpy(labels: tuple[np.ndarray, np.ndarray]) -> None:
    """Every slice message, checked against bytes built here with numpy and crc32c alone."""
    pred, spread = labels
    messages = _encode(labels, per_slice=10)
    bounds = [(0, 10), (10, 20), (20, 30), (30, 37)]
    for k, m in enumerate(messages):
        w, (a, b) = divmod(k, 4)[0], bounds[k % 4]
        msg = pb.LabelChunk.FromString(m.data)
        assert list(msg.window_indices) == [[7, 3, 11][w]]
        assert (msg.node_start, msg.node_stop, msg.node_count) == (a, b, N)
        last = b == N
        assert msg.cursor == 40 + w + last and msg.total == 100
        assert msg.teacher_version == "t-e1-abc"
        p_bytes = np.ascontiguousarray(pred[w, :, a:b]).astype("<f4").tobytes()
        s_bytes = np.ascontiguousarray(spread[w, :, a:b]).astype("<f4").tobytes()
        for tensor, data in ((msg.prediction, p_bytes), (msg.spread, s_bytes)):
            assert list(tensor.shape) == [1, H, b - a, C] and tensor.dtype == pb.FLOAT32
            assert tensor.data == data
        crc = google_crc32c.value(
            np.array([[7, 3, 11][w]], "<i8").tobytes()
            + np.array([a, b, N], "<i8").tobytes()
            + p_bytes
            + s_bytes
        )
        assert msg.crc32c == crc
        # and the protobuf-built message of the same slice is the very same message
        nodes = NodeSlice(a, b, N)
        reference = codec.encode_chunk(
            np.array([[7, 3, 11][w]]),
            LabelArrays(pred[w : w + 1, :, a:b], spread[w : w + 1, :, a:b]),
            dtype="float32",
            teacher_version="t-e1-abc",
            cursor=40 + w + last,
            total=100,
            nodes=nodes,
        )
        assert msg == reference
    # the slices of a window, concatenated along the node axis, are the window
    for w in range(3):
        parts = [pb.LabelChunk.FromString(m.data).prediction for m in messages[4 * w : 4 * w + 4]]
        rebuilt = np.concatenate(
            [np.frombuffer(t.data, "<f4").reshape(tuple(t.shape)) for t in parts], axis=2
        )
        assert np.array_equal(rebuilt[0], pred[w])


def test_golden_slice_with_hidden_states_from_numpy(
    labels: tuple[np.ndarray, np.ndarray], hidden: np.ndarray
) -> None:
    """A slice's hidden states are nodes [a, b) of axis 1, checksummed after the spread."""
    pred, spread = labels
    messages = _encode(labels, per_slice=10, hidden=hidden)
    msg = pb.LabelChunk.FromString(messages[5].data)  # window 3 (the second), nodes [10, 20)
    assert (list(msg.window_indices), msg.node_start, msg.node_stop) == ([3], 10, 20)
    h_bytes = np.ascontiguousarray(hidden[1, 10:20]).astype("<f4").tobytes()
    assert list(msg.hidden.shape) == [1, 10, F] and msg.hidden.data == h_bytes
    crc = google_crc32c.value(
        np.array([3], "<i8").tobytes()
        + np.array([10, 20, N], "<i8").tobytes()
        + np.ascontiguousarray(pred[1, :, 10:20]).astype("<f4").tobytes()
        + np.ascontiguousarray(spread[1, :, 10:20]).astype("<f4").tobytes()
        + h_bytes
    )
    assert msg.crc32c == crc


def test_whole_window_chunks_are_as_before(labels: tuple[np.ndarray, np.ndarray]) -> None:
    """No node fields, the old checksum: messages of whole windows did not change."""
    pred, spread = labels
    idx = np.array([7, 3, 11])
    fast = codec.encode_chunk_bytes(
        idx, LabelArrays(pred, spread), dtype="float32", teacher_version="t", cursor=3, total=3
    )
    msg = pb.LabelChunk.FromString(fast.data)
    assert (msg.node_start, msg.node_stop, msg.node_count) == (0, 0, 0)
    old_crc = google_crc32c.value(
        idx.astype("<i8").tobytes() + pred.astype("<f4").tobytes() + spread.astype("<f4").tobytes()
    )
    assert msg.crc32c == old_crc and fast.windows == 3
    out = codec.decode_chunk_bytes(fast.data)
    assert out.nodes is None and WindowAssembler().add(out, 0) is out


# -- corruption and order ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "part", ["prediction", "spread", "hidden", "index", "node_start", "node_stop", "node_count"]
)
def test_corrupted_slice_fails_its_checksum(
    labels: tuple[np.ndarray, np.ndarray], hidden: np.ndarray, part: str
) -> None:
    # nodes [10, 20) of window 7
    msg = pb.LabelChunk.FromString(_encode(labels, hidden=hidden)[1].data)
    assert codec.decode_chunk(msg).nodes == NodeSlice(10, 20, N)
    if part in ("prediction", "spread", "hidden"):
        tensor = getattr(msg, part)
        data = bytearray(tensor.data)
        data[len(data) // 3] ^= 0x04  # one flipped bit
        tensor.data = bytes(data)
    elif part == "index":
        msg.window_indices[0] += 1
    elif part == "node_count":
        msg.node_count += 1  # the same labels, claimed to be part of a larger window
    else:
        # the range shifted by one, its length kept: the shapes still agree, the checksum not
        msg.node_start, msg.node_stop = msg.node_start + 1, msg.node_stop + 1
    with pytest.raises(codec.ChecksumError, match="checksum"):
        codec.decode_chunk(msg)


def test_flipped_bit_in_slice_bytes_is_detected(labels: tuple[np.ndarray, np.ndarray]) -> None:
    data = bytearray(_encode(labels)[2].data)
    data[-5] ^= 0x10
    with pytest.raises(codec.ChecksumError):
        codec.decode_chunk_bytes(bytes(data))


def test_assembler_refuses_slices_out_of_order(labels: tuple[np.ndarray, np.ndarray]) -> None:
    parts = [codec.decode_chunk_bytes(m.data) for m in _encode(labels)]  # 4 slices per window
    whole = codec.decode_chunk_bytes(
        codec.encode_chunk_bytes(
            np.array([1]), LabelArrays(labels[0][:1]), dtype="float32", teacher_version="t",
            cursor=41, total=100,
        ).data
    )  # fmt: skip
    cases = {
        "a skipped slice": ([parts[0], parts[2]], 40, "does not continue"),
        "a repeated slice": ([parts[0], parts[0]], 40, "began before"),
        "a slice without its first": ([parts[1]], 40, "without the slices before"),
        "whole windows mid-window": ([parts[0], whole], 40, "before window 7 was complete"),
        "another window's slice": ([parts[0], parts[5]], 40, "cursor"),
        "a cursor off by one": ([parts[0]], 41, "cursor"),
    }
    for name, (sequence, cursor, words) in cases.items():
        assembler = WindowAssembler()
        with pytest.raises(codec.ChecksumError, match=words):
            for p in sequence:
                assert assembler.add(p, cursor) is None, name
    # a fresh assembler (a new call) takes the window again from its first slice
    assembler = WindowAssembler()
    assert assembler.add(parts[0], 40) is None and assembler.partial
    assembler.reset()
    results = [assembler.add(p, 40) for p in parts[:4]]
    assert results[:3] == [None] * 3 and results[3] is not None
    assert np.array_equal(results[3].prediction[0], labels[0][0])


def test_assembler_refuses_a_slice_that_drops_the_hidden_states(
    labels: tuple[np.ndarray, np.ndarray], hidden: np.ndarray
) -> None:
    with_h = [codec.decode_chunk_bytes(m.data) for m in _encode(labels, hidden=hidden)]
    without = [codec.decode_chunk_bytes(m.data) for m in _encode(labels)]
    assembler = WindowAssembler()
    assert assembler.add(with_h[0], 40) is None
    with pytest.raises(codec.ChecksumError, match="does not continue"):
        assembler.add(without[1], 40)


def test_node_slice_ranges_are_validated() -> None:
    for bad in ((0, 0, 5), (3, 2, 5), (0, 6, 5), (-1, 2, 5)):
        with pytest.raises(codec.ChecksumError, match="malformed node slice"):
            NodeSlice(*bad)
    assert codec_slices.node_slices(7, 3) == [
        NodeSlice(0, 3, 7),
        NodeSlice(3, 6, 7),
        NodeSlice(6, 7, 7),
    ]
    assert [s.last for s in codec_slices.node_slices(7, 3)] == [False, False, True]
    assert dataclasses.astuple(NodeSlice(1, 2, 3)) == (1, 2, 3)
