"""The STAEformer teacher under DDP: 2 gloo workers on a local Ray cluster stay identical."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from stkd_dist.checkpoint import load_forecaster
from stkd_dist.config import load_config
from stkd_dist.train.ray_session import read_history
from stkd_dist.train.teacher import train_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "input_dim": 4,
    "tod_dim": 4,
    "dow_dim": 2,
    "adaptive_dim": 2,
    "ff_dim": 8,
    "heads": 2,
    "temporal_layers": 1,
    "spatial_layers": 1,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import random_store

    return random_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", steps=400, nodes=6, chunk_steps=64
    )


@pytest.fixture(scope="module")
def ray_local(store: Path) -> Iterator[None]:
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ddp_ranks_stay_identical(ray_local: None, store: Path, tmp_path: Path) -> None:
    root = tmp_path / "storage"
    cfg = load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            "data.batch_size=16",
            "teacher.model=staeformer",
            f"teacher.kwargs={json.dumps(TINY)}",
            "teacher.schedule.epochs=2",
            "run.name=stae",
            "cluster.num_workers=2",
        ],
    )
    out = train_teacher(cfg, storage=root, echo=lambda s: None)
    history = read_history(root / "runs" / "stae" / "teacher")
    assert [h["epoch"] for h in history] == [0, 1] and out.epochs_done == 2
    assert history[0]["param_digests"][0] != history[1]["param_digests"][0]  # training moved them
    for h in history:
        assert len(h["param_digests"]) == 2
        assert h["param_digests"][0] == h["param_digests"][1], h
    model, _ = load_forecaster("stae", storage=root)
    assert model.key == "staeformer"
