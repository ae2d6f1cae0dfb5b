"""Checkpoints: write, verify, refuse incomplete ones, resolve refs, load a forecaster."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import stkd_dist.checkpoint as checkpoint_module
import stkd_dist.checkpoint.files as checkpoint_files
from stkd_dist.checkpoint import (
    META,
    MODEL,
    TRAIN_STATE,
    DamagedCheckpointError,
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_state,
    load_forecaster,
    read_best,
    read_checkpoint,
    resolve_checkpoint,
    weights_digest,
    write_best,
)
from stkd_dist.errors import StoreError
from stkd_dist.location import Location, copy_tree, location, remove, url, write_json_atomic
from stkd_dist.storage import open_store
from stkd_dist.train.experiment import existing_outcome, open_experiment
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
    with pytest.raises(DamagedCheckpointError, match=rf"has {len(data) // 2} bytes, {len(data)}"):
        read_checkpoint(tmp_path / "d")
    (tmp_path / "d" / MODEL).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit
    with pytest.raises(DamagedCheckpointError, match="does not match its recorded sha256"):
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


def test_a_re_dealt_state_round_trips_and_orders_by_steps_into_the_epoch() -> None:
    state = TrainState(epoch=1, step=3, regroups=((3, 4), (2, 2)))
    assert (state.steps_before, state.epoch_step, state.order) == (6, 9, (1, 9))
    again = TrainState.from_json(json.loads(json.dumps(state.to_json())))
    assert again == state and again.regroups == ((3, 4), (2, 2))
    assert TrainState(epoch=1, step=8).order < state.order  # 8 steps in, before 9
    state.end_epoch(2, 1.0, 10, patience=0)
    assert state.regroups == () and state.order == (2, 0)


def test_end_epoch_without_patience_never_stops() -> None:
    state = TrainState()
    for epoch in range(6):
        state.end_epoch(epoch, 10.0 + epoch, 1, patience=0)
    assert state.bad_epochs == 5 and not state.stopped_early and state.best_epoch == 0


# -- resuming past a checkpoint torn mid-write --------------------------------------------------


def _cut_model_in_half(d: Location) -> None:  # a local copy killed half-way through model.pt
    data = (d / MODEL).read_bytes()
    (d / MODEL).write_bytes(data[: len(data) // 2])


def _drop_model(d: Location) -> None:  # an object store: meta.json PUT, model.pt never was
    remove(d / MODEL)


def _drop_train_state(d: Location) -> None:
    remove(d / TRAIN_STATE)


def _flip_a_byte(d: Location) -> None:  # same size, other bytes: only the sha256 tells
    data = bytearray((d / MODEL).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / MODEL).write_bytes(bytes(data))


def _cut_meta_in_half(d: Location) -> None:  # meta.json itself copied half-way: not JSON
    text = (d / META).read_bytes()
    (d / META).write_bytes(text[: len(text) // 2])


def _drop_meta(d: Location) -> None:  # the weights copied, meta.json (last) never was
    remove(d / META)


TEARS: dict[str, tuple[Callable[[Location], None], str]] = {
    "model.pt cut in half": (_cut_model_in_half, r"model\.pt has \d+ bytes, \d+ were recorded"),
    "model.pt missing": (_drop_model, r"model\.pt is missing"),
    "train_state.pt missing": (_drop_train_state, r"train_state\.pt is missing"),
    "model.pt corrupted": (_flip_a_byte, r"model\.pt does not match its recorded sha256"),
    "meta.json cut in half": (_cut_meta_in_half, r"unreadable checkpoint metadata"),
    "meta.json missing": (_drop_meta, r"meta\.json is missing"),
}


@pytest.fixture(params=["local", "object store"])
def experiment_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Location]:
    """Where the experiment lives: a local folder, or an (in-memory) object store."""
    if request.param == "local":
        yield location(tmp_path / "runs" / "r1" / "teacher")
        return
    root = location(f"memory://stkd-test-{uuid.uuid4().hex[:8]}")
    yield root / "runs" / "r1" / "teacher"
    remove(root)


def _two_checkpoints(store: Path, tmp_path: Path, experiment: Location) -> dict[str, torch.Tensor]:
    """Checkpoints after epochs 1 and 2 in ``experiment``, written by ``save_checkpoint`` into a
    local folder and copied there (as Ray Train copies them); returns the older one's model state."""
    cfg = tiny_config(store)
    older, _ = write_checkpoint(tmp_path / "w" / "epoch_0000", cfg, epoch=0, val_mae=3.0)
    newer, _ = write_checkpoint(tmp_path / "w" / "epoch_0001", cfg, epoch=1, val_mae=2.0, seed=1)
    assert weights_digest(older.state_dict()) != weights_digest(newer.state_dict())
    for name in ("epoch_0000", "epoch_0001"):
        copy_tree(location(tmp_path / "w" / name), experiment / name)
    write_json_atomic(experiment / "workers" / "rank-0.json", {})  # not a checkpoint: not named
    return {k: v.clone() for k, v in older.state_dict().items()}


