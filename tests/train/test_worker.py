"""The epoch loop of one rank (``run_worker``), run in this process (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from stkd_dist.storage import open_store
from stkd_dist.testing import LocalSession
from stkd_dist.train.loop import TrainJob, build_reader
from stkd_dist.train.teacher import EXPERIMENT, masked_mae_loss
from stkd_dist.train.worker import run_worker
from tests.train.conftest import tiny_config, write_checkpoint


def _teacher_job(cfg: Any, store: Path, out: Path) -> TrainJob:
    return TrainJob(
        config=cfg,
        role="teacher",
        experiment=EXPERIMENT,
        dataset=str(store),
        make_loss=masked_mae_loss,
        experiment_dir=str(out),
    )


@pytest.mark.parametrize("workers", [1, {"min": 1, "max": 12}])
def test_mid_epoch_checkpoints_leave_a_window_for_every_worker(
    small_store: Path, tmp_path: Path, workers: Any
) -> None:
    """An elastic run may restart from a mid-epoch checkpoint on up to ``max`` workers, and
    the re-deal gives each a window: the loop takes no checkpoint with fewer windows left."""
    batch = 8
    cfg = tiny_config(
        small_store,
        "w",
        "data.horizon=3",
        f"data.batch_size={batch}",
        "teacher.schedule.epochs=1",
        "checkpoint.every_steps=1",
        f"cluster.num_workers={json.dumps(workers)}",
    )
    job = _teacher_job(cfg, small_store, tmp_path)
    session = LocalSession()
    run_worker(job, session)

    # counted here: one rank reads every training window, `batch` per step
    n = len(build_reader(cfg, open_store(small_store)).windows("train"))
    need = 12 if isinstance(workers, dict) else 1
    expected = [s for s in range(1, math.ceil(n / batch)) if n - s * batch >= need]
    taken = [m["step"] for m in session.reports if "epoch_in_progress" in m]
    assert taken == expected
    if need > 1:  # the last steps' checkpoints were left out, and only those
        assert len(expected) < math.ceil(n / batch) - 1
    assert [m["epoch"] for m in session.reports if "epoch" in m] == [0]


def test_an_inductive_teacher_trains_and_its_checkpoint_says_transferable(
    small_store: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        small_store, "ind", "data.horizon=3", "teacher.model=stgnn_inductive",
        "teacher.schedule.epochs=2", "teacher.schedule.warmup_epochs=0",
    )  # fmt: skip
    job = _teacher_job(cfg, small_store, tmp_path)
    session = LocalSession()
    run_worker(job, session)
    first, last = session.infos
    assert first.spec["key"] == "stgnn_inductive" and last.spec["transferable"] is True
    # it learned: the weights moved and the training loss fell
    moved = [
        k
        for k in session.weights[0]
        if not torch.equal(session.weights[0][k], session.weights[1][k])
    ]
    assert moved and last.metrics["train_loss"] < first.metrics["train_loss"]


def test_a_fine_tune_starts_from_the_given_weights_with_a_fresh_count(
    small_store: Path, tmp_path: Path
) -> None:
    import dataclasses

    # a near-zero learning rate: what the run ends with is what it started from
    cfg = tiny_config(
        small_store, "ft", "data.horizon=3", "teacher.schedule.epochs=1", "teacher.optim.lr=1e-12"
    )
    start = tmp_path / "start"
    # another seed's initial weights, at a later epoch: the fine-tune's count starts at 0 anyway
    donor, _ = write_checkpoint(start, cfg, epoch=6, val_mae=1.0, seed=123)
    fresh, tuned = LocalSession(), LocalSession()
    run_worker(_teacher_job(cfg, small_store, tmp_path / "a"), fresh)
    job = dataclasses.replace(
        _teacher_job(cfg, small_store, tmp_path / "b"), init_weights=str(start)
    )
    run_worker(job, tuned)
    # the parameters (batch-norm statistics follow the data whatever the learning rate)
    want = dict(donor.named_parameters())
    assert [m["epoch"] for m in tuned.reports if "epoch" in m] == [0]
    for name, value in want.items():
        assert torch.allclose(tuned.weights[-1][name], value, atol=1e-6), name
    assert any(not torch.allclose(fresh.weights[-1][k], v, atol=1e-3) for k, v in want.items())
