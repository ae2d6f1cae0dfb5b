"""The soft-label cache: precompute (CLI), serving from it, write-through, mismatches, atomicity."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stkd_dist.cli import main
from stkd_dist.errors import StoreError
from stkd_dist.serving.cache import (
    LabelCache,
    default_cache_path,
    open_cache,
)
from stkd_dist.serving.client import SoftLabelClient
from stkd_dist.serving.label_arrays import NumpyLabels
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.server import TeacherServer
from stkd_dist.serving.teacher import load_teacher


def _stream(
    server: TeacherServer, env: Any, split: str, windows: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with SoftLabelClient([server.address], expected_fingerprint=env.fingerprint) as c:
        items = list(c.stream(split, windows, spread=True))
    return (
        np.concatenate([i for i, _ in items]),
        np.concatenate([lab.prediction for _, lab in items]),
        np.concatenate([lab.spread for _, lab in items]),
    )


@pytest.mark.integration
@pytest.mark.parametrize("memory_bytes", [0, 2**30], ids=["zarr", "in-memory"])
def test_precompute_then_serve_without_teacher_passes(
    teacher_env, direct, server_factory, storage_root: Path, capsys, memory_bytes: int
) -> None:
    rc = main(
        [
            "precompute-labels",
            "--checkpoint", str(teacher_env.checkpoint),
            "--data", str(teacher_env.store),
            "--splits", "train,val",
            "--batch-size", "100",
        ]
    )  # fmt: skip
    assert rc == 0
    path = default_cache_path(teacher_env.fingerprint, teacher_env.version)
    assert path.is_relative_to(storage_root) and path.exists()
    assert str(path) in capsys.readouterr().out
    meta = direct.meta
    cache = LabelCache(path)
    n_train, n_val = len(meta.splits["train"]), len(meta.splits["val"])
    assert cache.forward_windows == n_train + n_val  # each window ran through the teacher once
    assert cache.is_complete("train") and cache.is_complete("val")
    assert "test" not in cache.ranges
    assert not list(path.parent.glob(".*tmp*"))  # no temporary left behind

    server = server_factory(cache=open_cache(path, meta, memory_bytes=memory_bytes))
    windows = np.random.default_rng(0).permutation(np.asarray(meta.splits["train"]))[:150]
    idx, pred, spread = _stream(server, teacher_env, "train", windows)
    assert idx.tolist() == windows.tolist()
    ref_labels = direct.predict(idx)
    ref, ref_spread = ref_labels.prediction, ref_labels.spread
    np.testing.assert_allclose(pred, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spread, ref_spread, rtol=1e-5, atol=1e-5)
    val = list(meta.splits["val"])
    vidx, _, _ = _stream(server, teacher_env, "val", val)
    assert vidx.tolist() == val
    # zero teacher forward passes: everything came from the cache
    assert server.teacher.forward_windows == 0
    assert server.metrics.value("stkd_serve_forward_windows_total") == 0
    assert server.metrics.value("stkd_serve_cache_hits_total") == 150 + len(val)
    # the test split is not cached: the teacher computes it
    tidx, tpred, _ = _stream(server, teacher_env, "test", range(480, 500))
    assert server.teacher.forward_windows == 20
    np.testing.assert_allclose(tpred, direct.predict(tidx).prediction, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("memory_bytes", [0, 2**30], ids=["zarr", "in-memory"])
def test_write_through_fills_the_cache(
    teacher_env, direct, server_factory, tmp_path, memory_bytes: int
) -> None:
    path = tmp_path / "wt.zarr"
    cache = open_cache(path, direct.meta, writable=True, memory_bytes=memory_bytes)
    server = server_factory(cache=cache, write_through=True)
    windows = list(range(50, 150, 2))
    _, pred, _ = _stream(server, teacher_env, "train", windows)
    server.flush_cache()
    # a window requested again is not computed again: the first pass filled the cache
    _stream(server, teacher_env, "train", windows)
    assert server.teacher.forward_windows == len(windows)

    reopened = LabelCache(path)
    assert reopened.filled_windows("train") == len(windows)
    assert reopened.forward_windows == len(windows)
    hit, labels = reopened.lookup("train", np.arange(40, 160))
    assert np.flatnonzero(hit).tolist() == [w - 40 for w in windows]
    assert labels is not None
    np.testing.assert_allclose(
        labels.prediction, direct.predict(windows).prediction, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(labels.prediction, pred, rtol=1e-6)

    # a fresh server on the filled cache serves those windows without the teacher
    second = server_factory(cache=LabelCache(path))
    _stream(second, teacher_env, "train", windows)
    assert second.teacher.forward_windows == 0


def test_memory_budget_decides_which_splits_are_held(direct, tmp_path) -> None:
    path = tmp_path / "m.zarr"
    precompute_labels(direct, path, ["train", "val"], batch_size=128)
    row = 12 * 5 * 2 * 4 * 2  # prediction and spread of one window
    n_train, n_val = len(direct.meta.splits["train"]), len(direct.meta.splits["val"])
    cache = LabelCache(path, memory_bytes=n_val * row + 1)  # room for val, not for train
    on_disk = LabelCache(path)
    for split, windows in (("val", [425, 421, 422, 423]), ("train", [5, 6, 7, 300])):
        hit, labels = cache.lookup(split, np.array(windows))
        ref_hit, ref = on_disk.lookup(split, np.array(windows))
        assert hit.all() and ref_hit.all() and labels is not None and ref is not None
        np.testing.assert_array_equal(labels.prediction, ref.prediction)
        np.testing.assert_array_equal(labels.spread, ref.spread)
    assert cache.resident_splits == ["val"] and on_disk.resident_splits == []
    assert n_train * row > cache.memory_bytes >= n_val * row


def test_cache_of_another_teacher_or_dataset_is_refused(direct, tmp_path) -> None:
    other = dataclasses.replace(direct.meta, version="someone-else-e3-00000000")
    LabelCache.create(tmp_path / "a.zarr", other, ["train"])
    with pytest.raises(StoreError, match="teacher"):
        open_cache(tmp_path / "a.zarr", direct.meta)
    moved = dataclasses.replace(direct.meta, splits={**direct.meta.splits, "train": range(0, 5)})
    LabelCache.create(tmp_path / "b.zarr", moved, ["train"])
    with pytest.raises(StoreError, match="split 'train'"):
        open_cache(tmp_path / "b.zarr", direct.meta)
    with pytest.raises(StoreError, match="no label cache"):
        open_cache(tmp_path / "missing.zarr", direct.meta)
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(StoreError):
        LabelCache(tmp_path / "junk.zarr")


def test_failed_precompute_leaves_nothing(teacher_env, tmp_path, monkeypatch) -> None:
    teacher = load_teacher(teacher_env.checkpoint, teacher_env.store)
    calls = {"n": 0}
    real = teacher.predict

    def flaky(idx: np.ndarray, hidden: bool = False) -> NumpyLabels:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(idx, hidden=hidden)

    monkeypatch.setattr(teacher, "predict", flaky)
    out = tmp_path / "labels" / "x.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        precompute_labels(teacher, out, ["train"], batch_size=50)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_precompute_refuses_to_overwrite(teacher_env, direct, tmp_path, capsys) -> None:
    out = tmp_path / "c.zarr"
    precompute_labels(direct, out, ["val"], batch_size=64)
    args = [
        "precompute-labels",
        "--checkpoint", str(teacher_env.checkpoint),
        "--data", str(teacher_env.store),
        "--splits", "val",
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("stkd: error: ") and "--overwrite" in err and str(out) in err
    assert main([*args, "--overwrite"]) == 0
    assert LabelCache(out).forward_windows == len(direct.meta.splits["val"])
    assert main([*args[:-4], "--splits", "train,nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err


@pytest.mark.integration
def test_two_write_through_servers_compute_each_window_once(
    teacher_env, direct, server_factory, tmp_path
) -> None:
    path = tmp_path / "shared.zarr"
    a = server_factory(
        cache=open_cache(path, direct.meta, writable=True), write_through=True, batch_size=8
    )
    b = server_factory(
        cache=open_cache(path, direct.meta, writable=True), write_through=True, batch_size=8
    )
    first, second = list(range(40, 140)), list(range(90, 190))  # 50 windows in common
    _, pred_a, _ = _stream(a, teacher_env, "train", first)
    # stored before sent: with no flush, a reader opened now finds every window A delivered
    assert LabelCache(path).lookup("train", np.asarray(first))[0].all()
    _, pred_b, _ = _stream(b, teacher_env, "train", second)
    # B read A's 50 windows (its fragments of incomplete chunks included) and computed the rest
    assert a.teacher.forward_windows == len(first)
    assert b.teacher.forward_windows == len(set(second) - set(first))
    ref = direct.predict(np.arange(40, 190)).prediction
    np.testing.assert_array_equal(pred_a, ref[np.asarray(first) - 40])
    np.testing.assert_array_equal(pred_b, ref[np.asarray(second) - 40])
    # and back on A: everything B stored is read, nothing computed
    _stream(a, teacher_env, "train", second)
    assert a.teacher.forward_windows == len(first)
