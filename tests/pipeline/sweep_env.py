"""What the sweep tests share: a small store, a tiny trained teacher and a sweep config file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from stkd_dist.checkpoint import TrainState, save_checkpoint
from stkd_dist.config import Config, load_config
from stkd_dist.storage import open_store
from stkd_dist.testing import briefly_trained
from stkd_dist.train.loop import build_model, build_reader

SPACE: dict[str, Any] = {
    "distill.alpha": {"uniform": [0.2, 0.9]},
    "student.optim.lr": {"loguniform": [1e-3, 1e-2]},
    "student.model": {"choice": ["mlp", "linear"]},
    "student.kwargs.embed_dim": {"choice": [8, 16]},
}


def read_board(path: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A sweep's leaderboard: ``(trials, aggregates)``, the rows of kind ``trial`` (best first)
    and the ``soup`` and ``ensemble`` rows."""
    board = pd.read_csv(path, dtype={"trial": str})
    trials = board[board["kind"] == "trial"].reset_index(drop=True)
    return trials, board[board["kind"] != "trial"].reset_index(drop=True)


@dataclass(frozen=True)
class SweepEnv:
    """A store, a teacher checkpoint trained on it, and the base config of the sweeps."""

    store: Path
    teacher: Path
    config: Config


def sweep_settings(
    store: Path, run: str, schedule: dict[str, Any] | None = None, **sweep: Any
) -> dict[str, Any]:
    """The YAML mapping of a tiny sweep on ``store`` (lstm teacher, small students);
    ``schedule`` adds to the students' ``student.schedule``."""
    return {
        "run": {"name": run, "seed": 0},
        "data": {"dataset": str(store), "batch_size": 32, "eval_batch_size": 128},
        "teacher": {"model": "lstm", "kwargs": {"hidden": 8, "layers": 1}},
        "student": {
            "model": "mlp",
            "kwargs": {},
            "schedule": {"warmup_epochs": 0, **(schedule or {})},
        },
        "distill": {"loss": "regression", "alpha": 0.5},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        "evaluate": {"latency_repeats": 2, "latency_warmup": 0},
        # the trials stream their labels (sweep.labels: stream) from one teacher replica
        # (sweep.label_replicas), which shares the trials' cores
        "serve": {"cpus_per_replica": 0},
        "sweep": {"space": SPACE, "samples": 4, "max_epochs": 3, "grace_period": 1, **sweep},
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def make_env(
    root: Path, run: str = "sweep-test", schedule: dict[str, Any] | None = None, **sweep: Any
) -> SweepEnv:
    """Write the store and a teacher briefly trained in this process (no Ray); ``schedule`` and
    ``sweep`` add to the config's ``student.schedule`` and ``sweep`` sections."""
    from tests.conftest import random_store

    torch.set_num_threads(1)
    store_path = random_store(root / "tiny.zarr", steps=400, nodes=6, channels=2, chunk_steps=64)
    cfg_file = write_yaml(root / "sweep.yaml", sweep_settings(store_path, run, schedule, **sweep))
    cfg = load_config(cfg_file)
    store = open_store(store_path)
    reader = build_reader(cfg, store)
    torch.manual_seed(0)
    model = build_model(cfg.teacher, reader, store)
    loss = briefly_trained(model, reader)  # a teacher that forecasts something, in a second
    info = save_checkpoint(
        root / "teacher" / "epoch_0000",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": loss},
        state=TrainState(epoch=0),
    )
    return SweepEnv(store_path, info.path, cfg)


@contextlib.contextmanager
def swept_on_ray(
    env: SweepEnv, storage: Path, num_cpus: int = 2, dashboard: bool = False
) -> Iterator[dict[str, Any]]:
    """Run ``env``'s sweep in this process on a fresh local Ray cluster of ``num_cpus`` CPUs;
    yields ``{"outcome", "storage", "lines"}`` (``lines``: what the sweep printed)."""
    import pytest
    import ray

    from stkd_dist.pipeline.sweep import run_sweep
    from stkd_dist.pipeline.ui import LinesUI

    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        # Dask graphs over Zarr v3 arrays fail in Ray's Dask scheduler (zarr metadata does not
        # survive the trip to a Ray worker); the sweep's driver-side evaluation uses threads
        mp.setenv("STKD_DASK", "threads")
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard)
        try:
            outcome = run_sweep(
                env.config,
                checkpoint=str(env.teacher),
                storage=storage,
                ui=LinesUI(lines),
            )
            yield {"outcome": outcome, "storage": storage, "lines": lines}
        finally:
            ray.shutdown()
