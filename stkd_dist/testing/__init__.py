"""Test and benchmark helpers: random stores, untrained teacher checkpoints, kills, window logs,
and a real service, an S3-compatible HTTP server.

* :func:`random_store`: a small Zarr store of smooth random series (and a random adjacency);
* :func:`untrained_teacher`: a checkpoint of an untrained LSTM teacher of a store (its labels
  are as deterministic as a trained one's; its width sets how slow it is);
* :func:`worker_pids`, :func:`kill_rank_after`: find a training rank's process from its status
  file and SIGKILL it once Ray registered a given checkpoint (as when its node dies);
  :func:`last_weights`: an experiment's final weights, to compare runs with ``torch.equal``;
* :class:`WindowLog`, :func:`trained_windows`: log the windows every step trains on, to count
  them on the data side;
* :func:`briefly_trained`: a model fitted for a few steps (it forecasts something, in a second);
* :class:`LocalSession`: run the epoch loop of one rank in the test's own process (no Ray),
  from scratch or from a checkpoint directory, keeping what it reports;
* :func:`wait_until`: wait for an observable event (a condition polled until a deadline), where
  a test would otherwise sleep and hope;
* :class:`S3Server` (:mod:`.s3`): a real S3-compatible HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import dask.array as da
import numpy as np
import pandas as pd
import torch

from stkd_dist.checkpoint import (
    CheckpointInfo,
    TrainState,
    list_checkpoints,
    load_checkpoint_state,
    read_checkpoint,
    save_checkpoint,
)
from stkd_dist.config import Config, DataSection, RunSection
from stkd_dist.data.reader import WindowReader
from stkd_dist.location import Location, PathInput, as_path
from stkd_dist.models import build_forecaster
from stkd_dist.storage import StoreMeta, open_store, write_store
from stkd_dist.testing.s3 import S3Server as S3Server  # re-exported: tests import it from here
from stkd_dist.train.session import write_checkpoint_dir


def random_store(
    path: Path,
    steps: int = 400,
    nodes: int = 6,
    channels: int = 2,
    chunk_steps: int = 64,
    missing: float = 0.05,
    seed: int = 0,
    locations: bool = False,
    overwrite: bool = False,
) -> Location:
    """Write a store of smooth random series with ``missing`` fraction masked.

    ``locations`` adds sensor coordinates (they do not change the data's fingerprint);
    ``overwrite`` replaces a store at ``path``.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None, None]
    base = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, size=(1, nodes, channels)))
    values = (base + rng.normal(0, 1, size=(steps, nodes, channels))).astype(np.float32)
    mask = rng.random((steps, nodes, channels)) >= missing
    adj = (rng.random((nodes, nodes)) < 0.4).astype(np.float32)
    np.fill_diagonal(adj, 1.0)
    meta = StoreMeta(
        name=path.stem,
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"n{i}" for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        adjacency=adj,
        provenance="random test data",
        locations=(
            np.stack([34.0 + 0.01 * np.arange(nodes), -118.3 - 0.01 * np.arange(nodes)], axis=1)
            if locations
            else None
        ),
    )
    chunks = (chunk_steps, nodes, channels)
    return write_store(
        path,
        da.from_array(values, chunks=chunks),
        da.from_array(mask, chunks=chunks),
        meta,
        chunks=chunks,
        overwrite=overwrite,
    )


