"""One sweep trial: a student trained in a Ray Tune function trainable.

A trial is a single process (one Tune actor with ``sweep.cpus_per_trial`` CPUs): sweeps parallelise
over trials, and a small student trains fastest without data-parallel synchronisation. It is built
from the same pieces as a Ray Train worker (:mod:`stkd_dist.train.loop`): the reader and model of
the config, the rank loader's plan (with one rank), the distillation loss of the student trainer
(:func:`stkd_dist.train.student.make_distill_loss`, with its epoch hooks), the validation routine
and the checkpoint format. Only the reporting differs: each epoch ends with
``tune.report(metrics, checkpoint=...)``, which lets ASHA stop the trial at a rung and Tune keep the
trial's best ``sweep.keep_best`` checkpoints by validation MAE.

Every trial reads its teacher's soft labels from the sweep's label cache, so no trial runs the
teacher. A restored trial (after a failure or a resumed sweep) continues from its latest checkpoint
(``tune.get_checkpoint()``); each start is appended to the trial's ``starts.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from stkd_dist.config import Config
from stkd_dist.config.sweep import ParamSpec
from stkd_dist.labels.teachers import TeacherSpec
from stkd_dist.location import Location, append_text, exists, location, makedirs, read_text
from stkd_dist.pipeline.tune_space import apply_params, sampled

if TYPE_CHECKING:
    from stkd_dist.checkpoint import TrainState
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.models import Forecaster
    from stkd_dist.storage import DatasetStore
    from stkd_dist.train.loop import EpochHooks, LossFn

#: experiment name stored in the trials' checkpoints
ROLE = "student_sweep"
STARTS = "starts.jsonl"
#: the metric ASHA counts its rungs in (1-based epochs, stable across restores)
TIME_ATTR = "epochs_done"


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
        teacher: the label cache as a resolved ``cache`` teacher (checked against the student's
            windows on the driver, version pinned).
        fingerprint: the dataset fingerprint the labels belong to.
        threads: torch intra-op threads of a trial.
        use_gpu: train on the trial's GPU.
    """

    config: Config
    specs: tuple[ParamSpec, ...]
    dataset: str
    records: str
    teacher: TeacherSpec
    fingerprint: str
    threads: int = 1
    use_gpu: bool = False


def trial_config(job: TrialJob, params: Mapping[str, Any]) -> Config:
    """The config of the trial with sampled ``params``: student epochs = ``sweep.max_epochs``."""
    cfg = apply_params(job.config, sampled(params, job.specs))
    schedule = dataclasses.replace(cfg.student.schedule, epochs=cfg.sweep.max_epochs)
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, schedule=schedule))


def _log_start(trial_dir: Location, epoch: int, attempt: int) -> None:
    record = {"time": time.time(), "pid": os.getpid(), "after_epoch": epoch, "attempt": attempt}
    append_text(trial_dir / STARTS, json.dumps(record) + "\n")


