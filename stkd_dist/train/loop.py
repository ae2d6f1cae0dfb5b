"""The per-worker training loop (one Ray Train worker = one DDP rank).

The loop is role-agnostic: a :class:`TrainJob` names the config section of the model it trains
(``teacher`` or ``student``), the Ray experiment it reports to, and a factory of the loss. Teacher
training uses the masked MAE; student training supplies a loss that also looks up the teacher's
soft labels by the batch's window indices.

Every rank, each epoch:

1. builds the shard plan of the epoch (a pure function of ``(epoch, seed, world_size)``, so all
   ranks agree without communicating) and reads ONLY its own shard through a ``RankLoader``;
2. steps through exactly ``plan.num_batches`` batches (equal on every rank, padding samples have an
   all-False mask) -- DDP all-reduces the gradients in every backward pass, so all ranks must run
   the same number of backward passes;
3. validates on its shard of the validation split and all-reduces the metric sums;
4. decides early stopping from those all-reduced metrics (identical on every rank);
5. reports to Ray Train: rank 0 with a checkpoint, the others without one.

Comments marked ``SYNC`` are collective calls that every rank must make, in the same order.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from stkd_dist.checkpoint import (
    TrainState,
    load_checkpoint_state,
    read_checkpoint,
    save_checkpoint,
    weights_digest,
)
from stkd_dist.config import Config, ModelSection
from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.reader import WindowReader
from stkd_dist.location import location, write_json_atomic
from stkd_dist.metrics import MetricAccumulator, MetricResult
from stkd_dist.storage import DatasetStore, open_store
from stkd_dist.train.schedule import build_scheduler


class LossValue(NamedTuple):
    """A loss over one local batch.

    Attributes:
        mean: scalar, the loss averaged over ``weight`` terms (0 when ``weight`` is 0).
        weight: scalar, how many terms ``mean`` averages (e.g. observed target entries; 0 for a
            batch of padding only). The loop uses it to weight ranks exactly (see
            :func:`global_mean`).
    """

    mean: torch.Tensor
    weight: torch.Tensor


LossFn = Callable[[WindowBatch, torch.Tensor], LossValue]
"""``loss_fn(batch, pred)``: ``pred`` is ``[batch, H, node, C_out]`` in original units."""


@runtime_checkable
class EpochHooks(Protocol):
    """Optional methods of a loss that follows the epochs (a student's soft-label source).

    When the loss returned by ``make_loss`` has them, every rank calls :meth:`begin_epoch` right
    after building the epoch's loader (before its first batch) and :meth:`end_epoch` after its
    last batch; the values :meth:`end_epoch` returns are added to the epoch's reported metrics
    (JSON numbers only, they are stored in the checkpoint).
    """

    def begin_epoch(self, epoch: int, loader: Any) -> None: ...

    def end_epoch(self, epoch: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class WorkerContext:
    """What a loss factory gets on each worker."""

    config: Config
    reader: WindowReader
    store: DatasetStore
    rank: int
    world_size: int
    device: torch.device


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, picklable (sent to every Ray Train worker).

    Attributes:
        config: the resolved config.
        role: the config section of the model trained (``teacher`` or ``student``).
        experiment: the Ray experiment name (``teacher``, ``student_kd``, ...), stored in
            checkpoints.
        dataset: absolute path of the store.
        make_loss: module-level factory ``(WorkerContext) -> LossFn``.
        experiment_dir: absolute path of the experiment directory (worker status files go to
            its ``workers/`` folder).
    """

    config: Config
    role: str
    experiment: str
    dataset: str
    make_loss: Callable[[WorkerContext], LossFn]
    experiment_dir: str

    @property
    def section(self) -> ModelSection:
        return self.config.model(self.role)


def global_mean(value: LossValue, world_size: int) -> torch.Tensor:
    """The local loss scaled so that DDP's gradient average equals the exact global mean.

    DDP averages gradients over ranks (divides the sum by ``world_size``). Ranks can hold different
    numbers of observed targets (padding, missing data), so the mean of per-rank means is not the
    mean over all targets. With ``W`` the all-reduced weight, scaling each rank's loss by
    ``weight * world_size / W`` makes the averaged gradient that of ``sum(loss terms) / W``.

    SYNC: one all-reduce of the weight; every rank calls this once per step.
    """
    weight = value.weight.detach().to(torch.float64).reshape(1).clone()
    if world_size > 1:
        dist.all_reduce(weight, op=dist.ReduceOp.SUM)
    total = float(weight.item())
    if total <= 0:  # every rank holds padding only: a zero loss keeps the graph and the lockstep
        return value.mean * 0.0
    return value.mean * (value.weight.to(value.mean.dtype) * world_size / total)


def build_reader(config: Config, store: DatasetStore) -> WindowReader:
    """The window reader a config describes."""
    d = config.data
    return WindowReader(
        store,
        window=d.window(),
        splits=d.splits(),
        input_channels=d.input_channels,
        target_channels=d.target_channels,
        per_node_stats=d.per_node_stats,
    )


def build_model(section: ModelSection, reader: WindowReader, store: DatasetStore) -> Any:
    """The Forecaster of ``section`` for the reader's data, with its target statistics."""
    from stkd_dist.models import build_forecaster

    return build_forecaster(
        section.model,
        reader.dims,
        adjacency=store.adjacency(),
        target_scale=reader.target_scale(),
        **section.kwargs,
    )


def _sum_all(
    values: list[float], world_size: int, device: torch.device | str = "cpu"
) -> list[float]:
    """SYNC: element-wise sum over ranks of a few scalars (one all-reduce).

    ``device`` must be the rank's CUDA device under NCCL (it reduces CUDA tensors only).
    """
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[WindowBatch],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    device: torch.device,
    world_size: int,
) -> tuple[float, float, int]:
    """One pass over this rank's ``loader``: forward, loss, backward, clip, step.

    ``model`` is the DDP-wrapped model under Ray Train (``world_size`` > 1), the plain one in a
    single process. Every rank must call this in the same epoch with loaders of the same number
    of batches: each step all-reduces the loss weight and the gradients.

    Returns:
        ``(loss_sum, weight_sum, samples)`` of this rank: the weighted loss sum, its weight and
        the windows trained on (padding excluded).
    """
    loss_sum, weight_sum, samples = 0.0, 0.0, 0
    for batch in loader:  # plan.num_batches batches on every rank
        batch = batch.to(device)
        pred = model(batch.x, batch.time_of_day, batch.day_of_week)  # [B, H, N, C_out]
        value = loss_fn(batch, pred)
        loss = global_mean(value, world_size)  # SYNC: all-reduce of the loss weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # SYNC: DDP all-reduces the gradients here
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += float(value.mean.detach()) * float(value.weight)
        weight_sum += float(value.weight)
        samples += int(batch.valid.sum())
    return loss_sum, weight_sum, samples