def untrained_teacher(
    root: Path, store_path: Path, name: str, seed: int = 0, val_mae: float = 1.0, hidden: int = 8
) -> CheckpointInfo:
    """Checkpoint ``root/name`` of an untrained LSTM teacher (hidden size ``hidden``) of the
    store at ``store_path``, recording ``val_mae`` as its validation MAE."""
    store = open_store(store_path)
    cfg = Config(run=RunSection(name=name), data=DataSection(dataset=str(store_path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(seed)
    model = build_forecaster("lstm", reader.dims, target_scale=reader.target_scale(), hidden=hidden)
    return save_checkpoint(
        root / name,
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": val_mae},
        state=TrainState(epoch=0),
    )


T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        TimeoutError: naming ``what`` (the awaited event), when ``timeout`` seconds pass first.
            An exception from ``predicate`` propagates at once (e.g. an assertion that a
            process the test waits on is still running).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def worker_pids(experiment: Path, since: float) -> list[int]:
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


def registered(experiment: PathInput, marker: str) -> bool:
    """Whether Ray Train registered a checkpoint of ``experiment`` whose folder name contains
    ``marker`` (it is in Ray's checkpoint manager snapshot, so a restart resumes from it)."""
    try:
        return marker in (as_path(experiment) / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


def kill_rank_when(
    experiment: Path, rank: int, since: float, when: Callable[[], bool], timeout: float = 180
) -> tuple[list[int], threading.Thread]:
    """In a background thread: once ``when()`` holds, SIGKILL training rank ``rank`` of the
    worker group started after ``since`` (epoch seconds). Returns the list the killed PID lands
    in, and the thread."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if when():
                pids = worker_pids(experiment, since)
                if len(pids) > rank:
                    killed.append(pids[rank])
                    os.kill(pids[rank], signal.SIGKILL)
                    return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return killed, thread


def kill_rank_after(
    experiment: Path, marker: str, rank: int, since: float
) -> tuple[list[int], threading.Thread]:
    """:func:`kill_rank_when` Ray registered a checkpoint named with ``marker``."""
    return kill_rank_when(experiment, rank, since, lambda: registered(experiment, marker))


def last_weights(experiment: Path) -> dict[str, torch.Tensor]:
    """The weights of an experiment's newest checkpoint (an epoch's, never a mid-epoch one)."""
    latest = list_checkpoints(experiment)[-1]
    assert not latest.mid_epoch
    return load_checkpoint_state(latest.path)["model"]


class WindowLog:
    """A loss factory (``TrainJob.make_loss``) that logs what every training step trained on.

    It wraps ``make_loss`` and, on every call of the loss (one per optimiser step of a rank),
    appends one JSON line to ``<folder>/<pid>.jsonl``: the epoch, the step into the epoch (over
    every deal of a re-dealt epoch), the world size and the valid window indices of the batch.
    Tests count windows from it on the data side: what the loss really received, not what the
    training code says it planned. ``folder`` must be reachable from every worker (a local
    folder on a one-machine cluster).
    """

    def __init__(self, make_loss: Callable[[Any], Any], folder: PathInput) -> None:
        self.make_loss = make_loss
        self.folder = str(folder)

    def __call__(self, ctx: Any) -> _LoggedLoss:
        return _LoggedLoss(self.make_loss(ctx), Path(self.folder), ctx.world_size)


class _LoggedLoss:
    def __init__(self, inner: Any, folder: Path, world_size: int) -> None:
        self.inner = inner
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{os.getpid()}.jsonl"
        self.world_size = world_size
        self.epoch, self.step = -1, 0

    def begin_epoch(self, epoch: int, loader: Any) -> None:
        self.epoch = epoch
        self.step = sum(s for _, s in loader.plan.regroups) + loader.start_batch

    def __call__(self, batch: Any, pred: torch.Tensor) -> Any:
        line = {
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.world_size,
            "time": time.time(),
            "windows": batch.index[batch.valid].tolist(),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.step += 1
        return self.inner(batch, pred)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        return {}

    def partial(self) -> dict[str, Any]:
        return {}

    def restore(self, partial: dict[str, Any]) -> None:
        pass


def briefly_trained(model: Any, reader: WindowReader, steps: int = 15, lr: float = 1e-2) -> float:
    """Fit ``model`` (a Forecaster) on ``reader``'s training windows for ``steps`` Adam steps of
    16 windows (masked MAE); returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train = reader.windows("train")
    loss = torch.zeros(())
    for step in range(steps):
        batch = reader.batch([train[(step * 16 + i) % len(train)] for i in range(16)])
        pred = model(batch.x, batch.time_of_day, batch.day_of_week)
        loss = ((pred - batch.y).abs() * batch.mask).sum() / batch.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


class LocalSession:
    """A :class:`~stkd_dist.train.session.WorkerSession` of rank 0 of 1 on the CPU, in this
    process: ``run_worker(job, LocalSession())`` runs the same epoch loop Ray Train and Tune run.

    Args:
        checkpoint: a checkpoint directory to continue from (None: from scratch).
        stop_after: stop the loop (raise :class:`LocalSession.Stop`) after this many epochs'
            reports (None: run to the end).

    Attributes:
        reports: the metrics of every report (epochs and mid-epoch checkpoints), in order.
        weights: the model weights of each epoch's checkpoint, in order.
        infos: each epoch checkpoint's ``meta.json`` as read back (:class:`CheckpointInfo`).
    """

    class Stop(Exception):
        """Raised by :meth:`report` after ``stop_after`` epochs."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, checkpoint: Path | None = None, stop_after: int | None = None) -> None:
        self.checkpoint, self.stop_after = checkpoint, stop_after
        self.reports: list[dict[str, Any]] = []
        self.weights: list[dict[str, torch.Tensor]] = []
        self.infos: list[CheckpointInfo] = []

    def get_checkpoint(self) -> Any:
        """The checkpoint to continue from, as Ray Train would hand it over."""
        if self.checkpoint is None:
            return None
        from ray.train import Checkpoint

        return Checkpoint.from_directory(str(self.checkpoint))

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """One process: nothing to wrap."""
        return module

    def started(self, state: TrainState, model: Any, restored: Any) -> None:
        """Nothing to record at the start."""

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None, dir_name: str
    ) -> None:
        """Keep the metrics, and an epoch checkpoint's weights as its files hold them."""
        self.reports.append(dict(metrics))
        if checkpoint is None or "epoch" not in metrics:
            return
        tmp, _ = write_checkpoint_dir(checkpoint)
        try:
            self.weights.append(load_checkpoint_state(tmp)["model"])
            self.infos.append(read_checkpoint(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.stop_after is not None and len(self.weights) >= self.stop_after:
            raise self.Stop


def trained_windows(folder: Path) -> dict[int, list[int]]:
    """Per epoch, the windows whose steps the finished run kept, from :class:`WindowLog` files.

    Workers are grouped into worker groups by where they started (epoch and step) in the
    order they started; a group that resumed at a position discards what earlier groups
    trained from that position on (Ray restarted them from the checkpoint taken there).
    """
    runs = []
    for f in sorted(folder.glob("*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if lines:
            runs.append(lines)
    runs.sort(key=lambda lines: lines[0]["time"])
    kept: list[dict[str, Any]] = []
    starts = [(r[0]["epoch"], r[0]["step"], r[0]["world_size"]) for r in runs]
    for i, lines in enumerate(runs):
        start = starts[i]
        if i == 0 or start != starts[i - 1]:  # a new worker group: drop what it redoes
            kept = [x for x in kept if (x["epoch"], x["step"]) < start[:2]]
        kept.extend(lines)
    out: dict[int, list[int]] = {}
    for x in kept:
        out.setdefault(x["epoch"], []).extend(x["windows"])
    return out
