"""Driver-side decisions of ``train_teacher`` that need no Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from stkd_dist.checkpoint import read_best
from stkd_dist.errors import ConfigError
from stkd_dist.train.teacher import train_teacher
from tests.train.conftest import tiny_config, write_checkpoint


def test_a_finished_run_is_reported_not_retrained(small_store: Path, storage_root: Path) -> None:
    cfg = tiny_config(small_store, "done", "teacher.schedule.epochs=2", "data.horizon=3")
    experiment = storage_root / "runs" / "done" / "teacher"
    write_checkpoint(experiment / "epoch_0000", cfg, epoch=0, val_mae=2.0)
    write_checkpoint(experiment / "epoch_0001", cfg, epoch=1, val_mae=2.5, seed=1)
    lines: list[str] = []
    out = train_teacher(cfg, echo=lines.append)
    assert not out.trained and out.epochs_done == 2
    assert out.best.path == experiment / "epoch_0000"  # lowest validation MAE, not the latest
    assert read_best(experiment)["complete"] is True
    assert any("is complete" in line for line in lines)
    assert not ray.is_initialized()  # decided before any cluster was started


def test_early_stopped_run_is_complete(small_store: Path, storage_root: Path) -> None:
    cfg = tiny_config(small_store, "es", "teacher.schedule.epochs=9", "data.horizon=3")
    experiment = storage_root / "runs" / "es" / "teacher"
    write_checkpoint(experiment / "epoch_0003", cfg, epoch=3, val_mae=2.0, stopped_early=True)
    out = train_teacher(cfg, echo=lambda s: None)
    assert not out.trained and out.stopped_early and out.epochs_done == 4


def test_a_run_with_another_model_is_not_resumed(small_store: Path, storage_root: Path) -> None:
    cfg = tiny_config(small_store, "clash", "data.horizon=3")
    write_checkpoint(storage_root / "runs" / "clash" / "teacher" / "epoch_0000", cfg, 0, 2.0)
    other = tiny_config(small_store, "clash", "data.horizon=3", "teacher.kwargs.blocks=2")
    with pytest.raises(ConfigError, match="exists with a different data or teacher model"):
        train_teacher(other, echo=lambda s: None)


def test_bad_setups_fail_before_starting_ray(small_store: Path, storage_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"fewer than 64 workers"):
        train_teacher(
            tiny_config(small_store, "w", "data.horizon=3", "cluster.num_workers=64"),
            echo=lambda s: None,
        )
    with pytest.raises(ConfigError, match="teacher"):
        train_teacher(
            tiny_config(small_store, "k", "data.horizon=3", "teacher.kwargs.nope=1"),
            echo=lambda s: None,
        )
    assert not ray.is_initialized()
