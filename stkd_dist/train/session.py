"""What the epoch loop asks of whatever runs it: a :class:`WorkerSession`.

The one epoch loop (:func:`stkd_dist.train.worker.run_worker`) trains the teacher, the students
and every sweep trial. What differs between them is small and lives here:

* :class:`RayTrainSession`: a Ray Train worker (one DDP rank of ``train-teacher``,
  ``train-student``, ``distill`` or a data-parallel sweep trial). It reports through
  ``ray.train.report`` (rank 0 with the checkpoint), wraps the model in DDP and records which
  process serves its rank.
* ``TuneSession`` (:mod:`stkd_dist.pipeline.tune_trial`): a one-process sweep trial running the
  loop inside its Tune function. It reports through ``ray.tune.report``, so that the trial
  scheduler sees every epoch, and records the trial's starts and stops.

Comments marked ``SYNC`` are collective calls that every rank must make, in the same order.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from stkd_dist.checkpoint import CheckpointInfo, TrainState, save_checkpoint
from stkd_dist.location import location, write_json_atomic

if TYPE_CHECKING:
    from ray.train import Checkpoint

    from stkd_dist.models import Forecaster
    from stkd_dist.train.loop import TrainJob


class WorkerSession(Protocol):
    """The runner of one rank of the epoch loop.

    Attributes:
        rank: this process's DDP rank.
        world_size: ranks training the model together.
        device: where this rank trains.
    """

    rank: int
    world_size: int
    device: torch.device

    def get_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to continue from (every rank gets the same one), or None."""
        ...

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` on :attr:`device`, wrapped for data-parallel training when needed."""
        ...

    def started(self, state: TrainState, model: Forecaster, restored: Restored) -> None:
        """Called once per start, after the restore and before the first step (``model``: the
        plain model, with the weights it continues from)."""
        ...

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None, dir_name: str
    ) -> None:
        """SYNC: every rank reports at the same points; rank 0 passes the checkpoint.

        ``checkpoint`` holds :func:`~stkd_dist.checkpoint.save_checkpoint`'s arguments;
        ``dir_name`` names the checkpoint's folder.
        """
        ...


@dataclass(frozen=True)
class Restored:
    """What a start continued from.

    Attributes:
        path: the checkpoint's path or URL (None: a fresh start).
        info: its metadata.
        lineage: the trial that wrote it (``metrics["trial"]``; None outside sweeps).
    """

    path: str | None = None
    info: CheckpointInfo | None = None
    lineage: str | None = None


def worker_identity(rank: int) -> dict[str, Any]:
    """``{rank, pid, host, node_id}`` of the calling process (``node_id`` None outside Ray)."""
    node_id: str | None = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # a record must never fail a start
        node_id = None
    return {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node_id": node_id}


def write_checkpoint_dir(checkpoint: dict[str, Any]) -> tuple[str, CheckpointInfo]:
    """Write ``checkpoint`` (``save_checkpoint``'s arguments) into a fresh local temp dir.

    The caller hands the folder to Ray, which copies it to the run's storage.
    """
    tmp = tempfile.mkdtemp(prefix="stkd-ckpt-")
    try:
        info = save_checkpoint(tmp, **checkpoint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, info


class RayTrainSession:
    """One Ray Train worker (``TorchTrainer``'s ``train_loop_per_worker``)."""

    def __init__(self, job: TrainJob) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.job = job
        self.rank: int = ctx.get_world_rank()
        self.world_size: int = ctx.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def get_checkpoint(self) -> Checkpoint | None:
        """The run's latest registered checkpoint; before the run has one, the job's start."""
        import ray.train

        return ray.train.get_checkpoint() or self.job.initial_checkpoint

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``prepare_model`` moves the module to the device and wraps it in DDP when the world
        has more than one rank; DDP broadcasts rank 0's parameters and registers the gradient
        all-reduce hooks."""
        import ray.train.torch

        return ray.train.torch.prepare_model(module)

    def started(self, state: TrainState, model: Forecaster, restored: Restored) -> None:
        """Record which process serves this rank in ``<experiment>/workers/rank-<r>.json``.

        Operators (and the fault-tolerance and multi-node tests) use it to find a rank's
        process, host and Ray node; it is rewritten whenever a worker group (re)starts.
        """
        folder = location(self.job.experiment_dir) / "workers"
        write_json_atomic(
            folder / f"rank-{self.rank}.json",
            {
                **worker_identity(self.rank),
                "world_size": self.world_size,
                "attempt": state.attempt,
                "resumed_after_epoch": state.epoch,
                "resumed_at_step": state.epoch_step,
                "regroups": [list(g) for g in state.regroups],
                "restored_from": restored.path,
                "started": time.time(),
            },
        )

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None, dir_name: str
    ) -> None:
        """SYNC: every rank calls this at the same point (``ray.train.report`` is a barrier).

        Rank 0 (``checkpoint`` given) writes the checkpoint into a fresh local temp dir; Ray
        copies it to the run storage (in a background thread with ``checkpoint.upload: async``,
        while training goes on), deletes the temp dir, and registers the checkpoint only once
        the copy is complete. The others report the metrics alone.
        """
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        if self.rank != 0 or checkpoint is None:
            ray.train.report(metrics, checkpoint=None)
            return
        tmp, info = write_checkpoint_dir(checkpoint)  # Ray deletes it once uploaded
        metrics["version"] = info.version
        asynchronous = self.job.config.checkpoint.upload == "async"
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(tmp),
            checkpoint_dir_name=dir_name,
            checkpoint_upload_mode=(
                CheckpointUploadMode.ASYNC if asynchronous else CheckpointUploadMode.SYNC
            ),
            delete_local_checkpoint_after_upload=True,
        )
        if not asynchronous:
            # normally gone already; left when Ray skipped the report (a worker failed meanwhile)
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "RayTrainSession",
    "Restored",
    "WorkerSession",
    "worker_identity",
    "write_checkpoint_dir",
]
