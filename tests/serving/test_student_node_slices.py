"""A student distilled from labels that arrive in node slices: a PEMS-size window (300 nodes,
H = 12: 14.4 KB of labels) through 8 KB messages, on a real local Ray cluster (one DDP worker)
and a real teacher server on 127.0.0.1; and a limit below one node's labels as a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

from stkd_dist.config import Config, load_config
from stkd_dist.data.plan import make_plan
from stkd_dist.errors import StkdError
from stkd_dist.labels.teachers import TeacherSpec
from stkd_dist.serving import codec_slices
from stkd_dist.serving.client import ClientOptions
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import load_teacher
from stkd_dist.storage import open_store
from stkd_dist.testing import random_store
from stkd_dist.train.loop import build_reader
from stkd_dist.train.student import StudentRequest, delivery_path, train_student
from tests.train.student_env import CONFIG, save_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 300
WINDOW_BYTES = 12 * NODES * 1 * 4  # [H, N, C_out] float32: 14,400 bytes
EPOCHS = 2
# the limit of tests/train/student_env.py, now below one window: 3 slices per window
OPTIONS = ClientOptions(max_message_bytes=8192, prefetch=2)


@dataclass(frozen=True)
class Env:
    config: Path
    checkpoint: Path
    store: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pems-size")
    store = random_store(root / "pems.zarr", steps=300, nodes=NODES, channels=1, chunk_steps=64)
    teacher = save_teacher(root, store, "teach-pems", 1, 2.0)
    text = CONFIG.replace("DATASET", json.dumps(str(store)))
    config = root / "student.yaml"
    config.write_text(text.replace("EPOCHS", str(EPOCHS)).replace("WORLD", "1"))
    return Env(config, teacher.path, store)


@pytest.fixture(scope="module")
def cluster(env: Env) -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)  # after the store is written (Dask threads)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server(env: Env) -> Iterator[TeacherServer]:
    srv = TeacherServer(load_teacher(env.checkpoint, env.store), ServerConfig())
    srv.start()
    yield srv
    srv.stop()


def _config(env: Env, run: str) -> Config:
    return load_config(env.config, [f"run.name={run}"])


def test_student_trains_on_windows_split_into_node_slices(
    cluster: None, env: Env, server: TeacherServer, tmp_path: Path
) -> None:
    assert OPTIONS.max_message_bytes < WINDOW_BYTES  # a whole window did not fit: it used to fail
    layout = codec_slices.chunk_layout((12, NODES, 1), "float32", 1, OPTIONS.max_message_bytes)
    assert layout.split and -(-NODES // layout.nodes) == 3  # 148 + 148 + 4 nodes
    cfg = _config(env, "sliced")
    request = StudentRequest(teachers=(TeacherSpec("stream", server.address),), client=OPTIONS)
    out = train_student(cfg, request, storage=tmp_path / "storage", echo=lambda _: None)
    assert out.trained and out.epochs_done == EPOCHS
    reader = build_reader(cfg, open_store(cfg.data.dataset))
    windows = reader.windows("train")
    delivered = 0
    for epoch in range(EPOCHS):
        plan = make_plan(
            windows,
            reader.store.chunks[0],
            1,
            epoch=epoch,
            seed=cfg.run.seed,
            batch_size=cfg.data.batch_size,
            shuffle=True,
        )
        rec = json.loads(delivery_path(out.experiment, epoch, 0).read_text())
        (t,) = rec["teachers"]
        # every window of the epoch once, each one whole (one chunk) after its 3 slices
        assert t["requested"] == t["delivered"] == len(plan.rank_windows(0)) == len(windows)
        assert t["chunks"] == t["delivered"] and t["bytes"] == t["delivered"] * WINDOW_BYTES
        assert t["reconnects"] == 0 and t["checksum_failures"] == 0
        delivered += t["delivered"]
    assert server.metrics.value("stkd_serve_bytes_total") == delivered * WINDOW_BYTES


def test_a_limit_below_one_node_row_fails_the_run_clearly(
    cluster: None, env: Env, server: TeacherServer, tmp_path: Path
) -> None:
    """The worker's refusal reaches the driver as a one-line user error (it used to arrive as
    ``TypeError: TeacherRequestError.__init__() missing 1 required positional argument``)."""
    minimum = codec_slices.min_message_bytes((12, NODES, 1), "float32", 1)
    request = StudentRequest(
        teachers=(TeacherSpec("stream", server.address),),
        client=ClientOptions(max_message_bytes=minimum - 1),
    )
    with pytest.raises(StkdError) as info:
        train_student(
            _config(env, "too-small"), request, storage=tmp_path / "storage", echo=lambda _: None
        )
    text = str(info.value)
    assert "INVALID_ARGUMENT" in text and "max_message_bytes" in text
    assert f"the minimum is {minimum} bytes" in text and "TypeError" not in text
