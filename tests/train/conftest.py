"""Fixtures of the training tests: tiny teacher configs and checkpoints written without training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stkd_dist.checkpoint import TrainState, save_checkpoint
from stkd_dist.config import Config, load_config
from stkd_dist.storage import open_store
from stkd_dist.train.loop import build_model, build_reader
from tests.train.student_env import env, ray_local, spawn  # noqa: F401 (fixtures)

TINY_STGNN = {
    "residual_channels": 4,
    "dilation_channels": 4,
    "skip_channels": 8,
    "end_channels": 8,
    "blocks": 1,
}


TINY_GWNET = {
    "residual_channels": 8,
    "dilation_channels": 8,
    "skip_channels": 16,
    "end_channels": 16,
    "blocks": 1,
}


@pytest.fixture(scope="module")
def gwnet_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-step, 6-node random store chunked by 64 steps (one per test module)."""
    from tests.conftest import random_store

    return random_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", steps=400, nodes=6, chunk_steps=64
    )


def gwnet_config(store: Path, run: str, epochs: int, *extra: str) -> Config:
    """The demo preset on ``store`` with a tiny Graph WaveNet teacher on 2 workers, batch 16."""
    return load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            "data.batch_size=16",
            "data.eval_batch_size=64",
            f"teacher.kwargs={json.dumps(TINY_GWNET)}",
            f"teacher.schedule.epochs={epochs}",
            "teacher.schedule.warmup_epochs=1",
            f"run.name={run}",
            "cluster.num_workers=2",
            *extra,
        ],
    )


def tiny_config(store: Path, run: str = "r1", *extra: str) -> Config:
    """The demo preset on ``store`` with a tiny stgnn teacher."""
    return load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            f"run.name={run}",
            f"teacher.kwargs={json.dumps(TINY_STGNN)}",
            *extra,
        ],
    )


def write_checkpoint(
    path: Path, cfg: Config, epoch: int, val_mae: float, seed: int = 0, **state: Any
) -> tuple[Any, Any]:
    """Write an (untrained) teacher checkpoint of ``cfg``; returns ``(model, reader)``."""
    store = open_store(cfg.data.dataset)
    reader = build_reader(cfg, store)
    torch.manual_seed(seed)
    model = build_model(cfg.teacher, reader, store)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(
        path,
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": val_mae, "epoch": epoch},
        state=TrainState(epoch=epoch, best_val_mae=val_mae, best_epoch=epoch, **state),
        dataset=store.name,
        optimizer_state=opt.state_dict(),
        scheduler_state={"last_epoch": epoch},
    )
    return model, reader
