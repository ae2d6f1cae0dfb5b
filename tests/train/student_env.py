"""The world of the distilled-student tests on Ray: a tiny store, two LSTM teacher checkpoints,
the test's student config, ``stkd serve`` subprocesses, and the checks every test shares.

The fixtures ``env`` (module), ``ray_local`` (module: a 2-CPU local Ray cluster) and ``spawn``
are registered by ``tests/train/conftest.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

from stkd_dist.checkpoint import (
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint_state,
)
from stkd_dist.config import Config, load_config
from stkd_dist.data.plan import make_plan
from stkd_dist.serving.client import ClientOptions
from stkd_dist.storage import open_store
from stkd_dist.testing import untrained_teacher
from stkd_dist.train.loop import build_reader
from stkd_dist.train.student import delivery_path

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
WORLD = 2
# small label chunks (~13 windows) so that each rank's stream of an epoch has several chunks
OPTIONS = ClientOptions(max_message_bytes=8192, prefetch=2)


# The test's own config (presets may change): the windows and splits of the teachers below.
CONFIG = """\
run: {seed: 0, keep_best: 2}
data:
  dataset: DATASET
  input_steps: 12
  horizon: 12
  stride: 1
  split: {train: 0.7, val: 0.1, test: 0.2}
  batch_size: 16
  eval_batch_size: 64
student:
  model: mlp
  kwargs: {embed_dim: 16, node_dim: 8, tod_dim: 4, dow_dim: 4, num_layers: 1}
  optim: {lr: 0.003, weight_decay: 0.0001, grad_clip: 5.0}
  schedule: {epochs: EPOCHS, warmup_epochs: 1, kind: cosine, min_lr: 0.0001}
distill: {loss: regression, alpha: 0.5, beta: 0.0, ensemble: mean}
cluster: {num_workers: WORLD, cpus_per_worker: 1, torch_threads: 1, max_failures: 0}
"""


@dataclass(frozen=True)
class Env:
    root: Path
    store: Path
    ckpt: dict[str, Path]
    version: dict[str, str]
    config: Path


def save_teacher(
    root: Path, store_path: Path, name: str, seed: int, val_mae: float, hidden: int = 8
) -> CheckpointInfo:
    """An untrained LSTM teacher checkpoint ``root/name`` of the store (hidden size ``hidden``)."""
    return untrained_teacher(root, store_path, name, seed, val_mae, hidden)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    from tests.conftest import random_store

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("student")
    store = random_store(root / "tiny.zarr", steps=400, nodes=6, chunk_steps=64)
    infos = {
        "a": save_teacher(root, store, "teach-a", 1, 2.0),
        "b": save_teacher(root, store, "teach-b", 2, 4.0),
    }
    text = CONFIG.replace("DATASET", json.dumps(str(store)))
    config = root / "student.yaml"
    config.write_text(text.replace("EPOCHS", str(EPOCHS)).replace("WORLD", str(WORLD)))
    return Env(
        root,
        store,
        {k: i.path for k, i in infos.items()},
        {k: i.version for k, i in infos.items()},
        config,
    )


@pytest.fixture(scope="module")
def ray_local(env: Env) -> Iterator[None]:
    # the store is written first, with Dask's threaded scheduler (no Ray connected yet)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@dataclass
class Server:
    """A ``stkd serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path
    metrics_port: int | None

    def output(self) -> str:
        return self.log.read_text()

    def _counter(self, name: str) -> float:
        """The sum of a Prometheus counter's series on the server's metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    def bytes_sent(self) -> float:
        """Label bytes the server has sent so far (its Prometheus counter)."""
        return self._counter("stkd_serve_bytes_total")

    def windows_sent(self) -> int:
        """Windows the server has streamed so far, from any source (its Prometheus counter)."""
        return int(self._counter("stkd_serve_windows_total"))


@pytest.fixture
def spawn(env: Env, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``spawn(checkpoint, *extra_args) -> Server``: ``stkd serve`` on a free port, one thread."""
    procs: list[Server] = []

    def start(checkpoint: Path, *extra: str) -> Server:
        n = len(procs)
        ready, log = tmp_path / f"ready-{n}.json", tmp_path / f"serve-{n}.log"
        cmd = [
            sys.executable, "-m", "stkd_dist.cli", "serve", "--checkpoint", str(checkpoint),
            "--data", str(env.store), "--port", "0", "--threads", "1",
            "--ready-file", str(ready), *extra,
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 90
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"stkd serve did not start:\n{log.read_text()}")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        server = Server(proc, info["address"], log, info.get("metrics_port"))
        procs.append(server)
        return server

    yield start
    for s in procs:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)


def config(env: Env, run: str) -> Config:
    return load_config(env.config, [f"run.name={run}"])


def signal_first_sender(
    servers: tuple[Server, ...], sig: int
) -> tuple[list[Server], threading.Thread]:
    """Send ``sig`` to the first of ``servers`` whose label bytes counter moves (observed over
    its metrics endpoint), as soon as it does; returns the list it lands in and the
    watching thread."""
    hit: list[Server] = []

    def watch() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for server in servers:
                if server.bytes_sent() > 0:
                    server.proc.send_signal(sig)
                    hit.append(server)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return hit, thread


def final_weights(experiment: Path) -> dict[str, torch.Tensor]:
    latest = list_checkpoints(experiment)[-1]
    assert latest.epoch == EPOCHS - 1
    return load_checkpoint_state(latest.path)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bitwise


def deliveries(experiment: Path, cfg: Config, teachers: int = 1) -> list[list[dict]]:
    """Per epoch, every rank's delivery record, checked against the shard plan of that epoch."""
    reader = build_reader(cfg, open_store(cfg.data.dataset))
    windows = reader.windows("train")
    out = []
    for epoch in range(EPOCHS):
        plan = make_plan(
            windows,
            reader.store.chunks[0],
            WORLD,
            epoch=epoch,
            seed=cfg.run.seed,
            batch_size=cfg.data.batch_size,
            shuffle=True,
        )
        records = []
        for rank in range(WORLD):
            rec = json.loads(delivery_path(experiment, epoch, rank).read_text())
            n = len(plan.rank_windows(rank))
            assert rec["plan_windows"] == n
            assert len(rec["teachers"]) == teachers
            for t in rec["teachers"]:
                # every window of the rank's shard asked for and delivered exactly once
                assert t["requested"] == t["delivered"] == n, t
            records.append(rec)
        # and the shards cover the split: every window once per epoch, across ranks
        assert sum(r["plan_windows"] for r in records) == len(windows)
        out.append(records)
    return out
