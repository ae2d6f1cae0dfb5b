"""The per-worker training loop (one Ray Train worker = one DDP rank): its steps and epochs.

:mod:`.worker` runs it on every Ray Train worker; this module holds the parts every trainer
shares (the teacher's and students' workers, and a Tune trial's).

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

Before every step the rank seeds its generators from ``(run.seed, rank, epoch, step)``
(:mod:`.steps`), and after every ``checkpoint.every_steps`` steps (or ``every_minutes``) all ranks
report a mid-epoch checkpoint: a worker group restarted from it (a lost worker, or the same
command run again after the driver died) continues the epoch at that step and ends with the same
weights, bit for bit, as a run that never stopped.

A loss with trained parameters of its own (:class:`FeatureLoss`: the hint projection of
:mod:`.hint`) hands the worker the module to train in the model's place, the model and those
parameters together: DDP wraps that module, so the loss's parameters are all-reduced with the
model's in the same backward pass and stay equal on every rank.

Comments marked ``SYNC`` are collective calls that every rank must make, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from stkd_dist.config import Config, ModelSection
from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.reader import WindowReader
from stkd_dist.metrics import MetricAccumulator, MetricResult
from stkd_dist.models import Forecaster, build_forecaster
from stkd_dist.storage import DatasetStore
from stkd_dist.train.steps import EpochProgress


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

    def partial(self) -> dict[str, Any]:
        """What the hooks summed over the epoch so far (JSON; kept in mid-epoch checkpoints).

        Sums only (numbers, or dicts of them): an epoch re-dealt to another world size adds
        the old ranks' sums key by key and hands them to rank 0.
        """
        ...

    def restore(self, partial: dict[str, Any]) -> None:
        """Continue an epoch resumed mid-way (after :meth:`begin_epoch`) from :meth:`partial`
        (``{}``: nothing summed yet, a rank that joins a re-dealt epoch)."""
        ...


@runtime_checkable
class FeatureLoss(Protocol):
    """A loss that reads the student's hidden features and trains parameters of its own.

    The worker trains :meth:`train_module` ``(model)`` instead of the model itself: DDP wraps
    it and the optimiser steps it, so the loss's parameters (the hint projection) get their
    gradients all-reduced with the model's. Its ``forward(x, time_of_day, day_of_week)`` is the
    model's forecast (validation calls it so); with ``output="features"`` it returns
    ``(forecast [B, H, N, C], features [B, N, F])``, which :meth:`loss_with_features` takes.
    """

    def train_module(self, model: Forecaster) -> torch.nn.Module:
        """The module to train: ``model`` and the loss's own parameters."""
        ...

    def loss_with_features(
        self, batch: WindowBatch, pred: torch.Tensor, features: torch.Tensor
    ) -> LossValue:
        """The loss of a batch from the trained module's ``output="features"`` outputs."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The loss's own parameters (kept in checkpoints' training state, for resuming)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`train_module`)."""
        ...


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
        initial_checkpoint: a ``ray.train.Checkpoint`` to start from while the run has none of
            its own (a sweep trial's restore: Tune's checkpoint of it, or a PBT donor's).
        lineage: the sweep trial this run trains (None outside sweeps). It is recorded in every
            checkpoint as ``metrics["trial"]``; a start from a checkpoint of another trial (a
            PBT exploit) begins a new early-stopping count and takes this job's optimiser
            settings.
        init_weights: a checkpoint whose model weights a new run starts from (a fine-tune: a
            fresh optimiser, schedule and epoch count); ignored once the run has checkpoints
            of its own.
    """

    config: Config
    role: str
    experiment: str
    dataset: str
    make_loss: Callable[[WorkerContext], LossFn]
    experiment_dir: str
    initial_checkpoint: Any = None
    lineage: str | None = None
    init_weights: str | None = None

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
        target_fraction=d.target_fraction,
        recent_days=d.recent_days,
    )


def build_model(section: ModelSection, reader: WindowReader, store: DatasetStore) -> Forecaster:
    """The Forecaster of ``section`` for the reader's data, with its target statistics."""
    return build_forecaster(
        section.model,
        reader.dims,
        adjacency=store.adjacency(),
        target_scale=reader.target_scale(),
        **section.kwargs,
    )


def sum_all(
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
    *,
    start_step: int = 0,
    progress: EpochProgress | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: Callable[[int, EpochProgress], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over this rank's ``loader``: forward, loss, backward, clip, step.

    ``model`` is the DDP-wrapped model under Ray Train (``world_size`` > 1), the plain one in a
    single process; with a :class:`FeatureLoss` it is (the DDP around) the loss's
    ``train_module``. Every rank must call this in the same epoch with loaders of the same number
    of batches: each step all-reduces the loss weight and the gradients.

    Args:
        start_step: the loader's first batch is this step of the epoch (a resumed epoch).
        progress: the epoch's sums so far (a resumed epoch), added to in place.
        before_step: called with the step index before each step (seeds the generators).
        after_step: called with the steps done and the progress after each step (mid-epoch
            checkpoints; it may call collectives: every rank calls it after every step).

    Returns:
        ``(loss_sum, weight_sum, samples)`` of this rank: the weighted loss sum, its weight and
        the windows trained on (padding excluded), over the whole epoch.
    """
    progress = progress if progress is not None else EpochProgress()
    features = loss_fn if isinstance(loss_fn, FeatureLoss) else None
    for step, batch in enumerate(loader, start=start_step):  # the same count on every rank
        if before_step is not None:
            before_step(step)
        batch = batch.to(device)
        if features is not None:
            # `model` is (DDP around) the loss's train_module: one forward call through DDP, so
            # its hooks cover the loss's parameters too
            pred, feat = model(batch.x, batch.time_of_day, batch.day_of_week, output="features")
            value = features.loss_with_features(batch, pred, feat)  # feat: [B, N, F_t]
        else:
            pred = model(batch.x, batch.time_of_day, batch.day_of_week)  # [B, H, N, C_out]
            value = loss_fn(batch, pred)
        loss = global_mean(value, world_size)  # SYNC: all-reduce of the loss weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # SYNC: DDP all-reduces the gradients here
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        progress.add(float(value.mean.detach()), float(value.weight), int(batch.valid.sum()))
        if after_step is not None:
            after_step(step + 1, progress)
    return progress.loss_sum, progress.weight_sum, progress.samples


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
