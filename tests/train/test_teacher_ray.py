"""Teacher training through Ray Train on a real local Ray cluster (2 CPUs, gloo DDP).

One Ray cluster serves the module. Data and models are tiny so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from stkd_dist.checkpoint import list_checkpoints, load_forecaster, read_best
from stkd_dist.config import Config, load_config, read_config
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.teacher import train_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "residual_channels": 8,
    "dilation_channels": 8,
    "skip_channels": 16,
    "end_channels": 16,
    "blocks": 1,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import random_store

    return random_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", steps=400, nodes=6, chunk_steps=64
    )


@pytest.fixture(scope="module")
def ray_local(store: Path) -> Iterator[None]:
    # the store is written first, with Dask's threaded scheduler (no Ray connected yet)
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def config(store: Path, run: str, epochs: int, *extra: str) -> Config:
    return load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            f"teacher.kwargs={json.dumps(TINY)}",
            f"teacher.schedule.epochs={epochs}",
            "teacher.schedule.warmup_epochs=1",
            f"run.name={run}",
            "cluster.num_workers=2",
            *extra,
        ],
    )


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


def _worker_pids(experiment: Path, since: float) -> list[int]:
    """PIDs of the live training workers of the current worker group, from their status files."""
    pids = []
    for f in sorted((experiment / "workers").glob("rank-*.json")):
        try:
            status = json.loads(f.read_text())
            cmdline = Path(f"/proc/{status['pid']}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError):
            continue
        if status["started"] >= since and b"RayTrainWorker" in cmdline:
            pids.append(int(status["pid"]))
    return pids


def test_killed_worker_resumes_from_latest_checkpoint(
    ray_local: None, store: Path, tmp_path: Path
) -> None:
    root = tmp_path / "storage"
    epochs = 8
    cfg = config(store, "kill", epochs, "cluster.max_failures=2")
    experiment = root / "runs" / "kill" / "teacher"
    killed: list[int] = []

    started = time.time()

    def killer() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            # a history record means every rank reported epoch 0 and Ray registered its
            # checkpoint; the workers are inside epoch 1 now
            if read_history(experiment):
                pids = _worker_pids(experiment, started)
                if len(pids) == 2:
                    killed.append(pids[-1])  # rank 1
                    os.kill(pids[-1], signal.SIGKILL)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = train_teacher(cfg, storage=root, echo=lambda s: None)
    thread.join(timeout=5)

    assert killed, "no training worker was found to kill"
    assert out.epochs_done == epochs
    history = read_history(experiment)
    epochs_seen = [h["epoch"] for h in history]
    assert sorted(set(epochs_seen)) == list(range(epochs))
    assert history[-1]["attempt"] >= 1 and out.attempts >= 1  # restarted from a checkpoint
    first_resumed = next(h for h in history if h["attempt"] >= 1)
    assert first_resumed["epoch"] >= 1  # continued after a checkpointed epoch, not from scratch
    assert all(h["ranks_in_sync"] for h in history)
    assert read_best(experiment)["epochs_done"] == epochs
