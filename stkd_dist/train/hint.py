"""Hint distillation on a student rank: the student's learned projection and the loss around it.

``distill.loss: hint`` (:class:`~stkd_dist.distill.regression_kd.HintKD`) matches the student's
hidden representation ``h_s`` ``[batch, node, F_s]``, mapped to the teacher's width by a learned
projection ``P = nn.Linear(F_s, F_t)``, to the teacher's hidden representation ``h_t``
``[batch, node, F_t]``, which the teacher service streams (``Output.HIDDEN``) or the label cache
holds (a cache made with ``--hidden``).

Where the projection lives, and why:

* it is trained with the student: :class:`HintStudent` holds the student forecaster and ``P``
  as one module, the module the worker wraps in DDP and the optimiser steps
  (:class:`~stkd_dist.train.loop.FeatureLoss`). Its one forward call through DDP computes the
  forecast and ``P h_s``, so the backward pass all-reduces the gradients of ``P`` together with
  the student's and every rank holds the same ``P`` (DDP also broadcasts rank 0's initial one);
* it is kept for resuming only: every checkpoint's training state (``train_state.pt``, beside
  the optimiser's) holds ``P`` as ``loss_state``, so a resumed run continues bitwise; the
  checkpoint's model (``model.pt``, what evaluation, serving and export load) is the student
  forecaster alone. An exported student never needs ``P``: it is a training device, discarded
  with the training state.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch
from torch import nn

from stkd_dist.data.batch import WindowBatch
from stkd_dist.errors import ConfigError
from stkd_dist.labels.teachers import LabelSpec
from stkd_dist.models import Forecaster
from stkd_dist.train.distill_loss import DistillLoss
from stkd_dist.train.loop import LossValue, WorkerContext


class HintStudent(nn.Module):
    """The student forecaster with its hint projection, trained as one module.

    Args:
        student: the student forecaster (what checkpoints hold).
        teacher_dim: ``F_t``, the width of the teacher's hidden states.
    """

    def __init__(self, student: Forecaster, teacher_dim: int) -> None:
        super().__init__()
        if teacher_dim < 1:
            raise ConfigError(
                f"the teacher's hidden width is {teacher_dim}: the hint loss needs a teacher "
                "that delivers its hidden states",
                where="distill.loss",
            )
        self.student = student
        # P: F_s -> F_t, the same map for every node (applied to the last axis)
        self.projection = nn.Linear(student.hidden_dim(), int(teacher_dim))

    @overload
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["mean"] = "mean",
    ) -> torch.Tensor: ...
    @overload
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["features"],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def forward(
        self,
        x: torch.Tensor,
        time_of_day: torch.Tensor,
        day_of_week: torch.Tensor,
        output: Literal["mean", "features"] = "mean",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``"mean"``: the student's forecast ``[batch, H, node, C]`` (validation); ``"features"``:
        ``(forecast, P h_s [batch, node, F_t])`` (training)."""
        if output == "mean":
            mean: torch.Tensor = self.student(x, time_of_day, day_of_week)
            return mean
        mean, hidden = self.student(x, time_of_day, day_of_week, output="features")
        return mean, self.projection(hidden)  # hidden: [batch, node, F_s]


class HintDistillLoss(DistillLoss):
    """A rank's hint loss: :class:`DistillLoss` on the forecasts plus the hidden states.

    The label source asks its teacher for the hidden states too (``LabelSpec.hidden``); the
    worker trains :meth:`train_module` (see the module docstring).

    Args:
        ctx: the worker context.
        labels: the teacher (resolved on the driver, its hidden width pinned).
        experiment_dir: where delivery records go.
    """

    def __init__(self, ctx: WorkerContext, labels: LabelSpec, experiment_dir: str) -> None:
        if not labels.hidden:
            raise ConfigError("the hint loss needs LabelSpec(hidden=True)", where="distill.loss")
        super().__init__(ctx, labels, experiment_dir)
        self.teacher_dim = labels.hidden_dim
        self.module: HintStudent | None = None

    def train_module(self, model: Forecaster) -> HintStudent:
        """The student with a fresh projection (on the model's device)."""
        device = model.target_mean.device
        self.module = HintStudent(model, self.teacher_dim).to(device)
        return self.module

    def loss_with_features(
        self, batch: WindowBatch, pred: torch.Tensor, features: torch.Tensor
    ) -> LossValue:
        """The loss of a batch: forecast ``pred`` ``[B, H, N, C]``, projected student features
        ``features`` ``[B, N, F_t]``."""
        return self.apply(batch, pred, features)

    def _projection(self) -> nn.Linear:
        if self.module is None:
            raise RuntimeError("train_module() first: the projection is made with the student")
        return self.module.projection

    def state_dict(self) -> dict[str, Any]:
        """The projection's parameters (a checkpoint's ``loss_state``)."""
        return dict(self._projection().state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the projection of a checkpoint (a resumed run)."""
        self._projection().load_state_dict(state)
