"""Wire codec: dtype round trips, chunk sizes under the limit, checksums (hidden states too),
ranges, proto drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stkd_dist.errors import InputError
from stkd_dist.serving import codec
from stkd_dist.serving.client import to_ranges
from stkd_dist.serving.label_arrays import LabelArrays
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.protogen import GENERATED_DIR, generate


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(50, 20, size=(7, 12, 5, 2))).astype(np.float32)  # [n, H, N, C]


@pytest.fixture
def hidden() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.normal(0, 3, size=(7, 5, 6)).astype(np.float32)  # [n, N, F]


def test_float32_round_trip_is_exact(labels: np.ndarray) -> None:
    out = codec.decode_tensor(codec.encode_tensor(labels, "float32"))
    assert out.dtype == np.float32 and out.shape == labels.shape
    np.testing.assert_array_equal(out, labels)


def test_float16_round_trip_matches_numpy_half(labels: np.ndarray) -> None:
    t = codec.encode_tensor(labels, "float16")
    assert len(t.data) == labels.size * 2 and t.dtype == pb.FLOAT16
    out = codec.decode_tensor(t)
    np.testing.assert_array_equal(out, labels.astype(np.float16).astype(np.float32))
    # half precision: relative error below 2**-11
    np.testing.assert_allclose(out, labels, rtol=2**-11)


def test_bfloat16_round_trip_matches_torch(labels: np.ndarray) -> None:
    t = codec.encode_tensor(labels, "bfloat16")
    assert len(t.data) == labels.size * 2 and t.dtype == pb.BFLOAT16
    out = codec.decode_tensor(t)
    expected = torch.from_numpy(labels).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, labels, rtol=2**-8)


def test_bfloat16_keeps_float32_range() -> None:
    big = np.array([3.0e38, -1.0e30, 1.0e-30, 0.0], dtype=np.float32)
    out = codec.decode_tensor(codec.encode_tensor(big, "bfloat16"))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, big, rtol=2**-8)
    half = codec.decode_tensor(codec.encode_tensor(big, "float16"))
    assert np.isinf(half[0])  # float16 overflows where bfloat16 does not


def test_unknown_dtype_is_an_input_error() -> None:
    with pytest.raises(InputError, match="float64"):
        codec.wire_dtype("float64")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("limit", [4096, 65536, 3 * 2**20])
def test_chunks_stay_under_the_message_limit(dtype: str, limit: int) -> None:
    shape = (12, 207, 2)
    per_chunk = codec.windows_per_chunk(shape, dtype, 2, limit) if limit > 4096 else None
    if per_chunk is None:
        with pytest.raises(InputError, match="max_message_bytes"):
            codec.windows_per_chunk(shape, dtype, 2, limit)
        return
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(per_chunk, *shape)).astype(np.float32)
    idx = np.arange(10**9, 10**9 + per_chunk)  # large indices: the widest varints
    chunk = codec.encode_chunk(
        idx,
        LabelArrays(pred, pred),
        dtype=dtype,
        teacher_version="v" * 200,
        cursor=10**9,
        total=10**10,
    )
    assert chunk.ByteSize() <= limit
    # and the limit is used, not wasted: one more window would not fit the payload budget
    per_window = codec.window_payload_bytes(shape, dtype, 2) + codec.INDEX_BYTES
    assert (per_chunk + 1) * per_window > limit - codec.CHUNK_OVERHEAD_BYTES


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_chunks_with_hidden_states_stay_under_the_message_limit(dtype: str) -> None:
    shape, features, limit = (12, 207, 2), 64, 2**20
    per_chunk = codec.windows_per_chunk(shape, dtype, 1, limit, hidden_dim=features)
    # hidden states [N, F] take room: fewer windows than without them
    assert per_chunk < codec.windows_per_chunk(shape, dtype, 1, limit)
    rng = np.random.default_rng(2)
    pred = rng.normal(size=(per_chunk, *shape)).astype(np.float32)
    hidden = rng.normal(size=(per_chunk, shape[1], features)).astype(np.float32)
    idx = np.arange(10**9, 10**9 + per_chunk)
    kwargs = {"dtype": dtype, "teacher_version": "v" * 200, "cursor": 10**9, "total": 10**10}
    chunk = codec.encode_chunk(idx, LabelArrays(pred, hidden=hidden), **kwargs)
    assert chunk.ByteSize() <= limit
    per_window = codec.window_payload_bytes(shape, dtype, 1, features) + codec.INDEX_BYTES
    assert (per_chunk + 1) * per_window > limit - codec.CHUNK_OVERHEAD_BYTES


def test_chunk_round_trip_and_checksum(labels: np.ndarray) -> None:
    idx = np.arange(100, 107)
    spread = -labels / 100
    chunk = codec.encode_chunk(
        idx, LabelArrays(labels, spread), dtype="float32", teacher_version="t1", cursor=17, total=30
    )
    wire = pb.LabelChunk.FromString(chunk.SerializeToString())
    out = codec.decode_chunk(wire)
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_array_equal(out.prediction, labels)
    np.testing.assert_array_equal(out.spread, spread)
    assert out.hidden is None
    assert (out.cursor, out.total, out.teacher_version) == (17, 30, "t1")


def _wire_exact(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as the wire dtype rounds them (float32: unchanged)."""
    return codec.decode_tensor(codec.encode_tensor(values, dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_spread", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_chunk_round_trip_with_hidden_states(
    labels: np.ndarray, hidden: np.ndarray, dtype: str, with_spread: bool, fast: bool
) -> None:
    idx = np.arange(40, 47)
    sent = LabelArrays(labels, labels / 9 if with_spread else None, hidden)
    kwargs = {"dtype": dtype, "teacher_version": "t1", "cursor": 47, "total": 50}
    if fast:
        out = codec.decode_chunk_bytes(codec.encode_chunk_bytes(idx, sent, **kwargs).data)
    else:
        wire = pb.LabelChunk.FromString(codec.encode_chunk(idx, sent, **kwargs).SerializeToString())
        out = codec.decode_chunk(wire)
    np.testing.assert_array_equal(out.indices, idx)
    assert out.hidden is not None and out.hidden.shape == (7, 5, 6)
    for name, array in sent.named().items():
        np.testing.assert_array_equal(out.labels.named()[name], _wire_exact(array, dtype))
    assert out.labels.named().keys() == sent.named().keys()
    itemsize = 4 if dtype == "float32" else 2
    assert out.payload_bytes == sum(a.size for a in sent.named().values()) * itemsize


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("with_spread", [False, True])
@pytest.mark.parametrize("with_hidden", [False, True])
def test_fast_serialization_equals_protobufs(
    labels: np.ndarray, hidden: np.ndarray, dtype: str, with_spread: bool, with_hidden: bool
) -> None:
    """The hand-assembled wire bytes parse to exactly the message protobuf itself builds."""
    idx = np.arange(10**6, 10**6 + 7)
    spread = labels / 7 if with_spread else None
    sent = LabelArrays(labels, spread, hidden if with_hidden else None)
    kwargs = {"dtype": dtype, "teacher_version": "run-e3-0123abcd", "cursor": 10**6, "total": 2**40}
    fast = codec.encode_chunk_bytes(idx, sent, **kwargs)
    reference = codec.encode_chunk(idx, sent, **kwargs)
    parsed = pb.LabelChunk.FromString(fast.data)
    assert parsed == reference
    assert fast.windows == 7 and fast.cursor == 10**6
    assert fast.payload_bytes == (
        len(reference.prediction.data) + len(reference.spread.data) + len(reference.hidden.data)
    )
    out = codec.decode_chunk(parsed)
    np.testing.assert_array_equal(out.indices, idx)
    assert (out.spread is not None) == with_spread
    assert (out.hidden is not None) == with_hidden


def test_a_chunk_without_hidden_states_is_the_message_it_always_was(labels: np.ndarray) -> None:
    """No hidden states: no field 11, and the checksum of prediction and spread alone."""
    idx = np.arange(3, 10)
    kwargs = {"dtype": "float32", "teacher_version": "t", "cursor": 10, "total": 10}
    fast = codec.encode_chunk_bytes(idx, LabelArrays(labels, labels / 2), **kwargs)
    parsed = pb.LabelChunk.FromString(fast.data)
    assert not parsed.HasField("hidden")
    pred, spread = labels.astype("<f4").tobytes(), (labels / 2).astype("<f4").tobytes()
    assert parsed.crc32c == codec.checksum(idx, pred, spread)
    # the bytes of the old layout: head, then fields 2 and 3, nothing after
    assert fast.data.endswith(spread)


@pytest.mark.parametrize("part", ["prediction", "spread", "hidden", "indices"])
def test_checksum_detects_corruption(labels: np.ndarray, hidden: np.ndarray, part: str) -> None:
    idx = np.arange(7)
    chunk = codec.encode_chunk(
        idx,
        LabelArrays(labels, labels, hidden),
        dtype="float16",
        teacher_version="t",
        cursor=7,
        total=7,
    )
    if part == "indices":
        chunk.window_indices[3] += 1
    else:
        tensor = getattr(chunk, part)
        data = bytearray(tensor.data)
        data[len(data) // 2] ^= 0x01  # one flipped bit
        tensor.data = bytes(data)
    with pytest.raises(codec.ChecksumError):
        codec.decode_chunk(chunk)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_corrupted_hidden_byte_fails_the_fast_decoder(
    labels: np.ndarray, hidden: np.ndarray, dtype: str
) -> None:
    """The CRC covers the hidden bytes after the spread's: one flipped bit in them is caught."""
    idx = np.arange(7)
    sent = LabelArrays(labels, labels / 3, hidden)
    kwargs = {"dtype": dtype, "teacher_version": "t", "cursor": 7, "total": 7}
    data = bytearray(codec.encode_chunk_bytes(idx, sent, **kwargs).data)
    hidden_bytes = codec.tensor_bytes(hidden, dtype)
    at = bytes(data).rindex(hidden_bytes)  # the hidden field's data is sent last
    data[at + len(hidden_bytes) // 2] ^= 0x10
    with pytest.raises(codec.ChecksumError, match="checksum mismatch"):
        codec.decode_chunk_bytes(bytes(data))
    # the checksum is CRC-32C of indices, prediction, spread, then hidden
    parsed = pb.LabelChunk.FromString(codec.encode_chunk_bytes(idx, sent, **kwargs).data)
    parts = [codec.tensor_bytes(a, dtype) for a in (labels, labels / 3, hidden)]
    assert parsed.crc32c == codec.checksum(idx, *parts)
    assert parsed.crc32c != codec.checksum(idx, *parts[:2])


def test_hidden_states_of_the_wrong_shape_are_rejected(labels: np.ndarray) -> None:
    idx = np.arange(7)
    wrong = np.zeros((7, 4, 6), dtype=np.float32)  # 4 nodes where the labels have 5
    msg = pb.LabelChunk(window_indices=idx.tolist(), cursor=7, total=7, teacher_version="t")
    msg.prediction.CopyFrom(codec.encode_tensor(labels, "float32"))
    msg.hidden.CopyFrom(codec.encode_tensor(wrong, "float32"))
    msg.crc32c = codec.checksum(idx, msg.prediction.data, msg.hidden.data)
    with pytest.raises(codec.ChecksumError, match="hidden"):
        codec.decode_chunk(msg)


def test_truncated_tensor_is_rejected(labels: np.ndarray) -> None:
    t = codec.encode_tensor(labels, "float32")
    t.data = t.data[:-4]
    with pytest.raises(codec.ChecksumError, match="bytes"):
        codec.decode_tensor(t)


def test_to_ranges_compresses_runs_and_keeps_order() -> None:
    seq = [0, 1, 2, 3, 10, 12, 14, 5, 4, 100]
    ranges = to_ranges(seq)
    assert ranges[:2] == [(0, 4, 1), (10, 15, 2)]
    assert len(to_ranges(range(7, 10_000, 3))) == 1
    rebuilt = [w for a, b, s in ranges for w in range(a, b, s)]
    assert rebuilt == seq
    rng = np.random.default_rng(3)
    shuffled = rng.permutation(1000)
    assert [w for a, b, s in to_ranges(shuffled) for w in range(a, b, s)] == shuffled.tolist()


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    """The committed proto_gen modules equal a fresh generation from proto/."""
    written = generate(tmp_path)
    assert {p.name for p in written} == {"teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"}
    for path in written:
        committed = GENERATED_DIR / path.name
        assert committed.exists(), (
            f"{committed.name} is missing: run python -m stkd_dist.serving.protogen"
        )
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} differs from proto/: run python -m stkd_dist.serving.protogen"
        )
    # the grpc module imports its messages relatively (works without proto/ on sys.path)
    assert "from . import teacher_pb2" in (GENERATED_DIR / "teacher_pb2_grpc.py").read_text()
