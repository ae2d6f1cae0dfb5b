"""The pipelined server: labels bitwise equal to the in-process forward, shared forward passes,
the block cache, the micro-batch setting and its record in the label cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch
import zarr

from stkd_dist.data.reader import WindowReader
from stkd_dist.errors import StoreError
from stkd_dist.serving.cache import LabelCache, open_cache
from stkd_dist.serving.client import SoftLabelClient
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.server import TeacherServer
from stkd_dist.serving.teacher import Teacher, load_teacher
from stkd_dist.storage import open_store

# (prediction, spread) of windows, as these tests compare them
LabelPair = tuple[np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def reference(direct: Teacher) -> dict[str, LabelPair]:
    """Labels of every window of each split, computed in-process in one call per split."""
    out = {}
    for split, windows in direct.meta.splits.items():
        if len(windows):
            got = direct.predict(np.asarray(windows))
            assert got.spread is not None
            out[split] = (got.prediction, got.spread)
    return out


def _stream(server: TeacherServer, env, split: str, windows, max_bytes: int) -> LabelPair:
    with SoftLabelClient(
        [server.address], expected_fingerprint=env.fingerprint, max_message_bytes=max_bytes
    ) as c:
        items = list(c.stream(split, windows, spread=True))
    idx = np.concatenate([i for i, _ in items])
    assert idx.tolist() == list(windows)
    spreads = [labels.spread for _, labels in items if labels.spread is not None]
    assert len(spreads) == len(items)
    return np.concatenate([labels.prediction for _, labels in items]), np.concatenate(spreads)


def _rows(direct: Teacher, split: str, windows) -> np.ndarray:
    r = direct.meta.splits[split]
    return (np.asarray(windows) - r.start) // r.step


@pytest.mark.integration
@pytest.mark.parametrize(
    ("batch_size", "max_bytes"),
    [(7, 4096), (32, 65536), (96, 4096), (256, 2**20)],
    ids=["odd-batches-small-chunks", "one-micro-batch", "3-micro-batches", "large"],
)
def test_served_labels_are_bitwise_the_in_process_forward(
    server_factory, teacher_env, direct, reference, batch_size: int, max_bytes: int
) -> None:
    server = server_factory(batch_size=batch_size, batch_wait_s=0.002)
    train = np.asarray(direct.meta.splits["train"])
    rng = np.random.default_rng(batch_size)
    # overlapping windows in different orders: batches mix streams, windows repeat across them
    requests = [rng.permutation(train)[:150].tolist() for _ in range(4)] + [train[:90].tolist()]
    out: dict[int, LabelPair] = {}
    errors: list[BaseException] = []

    def stream(k: int) -> None:
        try:
            out[k] = _stream(server, teacher_env, "train", requests[k], max_bytes)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(out) == list(range(len(requests)))
    ref_pred, ref_spread = reference["train"]
    for k, windows in enumerate(requests):
        rows = _rows(direct, "train", windows)
        assert np.array_equal(out[k][0], ref_pred[rows])
        assert np.array_equal(out[k][1], ref_spread[rows])
    # every window once through the model, however the streams overlapped
    distinct = len(set().union(*map(set, requests)))
    assert server.teacher.forward_windows == distinct == server.batcher_stats().windows


@pytest.mark.integration
def test_concurrent_identical_requests_share_one_forward(
    server_factory, teacher_env, direct, reference
) -> None:
    server = server_factory(batch_size=64, batch_wait_s=0.01)
    windows = list(range(40, 160))
    barrier = threading.Barrier(6)
    out: dict[int, LabelPair] = {}

    def stream(k: int) -> None:
        barrier.wait(10)
        out[k] = _stream(server, teacher_env, "train", windows, 4096)

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(out) == list(range(6))
    rows = _rows(direct, "train", windows)
    for pred, spread in out.values():
        assert np.array_equal(pred, reference["train"][0][rows])
        assert np.array_equal(spread, reference["train"][1][rows])
    assert server.teacher.forward_windows == len(windows)
    assert server.metrics.value("stkd_serve_forward_windows_total") == len(windows)
    stats = server.batcher_stats()
    assert stats.windows == len(windows)
    assert stats.shared + stats.recent_hits == 5 * len(windows)


@pytest.mark.integration
def test_forward_counter_counts_windows_not_padding(server_factory, teacher_env) -> None:
    server = server_factory(metrics_port=0)
    _stream(server, teacher_env, "test", range(480, 485), 2**20)  # 5 windows, one padded call
    assert server.teacher.forward_windows == 5
    assert server.metrics.value("stkd_serve_forward_windows_total") == 5
    assert server.metrics.value("stkd_serve_forward_seconds_total") > 0


def test_block_cache_reads_each_chunk_once(teacher_env, direct) -> None:
    store = open_store(teacher_env.store)
    plain = WindowReader(store, direct.reader.window, direct.reader.splits)
    cached = WindowReader(open_store(teacher_env.store), direct.reader.window, direct.reader.splits)
    cache = cached.use_block_cache()
    reads: list[tuple[int, int]] = []
    inner = cached.store.read

    def counting(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        reads.append((lo, hi))
        return inner(lo, hi)

    cached.store.read = counting  # type: ignore[method-assign]
    chunk = store.chunks[0]
    windows = np.arange(0, 397)
    for lo in range(0, len(windows), 24):  # consecutive batches, several per chunk
        part = windows[lo : lo + 24]
        a, b = plain.batch(part), cached.batch(part)
        for name in ("x", "y", "mask", "x_mask", "time_of_day", "day_of_week", "valid"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    needed = {c for w in windows for c in range(w // chunk, (w + 23) // chunk + 1)}
    chunks_read = [lo // chunk for lo, _ in reads]
    assert sorted(chunks_read) == sorted(needed)  # each chunk read once, whole
    assert all(hi - lo == chunk or hi == store.steps for lo, hi in reads)
    assert cache.stats.chunk_reads == len(needed) and cache.stats.chunk_hits > len(needed)


def test_a_server_reads_consecutive_batches_chunk_by_chunk(server_factory, teacher_env) -> None:
    server = server_factory(batch_size=32, batch_wait_s=0.0)
    cache = server.teacher.reader.block_cache
    assert cache is not None
    before = cache.stats.chunk_reads
    _stream(server, teacher_env, "train", range(0, 300), 4096)
    chunk = server.teacher.reader.store.chunks[0]
    assert cache.stats.chunk_reads - before <= -(-(300 + 23) // chunk)


def test_micro_batch_sets_the_size_of_every_model_call(teacher_env, direct) -> None:
    teacher = load_teacher(teacher_env.checkpoint, teacher_env.store, micro_batch=8)
    assert teacher.micro_batch == 8 and teacher.compute.describe() == "micro_batch 8, fp32 on cpu"
    sizes: list[int] = []
    hook = teacher.model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    try:
        got = teacher.predict(np.arange(13))
        pred, spread = got.prediction, got.spread
    finally:
        hook.remove()
    assert sizes == [8, 8] and teacher.forward_windows == 13 and pred.shape[0] == 13
    ref = direct.predict(np.arange(13))
    ref_pred, ref_spread = ref.prediction, ref.spread
    np.testing.assert_allclose(pred, ref_pred, rtol=1e-5, atol=1e-5)
    assert spread is not None and ref_spread is not None


def test_compute_settings_are_recorded_and_checked(teacher_env, tmp_path, caplog) -> None:
    small = load_teacher(teacher_env.checkpoint, teacher_env.store, micro_batch=16)
    path = tmp_path / "m16.zarr"
    precompute_labels(small, path, ["val"], batch_size=50)
    assert LabelCache(path).computed_with == {
        "micro_batch": 16,
        "precision": "fp32",
        "label_device": "cpu",
    }
    default = load_teacher(teacher_env.checkpoint, teacher_env.store)
    # write-through with other settings would mix bits: refused, naming both
    with pytest.raises(StoreError) as refused:
        TeacherServer(default, cache=LabelCache(path, mode="r+"), write_through=True)
    assert "micro_batch 16, fp32 on cpu" in str(refused.value)
    assert "micro_batch 32, fp32 on cpu" in str(refused.value)
    # read-only: served with a warning
    with caplog.at_level(logging.WARNING, logger="stkd_dist.serving.cache"):
        server = TeacherServer(default, cache=LabelCache(path))
    server.stop()
    assert "micro_batch 16" in caplog.text and "micro_batch 32" in caplog.text
    # the same settings: write-through accepted
    TeacherServer(small, cache=LabelCache(path, mode="r+"), write_through=True).stop()


def test_a_cache_created_for_write_through_records_the_servers_settings(
    teacher_env, tmp_path
) -> None:
    teacher = load_teacher(teacher_env.checkpoint, teacher_env.store, micro_batch=16)
    path = tmp_path / "wt.zarr"
    cache = open_cache(path, teacher.meta, writable=True, compute=teacher.compute)
    assert cache.computed_with["micro_batch"] == 16
    TeacherServer(teacher, cache=cache, write_through=True).stop()


def test_caches_without_compute_settings_read_as_the_old_defaults(direct, tmp_path) -> None:
    path = tmp_path / "old.zarr"
    precompute_labels(direct, path, ["val"], batch_size=50)
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    for key in ("micro_batch", "precision", "label_device"):
        attrs.pop(key)
    group.attrs.put(attrs)  # as a cache written before the settings were recorded
    old = LabelCache(path, mode="r+")
    assert old.computed_with == {"micro_batch": 32, "precision": "fp32", "label_device": "cpu"}
    old.check_compute(direct.compute)  # the default settings: accepted for write-through


@pytest.mark.integration
def test_micro_batch_is_used_by_the_server_and_the_fill_alike(
    server_factory: Callable[..., TeacherServer], teacher_env, tmp_path
) -> None:
    teacher = load_teacher(teacher_env.checkpoint, teacher_env.store, micro_batch=16)
    path = tmp_path / "fill16.zarr"
    precompute_labels(teacher, path, ["train"], batch_size=70, workers=2)
    server = server_factory(batch_size=48, teacher={"micro_batch": 16})
    windows = list(range(0, 397, 3))
    pred, spread = _stream(server, teacher_env, "train", windows, 4096)
    hit, cached = LabelCache(path).lookup("train", np.asarray(windows))
    assert hit.all() and cached is not None
    assert np.array_equal(pred, cached.prediction) and np.array_equal(spread, cached.spread)
