"""A distilled student rank's loss: the ``distill`` loss against its teachers' soft labels.

:class:`DistillLoss` is the loss function (and epoch hooks) every rank of a distilled student
trains with (:mod:`stkd_dist.train.student` builds it): it streams ITS OWN shard's labels from
the teacher(s) epoch by epoch, joins each batch's labels by window index and applies the
registered distillation loss. Losses on the teacher's hidden states (``hint``) add a learned
projection trained with the student: :mod:`stkd_dist.train.hint`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

from stkd_dist.config.validate import distill_loss_kwargs
from stkd_dist.data.batch import WindowBatch
from stkd_dist.labels.autoscale import WaitReporter
from stkd_dist.labels.sources import Labels, open_label_source
from stkd_dist.labels.teachers import LabelSpec
from stkd_dist.location import Location, PathInput, location, write_json_atomic
from stkd_dist.serving.client import PlanRequest
from stkd_dist.train.loop import LossValue, WorkerContext

LABELS_DIR = "labels"


def delivery_path(experiment: PathInput, epoch: int, rank: int) -> Location:
    """``<experiment>/labels/epoch_NNNN/rank_R.json``: a rank's label deliveries of an epoch."""
    return location(experiment) / LABELS_DIR / f"epoch_{epoch:04d}" / f"rank_{rank}.json"


