"""The Ray side of training: connecting to a cluster and watching a run's reports.

* :func:`ray_cluster` connects to ``cluster.address`` / ``$RAY_ADDRESS`` or starts a local cluster
  for the duration of a command (Ray's token authentication, on by default, needs nothing from us:
  the local cluster and this driver share the generated token).
* :class:`EpochReporter` is a Ray Train callback; it runs in the Ray Train controller after every
  round of ``ray.train.report`` calls, sees the metrics of *all* ranks, prints one progress line per
  epoch and appends them to ``<experiment>/history.jsonl``. It also checks that every rank reports
  the same parameter digest, which is what DDP guarantees after each optimiser step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.train import UserCallback

from stkd_dist.config import ClusterSection
from stkd_dist.location import PathInput, append_text, exists, location, read_text, url

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"


def cluster_address(cluster: ClusterSection) -> str | None:
    """The Ray address to connect to: the config's, else ``$RAY_ADDRESS``, else None (local)."""
    return cluster.address or os.environ.get("RAY_ADDRESS") or None


@contextlib.contextmanager
def ray_cluster(cluster: ClusterSection) -> Iterator[str]:
    """Use the configured Ray cluster for the duration of the block.

    Yields a description of the cluster. An already initialised Ray (a test's or a notebook's)
    is used as it is and left running; a cluster this function connected to or started is shut
    down at the end.
    """
    if ray.is_initialized():
        yield "the Ray cluster this process is connected to"
        return
    address = cluster_address(cluster)
    if address:
        ray.init(address=address, log_to_driver=True)
        where = f"the Ray cluster at {address}"
    else:
        # A local cluster gets at least every core, and enough CPUs for all workers even on a
        # smaller machine (the workers then share cores instead of waiting forever for resources).
        need = cluster.max_workers * cluster.cpus_per_worker
        ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False)
        where = f"a local Ray cluster ({max(need, os.cpu_count() or 1)} CPUs)"
    try:
        yield where
    finally:
        ray.shutdown()


def format_epoch(m: dict[str, Any], epochs: int) -> str:
    """One progress line: epoch, train loss, val MAE, samples/s, lr."""
    best = "*" if m.get("best_epoch") == m.get("epoch") else " "
    return (
        f"epoch {m['epoch'] + 1:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"val_mae {m['val_mae']:.4f}{best} val_rmse {m['val_rmse']:.4f}  "
        f"{m['samples_per_s']:.0f} samples/s  lr {m['lr']:.2e}  ({m['epoch_time_s']:.1f}s)"
    )


class EpochReporter(UserCallback):
    """Prints a line per epoch and appends every rank's metrics to ``history.jsonl``.

    Runs inside the Ray Train controller (Ray calls :meth:`after_report` once all ranks reported);
    its prints reach the driver's terminal through Ray's log forwarding.

    Args:
        experiment: the experiment directory (``<run>/<experiment name>``).
        epochs: the configured number of epochs (for the ``epoch i/N`` display).
    """

    def __init__(self, experiment: str, epochs: int) -> None:
        self.experiment = experiment
        self.epochs = epochs

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        head = metrics[0]
        digests = [m.get("param_digest") for m in metrics]
        in_sync = len(set(digests)) == 1
        record = {
            **{k: v for k, v in head.items() if k != "param_digest"},
            "time": time.time(),
            "checkpoint": None if checkpoint is None else Path(checkpoint.path).name,
            "param_digests": digests,
            "ranks_in_sync": in_sync,
        }
        # one small line per epoch: on an object store the object is rewritten whole
        append_text(location(self.experiment) / HISTORY, json.dumps(record) + "\n")
        print(format_epoch(head, self.epochs), flush=True)
        if not in_sync:
            print(
                f"WARNING: ranks disagree on the model parameters after epoch {head['epoch']} "
                f"({digests}); data-parallel training is broken",
                file=sys.stderr,
                flush=True,
            )


def read_history(experiment: PathInput) -> list[dict[str, Any]]:
    """The records :class:`EpochReporter` appended, oldest first (empty if none)."""
    path = location(experiment) / HISTORY
    if not exists(path):
        return []
    out = []
    for line in read_text(path).splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                log.warning("skipping a damaged line of %s", url(path))
    return out