def validate(
    model: torch.nn.Module,
    reader: WindowReader,
    split: str,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device,
) -> MetricResult:
    """Masked metrics of ``model`` on ``split``, each rank on its shard, then all-reduced.

    SYNC: every rank calls this in the same epoch; ``MetricAccumulator.all_reduce`` is a
    collective, so all ranks end with the same global metrics.
    """
    from stkd_dist.data.loader import make_loader

    acc = MetricAccumulator(reader.window.horizon)
    model.eval()
    loader = make_loader(
        reader, split, world_size, rank, epoch=0, seed=0, batch_size=batch_size, shuffle=False
    )
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            pred = model(batch.x, batch.time_of_day, batch.day_of_week)
            acc.update(pred, batch.y, batch.mask)
    acc.all_reduce()  # SYNC: every rank, once per validation
    return acc.compute()


def write_worker_status(job: TrainJob, rank: int, world_size: int, state: TrainState) -> None:
    """Record which process serves ``rank`` in ``<experiment>/workers/rank-<r>.json``.

    Operators (and the fault-tolerance and multi-node tests) use it to find a rank's process,
    host and Ray node; it is rewritten whenever a worker group (re)starts.
    """
    import ray

    folder = location(job.experiment_dir) / "workers"
    write_json_atomic(
        folder / f"rank-{rank}.json",
        {
            "rank": rank,
            "world_size": world_size,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "attempt": state.attempt,
            "resumed_after_epoch": state.epoch,
            "started": time.time(),
        },
    )


