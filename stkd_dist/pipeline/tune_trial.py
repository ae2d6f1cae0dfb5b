"""One sweep trial: a student trained in a Ray Tune function trainable.

A trial is a single process (one Tune actor with ``sweep.cpus_per_trial`` CPUs): sweeps parallelise
over trials, and a small student trains fastest without data-parallel synchronisation. It is built
from the same pieces as a Ray Train worker (:mod:`stkd_dist.train.loop`): the reader and model of
the config, the rank loader's plan (with one rank), the distillation loss of the student trainer
(:func:`stkd_dist.train.student.make_distill_loss`, with its epoch hooks), the validation routine
and the checkpoint format. Only the reporting differs: each epoch ends with
``tune.report(metrics, checkpoint=...)``, which lets ASHA stop the trial at a rung (or PBT pause
it and hand it another trial's checkpoint) and Tune keep the trial's checkpoints.

Every trial reads its teacher's soft labels from the sweep's label cache, so no trial runs the
teacher. A restored trial (after a crash, a resumed sweep, a PBT pause or exploit) continues from
the checkpoint Tune gives it (``tune.get_checkpoint()``). The trial keeps records of itself
(:mod:`.trial_records`): each start (the checkpoint it loaded, its worker processes) and, when
it ends itself, why.
"""

from __future__ import annotations

import dataclasses
import functools
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
from stkd_dist.location import Location, location, makedirs
from stkd_dist.pipeline.trial_records import (
    TRIAL_DIR_PREFIX,
    log_start,
    read_starts,
    state_digest,
    worker_record,
    write_stop,
)
from stkd_dist.pipeline.tune_space import apply_params, sampled

if TYPE_CHECKING:
    from stkd_dist.checkpoint import TrainState
    from stkd_dist.config.models import OptimSection
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.models import Forecaster
    from stkd_dist.storage import DatasetStore
    from stkd_dist.train.loop import EpochHooks, LossFn

#: experiment name stored in the trials' checkpoints
ROLE = "student_sweep"
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


def apply_optim_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    optim: OptimSection,
) -> None:
    """Give a restored optimizer and schedule the trial's own ``lr``, weight decay and betas.

    A loaded optimizer state carries the settings of the trial that saved it: after a PBT
    exploit that is the donor, whose settings the trial's mutated ones replace. The schedule
    keeps its position (``last_epoch``). For a trial restored from its own checkpoint nothing
    changes: the learning rate is computed as the schedule computes it, bit for bit.
    """
    scheduler.base_lrs = [optim.lr for _ in optimizer.param_groups]
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * factor
        group["weight_decay"] = optim.weight_decay
        group["betas"] = optim.betas
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _checkpoint_trial(path: str, info_trial: Any) -> str:
    """The trial that wrote checkpoint ``path``: as its metadata says, else its folder's name."""
    if info_trial:
        return str(info_trial)
    return os.path.basename(os.path.dirname(path.rstrip("/"))).removeprefix(TRIAL_DIR_PREFIX)


