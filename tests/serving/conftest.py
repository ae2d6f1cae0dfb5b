"""Fixtures of the serving tests: a small store, a trained-shape teacher checkpoint, servers.

* ``teacher_env``: a store (600 steps, 5 nodes, 2 channels) and a checkpoint of a small ``lstm``
  teacher with spread, written with the real ``save_checkpoint`` (session scope).
* ``direct``: the same teacher loaded in this process, for reference labels.
* ``split_labels``: ``direct``'s labels and spread of every train and val window (session scope).
* ``server_factory``: starts in-process servers on 127.0.0.1 and free ports (stopped afterwards).
* ``spawn_servers``: runs ``stkd serve`` in subprocesses and waits until they are ready.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch

from stkd_dist.checkpoint import TrainState, save_checkpoint
from stkd_dist.config import Config, DataSection, RunSection
from stkd_dist.data.reader import WindowReader
from stkd_dist.models import build_forecaster
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.server import ServerConfig, TeacherServer
from stkd_dist.serving.teacher import Teacher, load_teacher
from stkd_dist.storage import StoreMeta, open_store, write_store

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TeacherEnv:
    """Paths and identity of the test teacher."""

    root: Path
    store: Path
    checkpoint: Path
    fingerprint: str
    version: str


def _write_store(path: Path, steps: int = 600, nodes: int = 5, channels: int = 2) -> Path:
    rng = np.random.default_rng(7)
    t = np.arange(steps)[:, None, None]
    values = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, (1, nodes, channels)))
    values = (values + rng.normal(0, 1, (steps, nodes, channels))).astype(np.float32)
    mask = rng.random((steps, nodes, channels)) >= 0.05
    meta = StoreMeta(
        name=path.stem,
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        provenance="serving test data",
    )
    chunks = (64, nodes, channels)
    return write_store(
        path,
        da.from_array(values, chunks=chunks),
        da.from_array(mask, chunks=chunks),
        meta,
        chunks=chunks,
    )


@pytest.fixture(scope="session")
def teacher_env(tmp_path_factory: pytest.TempPathFactory) -> TeacherEnv:
    """A store and a teacher checkpoint made with the project's own writers."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serving")
    store_path = _write_store(root / "ds.zarr")
    store = open_store(store_path)
    cfg = Config(run=RunSection(name="serve-test"), data=DataSection(dataset=str(store_path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(0)
    model = build_forecaster(
        "lstm", reader.dims, target_scale=reader.target_scale(), hidden=8, layers=1, spread=True
    )
    info = save_checkpoint(
        root / "ckpt",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": 1.0},
        state=TrainState(epoch=0),
    )
    return TeacherEnv(root, store_path, info.path, store.fingerprint, info.version)


@pytest.fixture(scope="session")
def direct(teacher_env: TeacherEnv) -> Teacher:
    """The teacher loaded in the test process: the reference for served labels."""
    return load_teacher(teacher_env.checkpoint, teacher_env.store)


@pytest.fixture
def server_factory(
    teacher_env: TeacherEnv,
) -> Iterator[Callable[..., TeacherServer]]:
    """``make(cache=None, write_through=False, teacher=None, **ServerConfig fields) -> started
    server``; ``teacher``: keyword arguments of ``load_teacher`` (``micro_batch``, ``device``...).
    """
    servers: list[TeacherServer] = []

    def make(
        cache: LabelCache | None = None,
        write_through: bool = False,
        teacher: dict[str, object] | None = None,
        **cfg: object,
    ) -> TeacherServer:
        loaded = load_teacher(teacher_env.checkpoint, teacher_env.store, **(teacher or {}))  # type: ignore[arg-type]
        cfg.setdefault("drain_grace_s", 1.0)
        server = TeacherServer(loaded, ServerConfig(**cfg), cache, write_through)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


@dataclass
class ServerProcess:
    """A ``stkd serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def spawn_servers(
    teacher_env: TeacherEnv, tmp_path: Path
) -> Iterator[Callable[..., list[ServerProcess]]]:
    """``spawn(*extra_args, count=1) -> [ServerProcess]``: ``stkd serve`` on free ports.

    The processes start together and the call returns when all are serving; leftovers are
    killed at teardown.
    """
    procs: list[ServerProcess] = []

    def spawn(*extra: str, count: int = 1, timeout: float = 90.0) -> list[ServerProcess]:
        started = []
        for _ in range(count):
            n = len(procs) + len(started)
            ready = tmp_path / f"ready-{n}.json"
            log = tmp_path / f"serve-{n}.log"
            cmd = [
                sys.executable, "-m", "stkd_dist.cli", "serve",
                "--checkpoint", str(teacher_env.checkpoint), "--data", str(teacher_env.store),
                "--port", "0", "--threads", "1", "--ready-file", str(ready), *extra,
            ]  # fmt: skip
            env = {**os.environ, "STKD_STORAGE": str(teacher_env.root / "storage")}
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env
                )
            started.append((proc, ready, log))
        deadline = time.monotonic() + timeout
        out_procs = []
        for proc, ready, log in started:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    for p, _, _ in started:
                        p.kill()
                    raise RuntimeError(f"stkd serve did not start:\n{log.read_text()}")
                time.sleep(0.05)
            out_procs.append(ServerProcess(proc, json.loads(ready.read_text())["address"], log))
        procs.extend(out_procs)
        return out_procs

    yield spawn
    for sp in procs:
        if sp.proc.poll() is None:
            sp.proc.send_signal(signal.SIGKILL)
        sp.proc.wait(10)


@pytest.fixture(scope="session")
def split_labels(direct: Teacher) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The live teacher's labels of every window of train and val (the bits a cache must hold)."""
    out = {}
    for split in ("train", "val"):
        got = direct.predict(np.asarray(direct.meta.splits[split]))
        pred, spread = got.prediction, got.spread
        assert spread is not None
        out[split] = (pred, spread)
    return out