class DistillLoss:
    """A rank's distillation loss: the registered ``distill.loss`` against streamed soft labels.

    Implements the loop's epoch hooks: :meth:`begin_epoch` requests this rank's windows of the
    epoch from every teacher, in plan order, before the first batch; each call joins the batch's
    labels by window index; :meth:`end_epoch` writes the rank's delivery record.

    Args:
        ctx: the worker context.
        labels: the teachers (resolved on the driver).
        experiment_dir: where delivery records go.
    """

    def __init__(self, ctx: WorkerContext, labels: LabelSpec, experiment_dir: str) -> None:
        from stkd_dist.distill import build_loss

        cfg = ctx.config
        self.ctx = ctx
        self.experiment_dir = experiment_dir
        self.criterion = build_loss(cfg.distill.loss, **distill_loss_kwargs(cfg.distill))
        self.spec = labels
        self.source = open_label_source(labels)
        dims = ctx.reader.dims
        self.entries = dims.horizon * dims.nodes * dims.out_channels  # loss terms per sample
        self._parts: dict[str, float] = defaultdict(float)
        self._weight = 0.0
        self._windows = 0
        self._start = 0
        # the autoscaler's signal: this rank's label wait against its step time
        self.reporter = WaitReporter(labels.wait_meter, rank=ctx.rank)
        self._last_step: float | None = None

    def begin_epoch(self, epoch: int, loader: Any) -> None:
        """Ask the teachers for this rank's windows of ``epoch``, in the order it reads them.

        A resumed epoch (the loader starts at a later batch) asks for the rest of the sequence
        only: a streamed teacher's stream starts at that cursor.
        """
        plan = loader.plan
        self._start = loader.start_window  # windows the epoch's batches before this one held
        # [n] int64, derived from the rank's blocks (only those the rest of the epoch touches)
        windows = loader.shard.window_array(self._start)
        self._windows = len(windows)
        self._parts, self._weight = defaultdict(float), 0.0
        # streamed teachers get the plan itself (the server derives the same sequence)
        request = PlanRequest(
            world_size=plan.world_size,
            rank=self.ctx.rank,
            epoch=plan.epoch,
            seed=plan.seed,
            batch_size=plan.batch_size,
            shuffle=plan.shuffle,
            chunk_steps=plan.chunk_steps,
            start=self._start,
            regroups=plan.regroups,
        )
        self.source.begin_epoch(windows, request)
        # the first step's wait counts from here: with labels late, it is most of the wait
        self._last_step = time.perf_counter()

    def __call__(self, batch: WindowBatch, pred: torch.Tensor) -> LossValue:
        """The loss of a batch whose forecast is ``pred`` ``[B, H, N, C]``."""
        return self.apply(batch, pred)

    def apply(
        self, batch: WindowBatch, pred: torch.Tensor, features: torch.Tensor | None = None
    ) -> LossValue:
        """The loss of a batch: ``pred`` ``[B, H, N, C]``, and for a loss on hidden states the
        student's projected ``features`` ``[B, N, F_t]`` (matched to the teacher's)."""
        # labels of the batch's windows, in batch order; padding samples get zeros (no loss)
        asked = time.perf_counter()
        if bool(batch.valid.any()):
            labels = self.source.labels_for(
                batch.index, batch.valid
            )  # [B, H, N, C] (+ [B, N, F_t])
        else:
            labels = self._padding_labels(pred, features)
        got = time.perf_counter()
        if self._last_step is not None:  # a step = from one loss call to the next
            self.reporter.step(got - asked, got - self._last_step)
        self._last_step = got
        extra: dict[str, torch.Tensor] = {}
        if labels.spread is not None:
            extra["teacher_log_var"] = labels.spread.to(pred.device)
        if features is not None:
            assert labels.hidden is not None, "a feature loss asks its teacher for hidden states"
            extra["student_feat"] = features
            extra["teacher_feat"] = labels.hidden.to(pred.device)
        loss, parts = self.criterion(
            pred,
            batch.y,
            batch.mask,
            labels.prediction.to(pred.device),
            valid=batch.valid,
            **extra,
        )
        weight = batch.valid.sum() * self.entries  # the teacher term averages over these
        w = float(weight)
        for name, value in parts.items():
            self._parts[name] += value * w
        self._weight += w
        return LossValue(loss, weight)

    def _padding_labels(self, pred: torch.Tensor, features: torch.Tensor | None) -> Labels:
        """Zeros for a batch of padding samples only, without asking any teacher.

        A rank whose windows of the epoch ran out still steps with the others (DDP's all-reduce
        runs in lockstep), on padding. No teacher has labels for those samples, and a resumed
        epoch's stream may have sent nothing yet to take their shape from; their loss mask is
        empty, so zeros shaped like the forecast (and the projected features) do.
        """
        zeros = torch.zeros_like(pred.detach()).cpu()  # [B, H, N, C]
        return Labels(
            zeros,
            zeros.clone() if self.spec.spread else None,
            None if features is None else torch.zeros_like(features.detach()).cpu(),
        )

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Write this rank's delivery record; return a few numbers for the epoch's metrics."""
        records = self.source.end_epoch()
        self.reporter.flush()
        self._last_step = None  # validation and checkpointing are not steps
        write_json_atomic(
            delivery_path(self.experiment_dir, epoch, self.ctx.rank),
            {
                "epoch": epoch,
                "rank": self.ctx.rank,
                "world_size": self.ctx.world_size,
                "plan_windows": self._windows,
                "start_window": self._start,
                "teachers": records,
            },
        )
        out: dict[str, Any] = {
            "labels_delivered": sum(int(r["delivered"]) for r in records),
            "label_reconnects": sum(int(r.get("reconnects", 0)) for r in records),
            "label_wait_s": sum(float(r["wait_s"]) for r in records),
        }
        for name, total in self._parts.items():
            if name != "loss":
                out[f"train_{name}"] = total / max(self._weight, 1.0)
        return out

    def partial(self) -> dict[str, Any]:
        """The loss parts summed over the epoch so far (for a mid-epoch checkpoint)."""
        return {"parts": dict(self._parts), "weight": self._weight}

    def restore(self, partial: dict[str, Any]) -> None:
        """Continue the sums of :meth:`partial` (after :meth:`begin_epoch` of a resumed epoch)."""
        # {} on a rank that starts an epoch re-dealt to a new world size (rank 0 got the sums)
        parts = partial.get("parts", {})
        self._parts = defaultdict(float, {k: float(v) for k, v in parts.items()})
        self._weight = float(partial.get("weight", 0.0))

    def close(self) -> None:
        self.source.close()
