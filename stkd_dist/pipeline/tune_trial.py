"""One sweep trial: the Tune function trainable, an adapter around the one epoch loop.

A trial trains a student with the sweep's config and its sampled settings
(:func:`trial_config`) through :func:`stkd_dist.train.worker.run_worker`, the loop of
``train-teacher`` and ``train-student``: the same model and optimiser setup, the distillation
loss of the student trainer (:func:`stkd_dist.train.student.make_distill_loss`, soft labels
joined to each batch by window index), the same restore, validation, early stopping and
checkpoint format. What differs is the session the loop runs in:

* ``sweep.trial_workers: 1``: :class:`TuneSession`, the loop in the trial's own process (one
  Tune actor with ``sweep.cpus_per_worker`` CPUs and ``sweep.gpus_per_worker`` GPUs): a small
  student trains fastest without data-parallel synchronisation;
* ``sweep.trial_workers: N > 1``: a Ray Train run of ``N`` DDP workers
  (:mod:`.trial_train`), whose reports are forwarded to this function.

Either way every epoch ends with ``ray.tune.report(metrics, checkpoint=...)``
(:class:`~.trial_report.TrialReporter`), where ASHA may stop the trial at a rung and PBT pause
it and hand it another trial's checkpoint. A restored trial (after a crash, a resumed sweep, a
PBT pause or exploit) continues from the checkpoint Tune gives it (``tune.get_checkpoint()``);
one taken from another trial also starts a new early-stopping count and takes the trial's own
optimiser settings (the job's ``lineage``). The trial keeps records of itself
(:mod:`.trial_records`): each start and, when it ends itself, why.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from stkd_dist.checkpoint import TrainState
from stkd_dist.config import Config
from stkd_dist.config.sweep import ParamSpec
from stkd_dist.labels.teachers import LabelSpec, TeacherSpec
from stkd_dist.location import location, makedirs
from stkd_dist.models import Forecaster
from stkd_dist.pipeline.trial_records import ROLE, TIME_ATTR, read_starts, state_digest
from stkd_dist.pipeline.trial_report import TrialReporter, finite
from stkd_dist.pipeline.trial_train import fit_trial
from stkd_dist.pipeline.tune_space import apply_params, sampled
from stkd_dist.train.loop import TrainJob
from stkd_dist.train.session import Restored, worker_identity, write_checkpoint_dir
from stkd_dist.train.student import make_distill_loss
from stkd_dist.train.worker import run_worker


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled settings (picklable, sent to each trial).

    Attributes:
        config: the sweep's resolved config; each trial applies its sampled settings to it.
        specs: the parsed search space.
        dataset: absolute path of the store.
        records: absolute folder of the trials' own records (``<records>/<trial id>/``: the
            ``starts.jsonl`` of each start and the label delivery records of each epoch). Tune's
            trial directories are not used for them: a trial writes to a working copy that Tune
            syncs only at times of its choosing.
        teacher: where the trials' soft labels come from (the sweep's label cache, checked
            against the student's windows on the driver, version pinned).
        fingerprint: the dataset fingerprint the labels belong to.
        workers: the trial's data-parallel workers (``sweep.trial_workers``).
        cpus_per_worker: CPUs (and torch threads) of each worker.
        gpus_per_worker: GPUs of each worker (0: train on CPU).
    """

    config: Config
    specs: tuple[ParamSpec, ...]
    dataset: str
    records: str
    teacher: TeacherSpec
    fingerprint: str
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0


def trial_config(job: TrialJob, params: Mapping[str, Any]) -> Config:
    """The config of the trial with sampled ``params``.

    Its student trains ``sweep.max_epochs`` epochs with ``sweep.cpus_per_worker`` torch threads
    per worker, and takes no mid-epoch checkpoints: the trial's unit of restore is Tune's epoch
    checkpoint.
    """
    cfg = apply_params(job.config, sampled(params, job.specs))
    schedule = dataclasses.replace(cfg.student.schedule, epochs=cfg.sweep.max_epochs)
    return dataclasses.replace(
        cfg,
        student=dataclasses.replace(cfg.student, schedule=schedule),
        cluster=dataclasses.replace(cfg.cluster, torch_threads=job.cpus_per_worker),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=0, every_minutes=0.0),
    )


class TuneSession:
    """The epoch loop's session in a one-process trial: rank 0 of 1, reporting to Tune."""

    def __init__(self, job: TrainJob, reporter: TrialReporter, use_gpu: bool) -> None:
        self.job = job
        self.reporter = reporter
        self.rank = 0
        self.world_size = 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.state = TrainState()

    def get_checkpoint(self) -> Any:
        """Tune's checkpoint of the trial (or a PBT donor's), or None."""
        return self.job.initial_checkpoint

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """One process: the module on the device, nothing to synchronise."""
        return module.to(self.device)

    def started(self, state: TrainState, model: Forecaster, restored: Restored) -> None:
        """Log the start with the digest of the weights the model now holds."""
        self.state = state  # the loop updates it in place, epoch after epoch
        self.reporter.num_params = model.num_params()
        digest = state_digest(model.state_dict()) if restored.path is not None else None
        identity = worker_identity(0)
        workers = [{k: identity[k] for k in ("rank", "pid", "node_id")}]
        self.reporter.log_start(state, restored, digest, workers)

    def report(
        self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None, dir_name: str
    ) -> None:
        """An epoch's report to Tune with its checkpoint (Tune copies it before returning)."""
        from ray import tune

        if checkpoint is None or "epoch" not in metrics:
            return  # trials take no mid-epoch checkpoints (see trial_config)
        checkpoint = {**checkpoint, "metrics": finite(checkpoint["metrics"])}
        tmp, _ = write_checkpoint_dir(checkpoint)
        try:
            self.reporter.report_epoch(metrics, tune.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """The Tune function trainable: train one student, reporting every epoch with a checkpoint."""
    from ray import tune

    cfg = trial_config(job, params)
    trial_id = tune.get_context().get_trial_id()
    trial_dir = location(job.records) / trial_id
    makedirs(trial_dir)
    labels = LabelSpec(
        (job.teacher,),
        job.fingerprint,
        ensemble=cfg.distill.ensemble,
        spread=cfg.distill.confidence_weighting,
    )
    train_job = TrainJob(
        config=cfg,
        role="student",
        experiment=ROLE,
        dataset=job.dataset,
        # the student trainer's loss, with labels read from the sweep's labels (never from the
        # teacher's weights); label delivery records go to the trial's folder
        make_loss=functools.partial(make_distill_loss, labels, str(trial_dir)),
        experiment_dir=str(trial_dir),
        initial_checkpoint=tune.get_checkpoint(),
        lineage=trial_id,
    )
    reporter = TrialReporter(trial_dir, trial_id, sampled(params, job.specs), cfg.sweep.max_epochs)
    if job.workers == 1:
        session = TuneSession(train_job, reporter, job.gpus_per_worker > 0)
        run_worker(train_job, session)
        reporter.finish(session.state)
        return
    fit_trial(
        train_job,
        reporter,
        trial_dir,
        workers=job.workers,
        cpus_per_worker=job.cpus_per_worker,
        gpus_per_worker=job.gpus_per_worker,
    )


__all__ = [
    "ROLE",
    "TIME_ATTR",
    "TrialJob",
    "TuneSession",
    "read_starts",
    "run_trial",
    "trial_config",
]
