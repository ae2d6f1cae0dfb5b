"""Checkpoints: write, verify, refuse incomplete ones, resolve refs, load a forecaster."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stkd_dist.checkpoint import (
    META,
    MODEL,
    TrainState,
    list_checkpoints,
    load_forecaster,
    read_best,
    read_checkpoint,
    resolve_checkpoint,
    weights_digest,
    write_best,
)
from stkd_dist.errors import StoreError
from stkd_dist.storage import open_store
from stkd_dist.train.loop import LossValue, global_mean
from tests.train.conftest import tiny_config, write_checkpoint


@pytest.fixture
def store(small_store: Path) -> Path:
    return small_store


def test_save_read_and_load_forecaster(tmp_path: Path, store: Path) -> None:
    cfg = tiny_config(store)
    model, reader = write_checkpoint(tmp_path / "c", cfg, epoch=3, val_mae=1.5)
    info = read_checkpoint(tmp_path / "c")
    digest = weights_digest(model.state_dict())
    assert info.version == f"r1-e3-{digest[:8]}"
    assert (info.epoch, info.val_mae, info.role, info.dataset) == (3, 1.5, "teacher", "ck")
    assert info.config == cfg
    assert info.fingerprint == open_store(store).fingerprint
    assert info.stats.mean.tolist() == pytest.approx(reader.stats.mean.tolist())
    assert info.state.best_epoch == 3

    loaded, info2 = load_forecaster(tmp_path / "c")
    assert info2.version == info.version
    assert not loaded.training
    assert next(loaded.parameters()).device.type == "cpu"
    batch = reader.batch(list(reader.windows("test"))[:5])
    model.eval()
    with torch.no_grad():
        expected = model.forward_batch(batch)
        got = loaded.forward_batch(batch)
    assert torch.equal(expected, got)
    assert weights_digest(loaded.state_dict()) == digest


def test_incomplete_or_damaged_checkpoints_are_refused(tmp_path: Path, store: Path) -> None:
    cfg = tiny_config(store)
    write_checkpoint(tmp_path / "c", cfg, epoch=0, val_mae=2.0)
    (tmp_path / "c" / META).unlink()
    with pytest.raises(StoreError, match=r"incomplete checkpoint: meta.json is missing"):
        read_checkpoint(tmp_path / "c")
    with pytest.raises(StoreError, match="incomplete"):
        load_forecaster(tmp_path / "c")

    write_checkpoint(tmp_path / "d", cfg, epoch=0, val_mae=2.0)
    data = (tmp_path / "d" / MODEL).read_bytes()
    (tmp_path / "d" / MODEL).write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(StoreError, match="does not match its recorded sha256"):
        read_checkpoint(tmp_path / "d")
    assert [i.path.name for i in list_checkpoints(tmp_path)] == ["d"]  # "c" has no meta.json


def test_resolve_by_dir_run_dir_experiment_and_run_name(
    tmp_path: Path, store: Path, storage_root: Path
) -> None:
    cfg = tiny_config(store, run="myrun")
    experiment = storage_root / "runs" / "myrun" / "teacher"
    write_checkpoint(experiment / "epoch_0000", cfg, epoch=0, val_mae=3.0)
    write_checkpoint(experiment / "epoch_0001", cfg, epoch=1, val_mae=2.0, seed=1)
    write_checkpoint(experiment / "epoch_0002", cfg, epoch=2, val_mae=2.5, seed=2)
    # no best.json yet (an interrupted run): the best complete checkpoint
    assert resolve_checkpoint("myrun") == experiment / "epoch_0001"
    write_best(experiment, read_checkpoint(experiment / "epoch_0002"))
    assert read_best(experiment)["checkpoint"] == "epoch_0002"
    for ref in ("myrun", storage_root / "runs" / "myrun", experiment):
        assert resolve_checkpoint(ref) == experiment / "epoch_0002"
    assert resolve_checkpoint(experiment / "epoch_0000") == experiment / "epoch_0000"
    with pytest.raises(StoreError, match="no run named 'other'"):
        resolve_checkpoint("other")
    with pytest.raises(StoreError, match="no student_kd checkpoint"):
        resolve_checkpoint("myrun", role="student_kd")


def test_global_mean_single_process() -> None:
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    value = LossValue(pred.mean(), torch.tensor(2))
    assert global_mean(value, 1).item() == pytest.approx(1.5)
    empty = global_mean(LossValue(pred.sum() * 0, torch.tensor(0)), 1)
    empty.backward()  # padding-only: zero loss that still has a graph
    assert empty.item() == 0.0
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_end_epoch_tracks_the_best_and_stops_after_patience() -> None:
    state = TrainState()
    assert state.end_epoch(0, 5.0, 10, patience=2) == 5.0
    assert (state.best_val_mae, state.best_epoch, state.bad_epochs) == (5.0, 0, 0)
    state.end_epoch(1, 4.0, 10, patience=2)  # better: the counter resets
    state.end_epoch(2, 4.0, 10, patience=2)  # equal is not better
    assert (state.best_epoch, state.bad_epochs, state.stopped_early) == (1, 1, False)
    assert state.end_epoch(3, float("nan"), 10, patience=2) == float("inf")  # NaN never wins
    assert (state.best_val_mae, state.bad_epochs, state.stopped_early) == (4.0, 2, True)
    assert (state.epoch, state.samples) == (3, 40)


def test_end_epoch_without_patience_never_stops() -> None:
    state = TrainState()
    for epoch in range(6):
        state.end_epoch(epoch, 10.0 + epoch, 1, patience=0)
    assert state.bad_epochs == 5 and not state.stopped_early and state.best_epoch == 0