@pytest.mark.parametrize("tear", list(TEARS))
def test_checkpoint_torn_mid_write_resume_uses_the_previous_one(
    tear: str,
    store: Path,
    tmp_path: Path,
    experiment_root: Location,
    caplog: pytest.LogCaptureFixture,
) -> None:
    experiment = experiment_root
    older = _two_checkpoints(store, tmp_path, experiment)
    assert latest_checkpoint(experiment).epoch == 1  # both intact: the newest
    damage, why = TEARS[tear]
    torn, previous = experiment / "epoch_0001", experiment / "epoch_0000"
    damage(torn)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stkd_dist.checkpoint"):
        info = latest_checkpoint(experiment)
    assert info is not None
    assert (url(info.path), info.epoch) == (url(previous), 0)
    loaded = load_checkpoint_state(info.path)["model"]
    assert loaded.keys() == older.keys()
    assert all(torch.equal(loaded[k], older[k]) for k in older)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert f"skipping incomplete or damaged checkpoint {url(torn)} (" in message
    assert f"resuming from {url(previous)} (after epoch 1) instead" in message
    assert re.search(why, message), message
    assert "workers" not in message
    with pytest.raises(DamagedCheckpointError):
        read_checkpoint(torn)  # and loading it directly is refused as before


def test_every_checkpoint_torn_starts_from_scratch_with_a_warning(
    store: Path, tmp_path: Path, experiment_root: Location, caplog: pytest.LogCaptureFixture
) -> None:
    experiment = experiment_root
    _two_checkpoints(store, tmp_path, experiment)
    _drop_meta(experiment / "epoch_0001")
    _cut_model_in_half(experiment / "epoch_0000")
    with caplog.at_level(logging.WARNING, logger="stkd_dist.checkpoint"):
        assert latest_checkpoint(experiment) is None
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert url(experiment / "epoch_0000") in message and url(experiment / "epoch_0001") in message
    assert "training starts from scratch" in message
    caplog.clear()
    empty = experiment.parent / "student_kd"
    assert latest_checkpoint(empty) is None and not caplog.records  # nothing there: silent