def read_starts(trial_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The starts of a trial (``after_epoch`` -1 = from scratch), oldest first.

    ``trial_dir`` is ``<records>/<trial id>`` (see :class:`TrialJob`).
    """
    path = location(trial_dir) / STARTS
    if not exists(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line]


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """The Tune function trainable: train one student, reporting every epoch with a checkpoint."""
    from ray import tune

    from stkd_dist.checkpoint import TrainState, load_checkpoint_state, read_checkpoint
    from stkd_dist.labels.teachers import LabelSpec
    from stkd_dist.storage import open_store
    from stkd_dist.train.loop import EpochHooks, WorkerContext, build_model, build_reader
    from stkd_dist.train.schedule import build_scheduler
    from stkd_dist.train.student import make_distill_loss

    cfg = trial_config(job, params)
    section = cfg.student
    torch.set_num_threads(job.threads)
    device = torch.device("cuda" if job.use_gpu and torch.cuda.is_available() else "cpu")

    store = open_store(job.dataset)
    reader = build_reader(cfg, store)
    torch.manual_seed(cfg.run.seed)
    model = build_model(section, reader, store).to(device)
    optim = section.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    scheduler = build_scheduler(optimizer, section.schedule)
    state = TrainState()

    resume = tune.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            info = read_checkpoint(d)  # refuses a checkpoint without its final meta.json
            saved = load_checkpoint_state(d)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = info.state
        state.attempt += 1
    trial_dir = location(job.records) / tune.get_context().get_trial_id()
    makedirs(trial_dir)
    _log_start(trial_dir, state.epoch, state.attempt)

    labels = LabelSpec(
        (job.teacher,),
        job.fingerprint,
        ensemble=cfg.distill.ensemble,
        spread=cfg.distill.confidence_weighting,
    )
    # the student trainer's loss: labels joined to each batch by window index, read from the
    # cache (never from the teacher); label delivery records go to the trial's folder
    loss_fn = make_distill_loss(
        labels, str(trial_dir), WorkerContext(cfg, reader, store, 0, 1, device)
    )
    hooks = loss_fn if isinstance(loss_fn, EpochHooks) else None
    try:
        _train(cfg, reader, store, model, optimizer, scheduler, state, loss_fn, hooks, device)
    finally:
        close = getattr(loss_fn, "close", None)
        if close is not None:
            close()


def _train(
    cfg: Config,
    reader: WindowReader,
    store: DatasetStore,
    model: Forecaster,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    loss_fn: LossFn,
    hooks: EpochHooks | None,
    device: torch.device,
) -> None:
    """The epochs of a trial, from ``state.epoch + 1``; each ends with ``tune.report``."""
    from ray import tune

    from stkd_dist.checkpoint import save_checkpoint
    from stkd_dist.data.loader import make_loader
    from stkd_dist.train.loop import train_epoch, validate
    from stkd_dist.train.steps import seed_step

    section = cfg.student
    optim = section.optim
    for epoch in range(state.epoch + 1, section.schedule.epochs):
        if state.stopped_early:
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loader = make_loader(
            reader, "train", epoch=epoch, seed=cfg.run.seed, batch_size=cfg.data.batch_size
        )
        if hooks is not None:
            hooks.begin_epoch(epoch, loader)
        # one process: global_mean is the exact mean over the batch's terms, nothing to reduce
        loss_sum, weight_sum, samples = train_epoch(
            model,
            loader,
            loss_fn,
            optimizer,
            optim.grad_clip,
            device,
            1,
            before_step=lambda step, epoch=epoch: seed_step(cfg.run.seed, 0, epoch, step),
        )
        extra = hooks.end_epoch(epoch) if hooks is not None else {}
        train_time = time.perf_counter() - t0

        val = validate(model, reader, "val", 0, 1, cfg.data.eval_batch_size, device)
        scheduler.step()
        val_mae = state.end_epoch(epoch, val.mae, samples, section.schedule.patience_at(epoch))

        metrics = {
            "epoch": epoch,
            TIME_ATTR: epoch + 1,
            "train_loss": loss_sum / max(weight_sum, 1.0),
            "val_mae": val_mae,
            "val_rmse": val.rmse,
            "val_mape": val.mape,
            "lr": lr,
            "samples": samples,
            "samples_per_s": samples / max(train_time, 1e-9),
            "epoch_time_s": time.perf_counter() - t0,
            "best_val_mae": state.best_val_mae,
            "stopped_early": state.stopped_early,
            "attempt": state.attempt,
            "params": model.num_params(),
            **extra,
        }
        with tempfile.TemporaryDirectory(prefix="stkd-trial-") as tmp:
            save_checkpoint(
                tmp,
                model_state=model.state_dict(),
                spec=model.spec(),
                config=cfg,
                fingerprint=store.fingerprint,
                stats=reader.stats,
                metrics=_finite(metrics),
                state=state,
                role=ROLE,
                dataset=store.name,
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
            )
            # Tune copies the directory into the trial's storage before report() returns and
            # keeps the best sweep.keep_best checkpoints of the trial by val_mae
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics for ``meta.json`` (strict JSON): non-finite floats become None."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }
