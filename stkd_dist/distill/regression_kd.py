"""Stronger regression distillation: the teacher-bounded term and hint (feature) distillation.

Both follow the loss contract of :mod:`stkd_dist.distill.losses` (``loss(student, target, mask,
teacher, *, valid=None, **extras) -> (loss, parts)``), and both are registered in ``LOSSES``:

* ``teacher_bounded`` (:class:`TeacherBoundedKD`): the student is pulled towards the teacher only
  on the entries where the teacher is closer to the truth than the student by a margin (EasyST,
  Tang et al., CIKM 2024; after the bounded regression loss of Chen et al., NeurIPS 2017), so a
  teacher's mistakes are never copied;
* ``hint`` (:class:`HintKD`): output matching plus a hint term, the MSE between the student's
  hidden representation, mapped by a learned projection to the teacher's width, and the
  teacher's hidden representation (FitNets, Romero et al., ICLR 2015). Students train with it:
  the teacher's hidden states (``Forecaster(..., output="features")``) are streamed by the
  teacher service as its ``HIDDEN`` output or read from a label cache made with them, and the
  projection ``nn.Linear(F_s, F_t)`` is trained with the student, inside the module DDP wraps,
  kept in checkpoints for resuming only (:mod:`stkd_dist.train.hint`). This loss takes the
  projected features as they come (``student_feat``): it has no parameters of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from stkd_dist.distill.criteria import CRITERIA, build_criterion
from stkd_dist.distill.losses import LOSSES, _check_alpha, _parts, _sample_mask
from stkd_dist.errors import ConfigError, InputError


def _criterion(name: str, key: str, huber_delta: float) -> nn.Module:
    if key not in CRITERIA:
        raise ConfigError(
            f"unknown criterion {key!r}; choose one of {', '.join(CRITERIA.keys())}",
            where=f"loss.{name}",
        )
    return build_criterion(key, huber_delta)


def _check_shapes(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if teacher.shape != student.shape:
        raise InputError(
            f"teacher {list(teacher.shape)} and student {list(student.shape)} differ", "teacher"
        )


@LOSSES.register("teacher_bounded")
class TeacherBoundedKD(nn.Module):
    """Teacher-bounded regression distillation.

    ``L = α · task(ŷ_s, y) + (1 − α) · Σ_e a_e · match(ŷ_s, ŷ_t)_e / #observed``, with the gate
    ``a_e = 1[|ŷ_s − y|_e > |ŷ_t − y|_e + m]`` over the observed target entries ``e`` of the valid
    samples: the teacher term acts only where the teacher is closer to the truth than the student
    by the margin ``m``. The gate is computed from detached values (it selects entries, it is not
    differentiated); entries without a target cannot be compared and never count.

    Args:
        alpha: weight of the task term, in [0, 1].
        margin: ``m`` >= 0, in target units: how much closer the teacher must be.
        task, match: criterion keys (``mae``, ``mse``, ``huber``) of the two terms.
        huber_delta: ``δ`` of any ``huber`` criterion.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        margin: float = 0.0,
        task: str = "mae",
        match: str = "mae",
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not margin >= 0:
            raise ConfigError(f"must be non-negative, got {margin!r}", where="loss.margin")
        self.margin = float(margin)
        self.task = _criterion("task", task, huber_delta)
        self.match = _criterion("match", match, huber_delta)

    def forward(
        self,
        student: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        teacher: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args: ``student``, ``target``, ``mask``, ``teacher``: ``[batch, H, node, C]`` in the
        same (original) units; ``valid``: ``[batch]`` bool, False for padding samples.

        Parts: ``loss``, ``task``, ``match`` (the gated teacher term) and ``active`` (the share of
        observed entries where the gate is open)."""
        _check_shapes(student, teacher)
        teacher = teacher.detach()
        observed = mask.bool() & _sample_mask(valid, student)
        task = self.task(student, target, observed)
        with torch.no_grad():
            clean = torch.where(observed, target, 0.0)
            gate = (student - clean).abs() > (teacher - clean).abs() + self.margin
            gate = gate & observed
        # sum over the gated entries, normalised by every observed entry (as the task term is)
        match = self.match(student, teacher, observed, gate.to(student.dtype))
        active = gate.to(torch.float64).sum() / observed.sum().clamp_min(1)
        loss = self.alpha * task + (1.0 - self.alpha) * match
        return loss, _parts(loss=loss, task=task, match=match, active=active)


@LOSSES.register("hint")
class HintKD(nn.Module):
    """Output matching plus hint distillation of the hidden representation.

    ``L = α · task(ŷ_s, y) + (1 − α) · match(ŷ_s, ŷ_t) + β · MSE(P h_s, h_t)``

    ``P h_s`` (``student_feat``) is the student's hidden representation through its learned
    projection (:class:`~stkd_dist.train.hint.HintStudent`), ``h_t`` (``teacher_feat``) the
    teacher's, both ``[batch, node, F_t]``; the MSE runs over the valid samples. The match term
    runs over every entry of the valid samples (teacher forecasts are dense), the task term over
    the observed targets.

    Args:
        alpha: weight of the task term, in [0, 1].
        beta: weight of the hint term, >= 0.
        task, match: criterion keys (``mae``, ``mse``, ``huber``).
        huber_delta: ``δ`` of any ``huber`` criterion.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 1.0,
        task: str = "mae",
        match: str = "mae",
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not beta >= 0:
            raise ConfigError(f"must be non-negative, got {beta!r}", where="loss.beta")
        self.beta = float(beta)
        self.task = _criterion("task", task, huber_delta)
        self.match = _criterion("match", match, huber_delta)

    def forward(
        self,
        student: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        teacher: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        student_feat: torch.Tensor | None = None,
        teacher_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args as :class:`TeacherBoundedKD`, plus ``student_feat`` and ``teacher_feat``
        ``[batch, node, F_t]`` (required). Parts: ``loss``, ``task``, ``match``, ``hint``."""
        _check_shapes(student, teacher)
        if student_feat is None or teacher_feat is None:
            raise InputError(
                "the hint loss needs the student's projected features and the teacher's hidden "
                "states",
                where="loss.features",
            )
        if student_feat.shape != teacher_feat.shape:
            raise InputError(
                f"student features {list(student_feat.shape)} and teacher hidden states "
                f"{list(teacher_feat.shape)} differ: project the student's features to the "
                f"teacher's hidden width ({teacher_feat.shape[-1]})",
                where="loss.features",
            )
        samples = _sample_mask(valid, student)
        task = self.task(student, target, mask.bool() & samples)
        match = self.match(student, teacher.detach(), samples)
        hint = CRITERIA.build("mse")(
            student_feat, teacher_feat.detach(), _sample_mask(valid, student_feat)
        )
        loss = self.alpha * task + (1.0 - self.alpha) * match + self.beta * hint
        return loss, _parts(loss=loss, task=task, match=match, hint=hint)