def test_unreadable_storage_is_an_error_not_a_torn_checkpoint(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment = location(tmp_path / "teacher")
    _two_checkpoints(store, tmp_path, experiment)

    def outage(loc: Location) -> bytes:
        raise StoreError("storage unavailable after 5 attempts (503)", where=url(loc))

    monkeypatch.setattr(checkpoint_files, "read_bytes", outage)  # the files' sha256 reads
    with pytest.raises(StoreError, match="storage unavailable") as e:
        latest_checkpoint(experiment)
    assert not isinstance(e.value, DamagedCheckpointError)  # never "start from scratch"


def test_a_checkpoint_of_another_format_is_an_error_not_skipped(
    store: Path, tmp_path: Path
) -> None:
    experiment = location(tmp_path / "teacher")
    _two_checkpoints(store, tmp_path, experiment)
    meta = json.loads((experiment / "epoch_0001" / META).read_text())
    (experiment / "epoch_0001" / META).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(StoreError, match="checkpoint format 99") as e:
        latest_checkpoint(experiment)  # a newer stkd-dist wrote it: do not resume from epoch 0
    assert not isinstance(e.value, DamagedCheckpointError)


def test_checkpoints_of_older_writers_verify_by_sha256_alone(store: Path, tmp_path: Path) -> None:
    experiment = location(tmp_path / "teacher")
    _two_checkpoints(store, tmp_path, experiment)
    for name in ("epoch_0000", "epoch_0001"):  # meta.json as written before sizes were recorded
        meta = json.loads((experiment / name / META).read_text())
        del meta["sizes"]
        (experiment / name / META).write_text(json.dumps(meta))
    assert latest_checkpoint(experiment).epoch == 1
    _cut_model_in_half(experiment / "epoch_0001")
    assert latest_checkpoint(experiment).epoch == 0


def test_a_torn_last_epoch_is_resumed_not_reported_complete(
    store: Path, storage_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(store, "torn", "teacher.schedule.epochs=2", "data.horizon=3")
    experiment = storage_root / "runs" / "torn" / "teacher"
    write_checkpoint(experiment / "epoch_0000", cfg, epoch=0, val_mae=3.0)
    write_checkpoint(experiment / "epoch_0001", cfg, epoch=1, val_mae=2.0, seed=1)
    _cut_model_in_half(location(experiment / "epoch_0001"))  # the last epoch, killed mid-copy
    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="stkd_dist.checkpoint"):
        outcome = existing_outcome(
            open_experiment(cfg, "teacher", storage_root), cfg, "teacher", lines.append
        )
    assert outcome is None  # trained on (Ray resumes from epoch_0000), not "complete"
    assert lines == ["resuming run 'torn' (teacher) after epoch 1/2"]
    assert any(url(experiment / "epoch_0001") in r.getMessage() for r in caplog.records)


def test_mid_epoch_checkpoints_order_after_their_epoch_and_never_count_as_best(
    store: Path, storage_root: Path
) -> None:
    cfg = tiny_config(store, "r1", "teacher.schedule.epochs=3", "data.horizon=3")
    experiment = storage_root / "runs" / "r1" / "teacher"
    write_checkpoint(experiment / "epoch_0000", cfg, epoch=0, val_mae=3.0)
    # inside epoch 1 (state.epoch 0 = the last finished one), after its 4th step: no val_mae
    write_checkpoint(experiment / "epoch_0001_step_000004", cfg, epoch=0, val_mae=3.0, step=4)
    meta = experiment / "epoch_0001_step_000004" / "meta.json"
    data = json.loads(meta.read_text())
    data["metrics"] = {"step": 4}
    meta.write_text(json.dumps(data))
    # meta.json's own sizes and hashes cover the other files only: still verifies
    latest = latest_checkpoint(experiment)
    assert latest is not None and latest.mid_epoch and latest.state.order == (0, 4)
    assert "-e0s4-" in latest.version and latest.val_mae is None
    assert [i.path.name for i in list_checkpoints(experiment)] == [
        "epoch_0000",
        "epoch_0001_step_000004",
    ]
    # resuming says where, and the run's best is an epoch's checkpoint
    lines: list[str] = []
    exp = open_experiment(cfg, "teacher", storage_root)
    assert existing_outcome(exp, cfg, "teacher", lines.append) is None
    assert lines == [
        f"resuming run 'r1' (teacher) at step 4 of epoch 2/{cfg.teacher.schedule.epochs}"
    ]
    best = checkpoint_module.resolve_checkpoint(experiment)
    assert best.name == "epoch_0000"
    # the epoch's own checkpoint, once written, is newer than any of its steps
    write_checkpoint(experiment / "epoch_0001", cfg, epoch=1, val_mae=2.0)
    assert latest_checkpoint(experiment).path.name == "epoch_0001"
