"""A data-parallel sweep trial: one Ray Train run inside the trial's Tune function.

With ``sweep.trial_workers: N > 1`` each start of a trial launches a ``TorchTrainer`` of ``N``
workers running the one epoch loop (:func:`stkd_dist.train.worker.run_worker`, the same as
``train-student``), the Ray 2.x pattern of a Tune function per trial that drives a trainer. Ray
Train places the workers (``sweep.cpus_per_worker`` CPUs and ``sweep.gpus_per_worker`` GPUs
each) wherever the cluster has room, in a placement group of their own: the trial's Tune actor
itself reserves nothing, so the number of trials training at once follows the cluster's free
resources as they change, and a trial whose workers do not fit yet waits for them.

:class:`TrialForwarder`, a Ray Train callback in the run's controller, hands each epoch's
report (every rank's metrics and the checkpoint Ray Train registered) to the Tune function
through a Ray queue, and waits for the function's answer on a second one: training stays in
lockstep with what Tune has seen, as in a one-process trial. The Tune function reports the
epoch with the checkpoint (:class:`~.trial_report.TrialReporter`), where a scheduler may stop
the trial or PBT pause it; only when Tune lets the trial go on does it answer. A stopped trial's actor ends, and with it the
controller, its workers and their placement group, which are fate-shared with it.

A start begins a fresh run (``start-<id>``) from Tune's checkpoint of the trial, handed to the
workers as the job's initial checkpoint. A worker failure is not retried inside the run: it
fails the trial, which Tune restarts from its latest checkpoint (``sweep.max_failures``).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from typing import Any

from ray.train import UserCallback
from ray.train.torch import TorchConfig
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.torch.torch_trainer import TorchTrainer
from ray.util.queue import Empty, Queue

from stkd_dist.checkpoint import TrainState, load_checkpoint_state, read_checkpoint
from stkd_dist.location import Location, exists, pyarrow_filesystem, read_json
from stkd_dist.pipeline.trial_records import state_digest
from stkd_dist.pipeline.trial_report import TrialReporter
from stkd_dist.train.loop import TrainJob
from stkd_dist.train.session import Restored
from stkd_dist.train.worker import worker_entry

#: how long the Tune function waits for the next report before it looks at the run again
_POLL_S = 1.0
#: How long a trial's Ray Train run waits for room for its workers: as long as it takes (a
#: week). Ray Train's default (60 s) gives up and asks again, and under contention the
#: placement group of the attempt it gave up on is granted later to no one and holds its CPUs,
#: so trials queued behind others would starve the cluster. Propagated to the run's controller.
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
_START_TIMEOUT_S = 7 * 24 * 3600


class TrialForwarder(UserCallback):
    """Ray Train callback (in the run's controller): each epoch's report to the Tune function.

    SYNC: every rank is held in ``ray.train.report`` until this returns, which is once the Tune
    function answered on ``acks`` (after ``tune.report`` returned), so no rank starts the next
    epoch before Tune decided on this one. Mid-epoch reports (no ``epoch``) are Ray Train's own.
    """

    def __init__(self, reports: Queue, acks: Queue) -> None:
        self.reports = reports
        self.acks = acks

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if metrics and "epoch" in metrics[0]:
            self.reports.put({"metrics": metrics, "checkpoint": checkpoint})
            self.acks.get()


def _restored(job: TrainJob) -> tuple[Restored, str | None]:
    """What the start continues from, and a digest of the model weights it loads."""
    start = job.initial_checkpoint
    if start is None:
        return Restored(), None
    with start.as_directory() as d:
        info = read_checkpoint(d)
        weights = load_checkpoint_state(d)["model"]
    lineage = info.metrics.get("trial")
    return Restored(start.path, info, None if lineage is None else str(lineage)), state_digest(
        weights
    )


def _workers(folder: Location, world: int) -> list[dict[str, Any]]:
    """``{rank, pid, node_id}`` of each worker of this start, from their status files.

    Read at the run's first report: every rank rewrites its file before it trains, and a
    report is a barrier of all ranks, so the files are this start's (no clocks compared).
    """
    out = []
    for rank in range(world):
        path = folder / "workers" / f"rank-{rank}.json"
        if exists(path):
            record = read_json(path)
            out.append({k: record.get(k) for k in ("rank", "pid", "node_id")})
    return out


def fit_trial(
    job: TrainJob,
    reporter: TrialReporter,
    trial_dir: Location,
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
) -> None:
    """Train one start of a trial on a Ray Train run of ``workers`` workers; see the module."""
    os.environ.setdefault(_START_TIMEOUT_ENV, str(_START_TIMEOUT_S))
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
    filesystem, storage_path = pyarrow_filesystem(trial_dir / "train")
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"start-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            # a failed worker fails the trial; Tune restarts it from its own checkpoint
            failure_config=FailureConfig(max_failures=0),
            # Tune keeps the trial's checkpoints; the run needs only its latest
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TrialForwarder(reports, acks)],
        ),
    )
    restored, digest = _restored(job)
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the Tune function below
            failure.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="trial-train", daemon=True)
    thread.start()
    last: dict[str, Any] | None = None
    while not (done.is_set() and reports.empty()):
        try:
            item = reports.get(timeout=_POLL_S)
        except Empty:  # nothing yet: look at the run again
            continue
        head: dict[str, Any] = item["metrics"][0]  # rank 0's
        if not reporter.logged:
            found = _workers(trial_dir, workers)
            reporter.log_start(_start_state(restored), restored, digest, found)
        last = head
        reporter.report_epoch(head, item["checkpoint"])  # returns if Tune lets the trial go on
        acks.put(True)
    thread.join()
    if failure:
        raise failure[0]
    if not reporter.logged:  # nothing left to train: restored at its end, or stopped early
        reporter.log_start(_start_state(restored), restored, digest, [])
    reporter.finish(_start_state(restored) if last is None else _state_after(last))


def _start_state(restored: Restored) -> TrainState:
    """The training state a start begins with (a fresh one without a checkpoint)."""
    if restored.info is None:
        return TrainState()
    return dataclasses.replace(restored.info.state, attempt=restored.info.state.attempt + 1)


def _state_after(metrics: dict[str, Any]) -> TrainState:
    """The training state after the last reported epoch (for the trial's end record)."""
    return TrainState(epoch=int(metrics["epoch"]), stopped_early=bool(metrics["stopped_early"]))


__all__ = ["TrialForwarder", "fit_trial"]
