"""The one epoch loop: one rank training one model, epoch after epoch.

:func:`run_worker` restores the checkpoint its session hands it, builds the (DDP) model,
optimiser and scheduler and runs the epochs of :mod:`.loop`
(:func:`~stkd_dist.train.loop.train_epoch`, then :func:`~stkd_dist.train.loop.validate`),
reporting after each epoch and after every mid-epoch checkpoint (:mod:`.steps`). The session
(:mod:`.session`) is what differs between trainers: a Ray Train worker
(:func:`worker_entry`, ``TorchTrainer``'s ``train_loop_per_worker``) reports to Ray Train, a
one-process sweep trial to Ray Tune.

Comments marked ``SYNC`` are collective calls that every rank must make, in the same order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import torch

from stkd_dist.checkpoint import TrainState, load_checkpoint_state, read_checkpoint, weights_digest
from stkd_dist.data.regroup import windows_left
from stkd_dist.storage import open_store
from stkd_dist.train.loop import (
    EpochHooks,
    FeatureLoss,
    TrainJob,
    WorkerContext,
    build_model,
    build_reader,
    sum_all,
    train_epoch,
    validate,
)
from stkd_dist.train.schedule import apply_optim_settings, build_scheduler
from stkd_dist.train.session import RayTrainSession, Restored, WorkerSession
from stkd_dist.train.steps import (
    SCORE,
    EpochProgress,
    StepCheckpoints,
    checkpoint_score,
    gather_progress,
    regroup_progress,
    seed_step_from,
)


def run_worker(job: TrainJob, session: WorkerSession) -> None:
    """The epoch loop of one rank: restore, then train, validate and report every epoch.

    Every trainer runs it: the Ray Train workers of ``train-teacher``, ``train-student`` and
    data-parallel sweep trials (:class:`~stkd_dist.train.session.RayTrainSession`), and a
    one-process sweep trial inside its Tune function (``TuneSession``).
    """
    from stkd_dist.data.loader import make_loader

    cfg, section = job.config, job.section
    torch.set_num_threads(cfg.cluster.torch_threads)
    rank, world, device = session.rank, session.world_size, session.device

    store = open_store(job.dataset)
    reader = build_reader(cfg, store)
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(section, reader, store)
    state = TrainState()
    resume = session.get_checkpoint()
    saved: dict[str, Any] = {}
    restored = Restored()
    if resume is not None:
        # every rank loads the same (latest registered) checkpoint, so they restart in step
        with resume.as_directory() as d:
            info = read_checkpoint(d)  # refuses a checkpoint without its final meta.json
            saved = load_checkpoint_state(d)
        model.load_state_dict(saved["model"])
        state = info.state
        state.attempt += 1
        lineage = info.metrics.get("trial")
        restored = Restored(resume.path, info, None if lineage is None else str(lineage))
        if job.lineage is not None and restored.lineage != job.lineage:
            # another trial's checkpoint (a PBT exploit): its weights, with this trial's
            # settings, which changed, so the early-stopping count starts again
            state.bad_epochs, state.stopped_early = 0, False
    elif job.init_weights is not None:
        # a fine-tune's start: every rank loads the same weights (DDP broadcasts them anyway)
        model.load_state_dict(load_checkpoint_state(job.init_weights)["model"])
    # a mid-epoch checkpoint: every rank's sums of the epoch so far, entry r = rank r's
    partial: list[dict[str, Any]] | None = saved.get("partial") if state.step else None
    if partial is not None and len(partial) != world:
        # Another world size than the checkpoint's (elastic training lost or regained a
        # worker, or the run was restarted with other cluster.num_workers): every rank derives
        # the same re-deal of the windows the epoch has left (data.regroup) from the
        # checkpoint alone, so no rank needs to talk to another about it.
        if rank == 0:
            print(
                f"continuing epoch {state.epoch + 2} after step {state.epoch_step} on {world} "
                f"worker(s): the windows the {len(partial)} worker(s) had left are dealt anew",
                flush=True,
            )
        state.regroups = (*state.regroups, (len(partial), state.step))
        state.step = 0
        partial = regroup_progress(partial, world)

    loss_fn = job.make_loss(WorkerContext(cfg, reader, store, rank, world, device))
    hooks = loss_fn if isinstance(loss_fn, EpochHooks) else None
    # What is trained: the model, or with a loss that has parameters of its own (the hint
    # projection) the loss's module of both, so that DDP below wraps those parameters too: their
    # gradients are all-reduced in the same backward pass and every rank keeps the same copy.
    features = loss_fn if isinstance(loss_fn, FeatureLoss) else None
    trained: torch.nn.Module = model
    if features is not None:
        trained = features.train_module(model)
        if saved.get("loss_state") is not None:
            features.load_state_dict(saved["loss_state"])  # every rank loads the same one
    # on the device, and in DDP when world_size > 1 (which broadcasts rank 0's parameters and
    # registers the gradient all-reduce hooks)
    ddp = session.prepare_model(trained)
    # the optimiser is built (and its state loaded) after the move, so its state lives on the
    # parameters' device
    optim = section.optim
    optimizer = torch.optim.AdamW(
        trained.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    scheduler = build_scheduler(optimizer, section.schedule)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if job.lineage is not None:
            # a trial's own settings (a PBT donor's optimiser state carries the donor's)
            apply_optim_settings(optimizer, scheduler, optim)
    session.started(state, model, restored)
    plain = model  # the unwrapped Forecaster (what checkpoints hold)
    sched = section.schedule
    steps = StepCheckpoints(cfg.checkpoint, world, device)

    def checkpoint_of(metrics: dict[str, Any], at: TrainState, **more: Any) -> dict[str, Any]:
        """``save_checkpoint``'s arguments for the model and optimiser as they are now."""
        return dict(
            model_state=plain.state_dict(),
            spec=plain.spec(),
            config=cfg,
            fingerprint=store.fingerprint,
            stats=reader.stats,
            metrics=metrics,
            state=at,
            role=job.experiment,
            dataset=store.name,
            optimizer_state=optimizer.state_dict(),
            scheduler_state=scheduler.state_dict(),
            # the loss's own parameters, for resuming only: the model is the student alone
            loss_state=None if features is None else features.state_dict(),
            **more,
        )

    # an elastic run may restart on up to max_workers ranks from a mid-epoch checkpoint, and
    # the re-deal gives each of them a window (data.regroup)
    regroup_bound = cfg.cluster.max_workers if cfg.cluster.elastic else 1
    try:
        for epoch in range(state.epoch + 1, sched.epochs):
            if state.stopped_early:
                break
            t0, cpu0 = time.perf_counter(), time.process_time()
            lr = optimizer.param_groups[0]["lr"]
            ddp.train()
            start = state.step  # > 0 only in the epoch a mid-epoch checkpoint resumes
            before = state.steps_before  # > 0 only in an epoch re-dealt to this world size
            loader = make_loader(
                reader,
                "train",
                world,
                rank,
                epoch=epoch,
                seed=cfg.run.seed,
                batch_size=cfg.data.batch_size,
                shuffle=True,
                start_batch=start,
                regroups=state.regroups,
            )
            resumed = partial is not None
            progress = EpochProgress.from_json(partial[rank]) if partial else EpochProgress()
            partial = None
            if hooks is not None:
                hooks.begin_epoch(epoch, loader)  # e.g. start streaming this rank's soft labels
                if resumed:
                    hooks.restore(progress.hooks)

            batches = loader.plan.num_batches

            def after_step(
                done: int,
                progress: EpochProgress,
                epoch: int = epoch,
                batches: int = batches,
                before: int = before,
                plan: Any = loader.plan,
            ) -> None:
                # SYNC: every rank runs this after every step; `due` and the gather and report
                # below are collectives, reached by all ranks at the same step or by none
                if not steps.due(done, batches):
                    return
                if windows_left(plan, done) < regroup_bound:
                    # too few windows left to re-deal to every worker an elastic run may
                    # restart on: the epoch's end checkpoint comes soon (a pure function of the
                    # plan, so every rank skips this step's checkpoint or none does)
                    return
                if hooks is not None:
                    progress.hooks = hooks.partial()
                everyone = gather_progress(progress, world)  # SYNC
                at = dataclasses.replace(state, step=done)
                step = before + done  # into the epoch, over all its deals
                metrics = {"epoch_in_progress": epoch, "step": step, SCORE: checkpoint_score(None)}
                ckpt = checkpoint_of({"step": step}, at, partial=everyone) if rank == 0 else None
                session.report(metrics, ckpt, f"epoch_{epoch:04d}_step_{step:06d}")  # SYNC
                steps.mark()

            loss_sum, weight_sum, samples = train_epoch(
                ddp,
                loader,
                loss_fn,
                optimizer,
                optim.grad_clip,
                device,
                world,
                start_step=start,
                progress=progress,
                # seeded by the step into the epoch, so a re-dealt epoch's steps draw new masks
                before_step=functools.partial(seed_step_from, cfg.run.seed, rank, epoch, before),
                after_step=after_step if cfg.checkpoint.enabled else None,
            )
            extra: dict[str, Any] = hooks.end_epoch(epoch) if hooks is not None else {}
            train_time = time.perf_counter() - t0
            # CPU seconds of all ranks' processes (every thread) in the training phase: a rate per
            # CPU-second that contention on a shared machine disturbs less than wall time
            cpu = time.process_time() - cpu0
            loss_sum, weight_sum, samples_all, cpu_all = sum_all(
                [loss_sum, weight_sum, samples, cpu], world, device
            )

            val = validate(ddp, reader, "val", rank, world, cfg.data.eval_batch_size, device)
            scheduler.step()

            # Early stopping from the all-reduced validation MAE: every rank computes the same
            # decision, so all ranks leave the loop in the same epoch and keep calling report() in step.
            state.end_epoch(epoch, val.mae, int(samples_all), sched.patience_at(epoch))

            metrics = {
                "epoch": epoch,
                "train_loss": loss_sum / max(weight_sum, 1.0),
                "val_mae": val.mae,
                "val_rmse": val.rmse,
                "val_mape": val.mape,
                "lr": lr,
                "samples": int(samples_all),
                "samples_per_s": samples_all / max(train_time, 1e-9),
                "samples_per_cpu_s": samples_all / max(cpu_all, 1e-9),
                "epoch_time_s": time.perf_counter() - t0,
                "best_val_mae": state.best_val_mae,
                "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs,
                "stopped_early": state.stopped_early,
                "attempt": state.attempt,
                "world_size": world,
                "rank": rank,
                "pid": os.getpid(),
                # of everything trained (with a hint loss the projection too): equal on every rank
                "param_digest": weights_digest(trained.state_dict())[:16],
                SCORE: checkpoint_score(val.mae),
                **extra,
            }
            if job.lineage is not None:
                metrics["trial"] = job.lineage  # whose checkpoint it is (a PBT exploit reads it)
            saved_metrics = {k: v for k, v in metrics.items() if k not in ("param_digest", SCORE)}
            ckpt = checkpoint_of(saved_metrics, state) if rank == 0 else None
            session.report(metrics, ckpt, f"epoch_{epoch:04d}")  # SYNC: once per epoch
            steps.mark()
    finally:
        close = getattr(loss_fn, "close", None)  # e.g. the label stream or cache reader
        if close is not None:
            close()


def worker_entry(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``: ``train_loop_config={"job": TrainJob}``."""
    job = config["job"]
    run_worker(job, RayTrainSession(job))
