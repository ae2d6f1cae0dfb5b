"""Teacher training through Ray Train on a real local Ray cluster (2 CPUs, gloo DDP).

One Ray cluster serves the module. Data and models are tiny so each run takes seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from stkd_dist.checkpoint import (
    list_checkpoints,
    load_forecaster,
    read_best,
)
from stkd_dist.config import read_config
from stkd_dist.testing import kill_rank_after, last_weights
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.teacher import train_teacher
from tests.train.conftest import gwnet_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local(store: Path) -> Iterator[None]:
    # the store is written first, with Dask's threaded scheduler (no Ray connected yet)
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(gwnet_store: Path) -> Path:
    return gwnet_store


config = gwnet_config


def test_ddp_ranks_stay_identical_and_rerun_resumes(
    ray_local: None, store: Path, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    lines: list[str] = []
    cfg = config(store, "ddp", 2)
    out = train_teacher(cfg, storage=root, echo=lines.append)
    experiment = root / "runs" / "ddp" / "teacher"
    assert out.trained and out.epochs_done == 2 and out.experiment == experiment

    history = read_history(experiment)
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        # every rank reported a digest of its parameters after the epoch's optimiser steps
        assert len(h["param_digests"]) == 2
        assert h["param_digests"][0] == h["param_digests"][1], h
        assert h["world_size"] == 2 and h["samples"] > 0
    assert history[0]["param_digests"][0] != history[1]["param_digests"][0]  # training moved them

    best = read_best(experiment)
    assert best is not None
    assert best["val_mae"] == pytest.approx(min(h["val_mae"] for h in history))
    assert out.best.path == experiment / best["checkpoint"]
    assert len(list_checkpoints(experiment)) <= cfg.run.keep_best + 1
    assert read_config(root / "runs" / "ddp" / "config.yaml") == cfg
    model, info = load_forecaster("ddp", storage=root)
    assert info.version == best["version"] and not model.training

    # the same run again: complete, nothing trained
    again = train_teacher(cfg, storage=root, echo=lines.append)
    assert not again.trained and again.best.path == out.best.path
    assert any("is complete" in line for line in lines)
    assert len(read_history(experiment)) == 2

    # the same run name with more epochs resumes after the last finished epoch
    longer = train_teacher(config(store, "ddp", 4), storage=root, echo=lines.append)
    history = read_history(experiment)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert [h["attempt"] for h in history] == [0, 0, 1, 1]
    assert longer.epochs_done == 4 and longer.trained
    assert any("resuming run 'ddp' (teacher) after epoch 2/4" in line for line in lines)


STEPS = ("checkpoint.every_steps=4",)  # 9 steps an epoch: checkpoints after steps 4 and 8


@pytest.fixture(scope="module")
def uninterrupted(ray_local: None, store: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("straight")
    out = train_teacher(config(store, "straight", 2, *STEPS), storage=root, echo=lambda s: None)
    assert out.attempts == 0
    return last_weights(out.experiment), read_history(out.experiment)


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0"])
def test_a_worker_killed_mid_epoch_resumes_at_its_step_bitwise(
    uninterrupted, store: Path, tmp_path: Path, victim: int
) -> None:
    root = tmp_path / "storage"
    cfg = config(store, "kill", 2, *STEPS)
    assert cfg.cluster.max_failures == 3  # the default: a lost worker is recovered from
    experiment = root / "runs" / "kill" / "teacher"
    # the first mid-epoch checkpoint of epoch 1 (after its 4th step): the worker dies inside
    # the last epoch, with its other steps still to run
    killed, thread = kill_rank_after(experiment, "epoch_0001_step_", victim, time.time())
    out = train_teacher(cfg, storage=root, echo=lambda s: None)
    thread.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert out.epochs_done == 2 and out.attempts >= 1
    status = json.loads((experiment / "workers" / f"rank-{victim}.json").read_text())
    # the new worker group continued epoch 1 at a step, not from the start of an epoch
    assert status["attempt"] >= 1 and status["resumed_after_epoch"] == 0
    assert status["resumed_at_step"] > 0
    weights, history = uninterrupted
    final = last_weights(experiment)
    assert final.keys() == weights.keys()
    for name in weights:
        assert torch.equal(final[name], weights[name]), name  # bit for bit
    # the reported epochs match too: the resumed epoch's loss sums carried over every rank's
    resumed = {h["epoch"]: h for h in read_history(experiment)}
    for h in history:
        assert resumed[h["epoch"]]["train_loss"] == h["train_loss"]
        assert resumed[h["epoch"]]["val_mae"] == h["val_mae"]
        assert resumed[h["epoch"]]["samples"] == h["samples"]