@dataclass
class _Run:
    """What one start of a trial trains (mutable: the model and its optimiser state)."""

    cfg: Config
    reader: WindowReader
    store: DatasetStore
    model: Forecaster
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: TrainState
    loss_fn: LossFn
    hooks: EpochHooks | None
    device: torch.device
    trial_id: str
    trial_dir: Location


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """The Tune function trainable: train one student, reporting every epoch with a checkpoint.

    A start with a checkpoint (``tune.get_checkpoint()``: a restart after a crash, a resumed
    sweep, a PBT pause or exploit) continues from it; one taken from another trial (a PBT
    exploit) also starts a new early-stopping count, since the settings changed.
    """
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
    trial_id = tune.get_context().get_trial_id()
    trial_dir = location(job.records) / trial_id
    makedirs(trial_dir)

    restored_from: dict[str, Any] | None = None
    resume = tune.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            info = read_checkpoint(d)  # refuses a checkpoint without its final meta.json
            saved = load_checkpoint_state(d)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        apply_optim_settings(optimizer, scheduler, optim)
        state = info.state
        state.attempt += 1
        donor = _checkpoint_trial(resume.path, info.metrics.get("trial"))
        if donor != trial_id:
            state.bad_epochs, state.stopped_early = 0, False
        restored_from = {
            "checkpoint": resume.path,
            "trial": donor,
            "epochs_done": info.epoch + 1,
            # of the weights now in the model: what the trial continues from
            "weights_sha256": state_digest(model.state_dict()),
        }
    log_start(
        trial_dir,
        {
            "pid": os.getpid(),
            "after_epoch": state.epoch,
            "attempt": state.attempt,
            "restored_from": restored_from,
            "params": sampled(params, job.specs),
            "workers": [worker_record(0)],
        },
    )

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
    run = _Run(
        cfg=cfg,
        reader=reader,
        store=store,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        loss_fn=loss_fn,
        hooks=hooks,
        device=device,
        trial_id=trial_id,
        trial_dir=trial_dir,
    )
    try:
        _train(run)
    finally:
        close = getattr(loss_fn, "close", None)
        if close is not None:
            close()


def _train(run: _Run) -> None:
    """The epochs of a trial, from ``state.epoch + 1``; each ends with ``tune.report``.

    The trial records its own end (``stop.json``) before the report of its last epoch: a
    scheduler may stop it at that report, and the trial would not get to say so afterwards.
    """
    from ray import tune

    from stkd_dist.checkpoint import save_checkpoint
    from stkd_dist.data.loader import make_loader
    from stkd_dist.train.loop import train_epoch, validate
    from stkd_dist.train.steps import seed_step

    cfg, state, model, optimizer, hooks = run.cfg, run.state, run.model, run.optimizer, run.hooks
    reader, device = run.reader, run.device
    section = cfg.student
    epochs = section.schedule.epochs
    ended = False
    for epoch in range(state.epoch + 1, epochs):
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
            run.loss_fn,
            optimizer,
            section.optim.grad_clip,
            device,
            1,
            before_step=functools.partial(seed_step, cfg.run.seed, 0, epoch),
        )
        extra = hooks.end_epoch(epoch) if hooks is not None else {}
        train_time = time.perf_counter() - t0

        val = validate(model, reader, "val", 0, 1, cfg.data.eval_batch_size, device)
        run.scheduler.step()
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
        if epoch == epochs - 1 or state.stopped_early:
            write_stop(
                run.trial_dir, "completed" if epoch == epochs - 1 else "early_stopping", epoch + 1
            )
            ended = True
        with tempfile.TemporaryDirectory(prefix="stkd-trial-") as tmp:
            save_checkpoint(
                tmp,
                model_state=model.state_dict(),
                spec=model.spec(),
                config=cfg,
                fingerprint=run.store.fingerprint,
                stats=reader.stats,
                # the trial id: a PBT exploit records whose checkpoint it continued from
                metrics=_finite({**metrics, "trial": run.trial_id}),
                state=state,
                role=ROLE,
                dataset=run.store.name,
                optimizer_state=optimizer.state_dict(),
                scheduler_state=run.scheduler.state_dict(),
            )
            # Tune copies the directory into the trial's storage before report() returns and
            # keeps the best sweep.keep_best checkpoints of the trial by val_mae (every one
            # with PBT)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    if not ended:
        # nothing left to train in this start (restored at the end, or after early stopping)
        done = state.epoch + 1
        run_out = state.stopped_early and done < epochs
        write_stop(run.trial_dir, "early_stopping" if run_out else "completed", done)


def _finite(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics for ``meta.json`` (strict JSON): non-finite floats become None."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


__all__ = ["ROLE", "TIME_ATTR", "TrialJob", "apply_optim_settings", "read_starts", "run_trial"]