def run_worker(job: TrainJob) -> None:
    """The body of each Ray Train worker (``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from stkd_dist.data.loader import make_loader

    cfg, section = job.config, job.section
    torch.set_num_threads(cfg.cluster.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    store = open_store(job.dataset)
    reader = build_reader(cfg, store)
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(section, reader, store)
    state = TrainState()
    resume = ray.train.get_checkpoint()
    saved: dict[str, Any] = {}
    if resume is not None:
        # every rank loads the same (latest registered) checkpoint, so they restart in step
        with resume.as_directory() as d:
            info = read_checkpoint(d)  # refuses a checkpoint without its final meta.json
            saved = load_checkpoint_state(d)
        model.load_state_dict(saved["model"])
        state = info.state
        state.attempt += 1
    write_worker_status(job, rank, world, state)

    # prepare_model moves the model to the device and wraps it in DDP when world_size > 1; DDP
    # broadcasts rank 0's parameters, and registers the gradient all-reduce hooks.
    ddp = ray.train.torch.prepare_model(model)
    # the optimiser is built (and its state loaded) after the move, so its state lives on the
    # parameters' device
    optim = section.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    scheduler = build_scheduler(optimizer, section.schedule)
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    plain = model  # the unwrapped Forecaster (what checkpoints hold)
    loss_fn = job.make_loss(WorkerContext(cfg, reader, store, rank, world, device))
    hooks = loss_fn if isinstance(loss_fn, EpochHooks) else None
    sched = section.schedule

    for epoch in range(state.epoch + 1, sched.epochs):
        if state.stopped_early:
            break
        t0, cpu0 = time.perf_counter(), time.process_time()
        lr = optimizer.param_groups[0]["lr"]
        ddp.train()
        loader = make_loader(
            reader,
            "train",
            world,
            rank,
            epoch=epoch,
            seed=cfg.run.seed,
            batch_size=cfg.data.batch_size,
            shuffle=True,
        )
        if hooks is not None:
            hooks.begin_epoch(epoch, loader)  # e.g. start streaming this rank's soft labels
        loss_sum, weight_sum, samples = train_epoch(
            ddp, loader, loss_fn, optimizer, optim.grad_clip, device, world
        )
        extra = hooks.end_epoch(epoch) if hooks is not None else {}
        train_time = time.perf_counter() - t0
        # CPU seconds of all ranks' processes (every thread) in the training phase: a rate per
        # CPU-second that contention on a shared machine disturbs less than wall time
        cpu = time.process_time() - cpu0
        loss_sum, weight_sum, samples_all, cpu_all = _sum_all(
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
            "param_digest": weights_digest(plain.state_dict())[:16],
            **extra,
        }
        # SYNC: every rank calls report() once per epoch (it is a barrier); only rank 0 attaches
        # a checkpoint. Rank 0 writes it into a fresh temp dir that Ray copies to the run storage
        # and registers only once the copy is complete.
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="stkd-ckpt-") as tmp:
                info = save_checkpoint(
                    tmp,
                    model_state=plain.state_dict(),
                    spec=plain.spec(),
                    config=cfg,
                    fingerprint=store.fingerprint,
                    stats=reader.stats,
                    metrics={k: v for k, v in metrics.items() if k != "param_digest"},
                    state=state,
                    role=job.experiment,
                    dataset=store.name,
                    optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(),
                )
                metrics["version"] = info.version
                ray.train.report(
                    metrics,
                    checkpoint=Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"epoch_{epoch:04d}",
                )
        else:
            ray.train.report(metrics, checkpoint=None)


def worker_entry(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``: ``train_loop_config={"job": TrainJob}``."""
    run_worker(config["job"])
