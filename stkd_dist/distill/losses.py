"""Distillation losses.

Every loss is an ``nn.Module`` called as ``loss(student, target, mask, teacher, *, valid=None,
**extras)`` and returning ``(loss: scalar tensor, parts: dict[str, float])``; ``parts`` names each
term (for logging). Teacher outputs are treated as constants (detached).

* ``regression`` (:class:`RegressionKD`): forecasts distilled as regression targets;
* ``hinton`` (:class:`HintonKD`): soft-label distillation of congestion classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stkd_dist.distill.criteria import CRITERIA, build_criterion
from stkd_dist.errors import ConfigError, InputError
from stkd_dist.registry import Registry

LOSSES: Registry[nn.Module] = Registry("distillation loss")

#: default congestion thresholds for speed in mph: < 20 jam, 20-40 slow, 40-60 busy, >= 60 free flow
SPEED_THRESHOLDS = (20.0, 40.0, 60.0)


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"must be between 0 and 1, got {alpha!r}", where="loss.alpha")
    return float(alpha)


def _sample_mask(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``valid [batch]`` broadcast to ``like``'s shape (all True when None)."""
    if valid is None:
        return torch.ones_like(like, dtype=torch.bool)
    if valid.shape != like.shape[:1]:
        raise InputError(f"expected [{like.shape[0]}], got {list(valid.shape)}", where="valid")
    return valid.bool().reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape)


def _parts(**terms: torch.Tensor) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


@LOSSES.register("regression")
class RegressionKD(nn.Module):
    """Regression distillation.

    ``L = α · task(ŷ_s, y; mask) + (1 − α) · match(ŷ_s, ŷ_t) + β · extra``

    * ``task``: a masked criterion against the observed targets (padding samples excluded);
    * ``match``: a criterion against the teacher's forecast over EVERY entry of the valid samples
      (teacher forecasts are dense, also where the target is missing). With
      ``confidence_weighting`` each entry is weighted by the teacher's precision normalised to mean
      1 over those entries, ``w = exp(−log σ²_t) / mean(exp(−log σ²_t))``, so the student follows the
      teacher where it is confident;
    * ``extra`` (only computed when ``β > 0``): the MSE between ``student_feat`` and
      ``teacher_feat`` ([batch, ...], over valid samples) when the caller passes both (the caller
      projects the student's hidden features to the teacher's size); otherwise a sequence-shape term,
      the MSE between the first differences along the horizon of student and teacher forecasts.

    Args:
        alpha: weight of the task term, in [0, 1] (1 = ignore the teacher, 0 = ignore the targets).
        beta: weight of the extra term, >= 0.
        task, match: criterion keys (``mae``, ``mse``, ``huber``).
        confidence_weighting: weight the match term by the teacher's precision (needs the teacher's
            ``teacher_log_var``).
        huber_delta: ``δ`` of any ``huber`` criterion.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.0,
        task: str = "mae",
        match: str = "mae",
        confidence_weighting: bool = False,
        huber_delta: float = 1.0,
    ) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not beta >= 0:
            raise ConfigError(f"must be non-negative, got {beta!r}", where="loss.beta")
        self.beta = float(beta)
        for name, key in (("task", task), ("match", match)):
            if key not in CRITERIA:
                raise ConfigError(
                    f"unknown criterion {key!r}; choose one of {', '.join(CRITERIA.keys())}",
                    where=f"loss.{name}",
                )
        self.task = build_criterion(task, huber_delta)
        self.match = build_criterion(match, huber_delta)
        self.confidence_weighting = bool(confidence_weighting)

    def forward(
        self,
        student: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        teacher: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        teacher_log_var: torch.Tensor | None = None,
        student_feat: torch.Tensor | None = None,
        teacher_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args: ``student``, ``target``, ``mask``, ``teacher``, ``teacher_log_var``:
        ``[batch, H, node, C]`` in the same (original) units; ``valid``: ``[batch]`` bool, False
        for padding samples; ``student_feat``, ``teacher_feat``: ``[batch, ...]`` of equal shape."""
        if teacher.shape != student.shape:
            raise InputError(
                f"teacher {list(teacher.shape)} and student {list(student.shape)} differ", "teacher"
            )
        teacher = teacher.detach()
        samples = _sample_mask(valid, student)  # [batch, H, node, C]
        task = self.task(student, target, mask.bool() & samples)

        weight = None
        if self.confidence_weighting:
            if teacher_log_var is None:
                raise ConfigError(
                    "confidence_weighting needs the teacher's log-variance (a teacher built with "
                    "spread=True)",
                    where="loss.confidence_weighting",
                )
            precision = torch.exp(-teacher_log_var.detach())
            mean_precision = precision[samples].mean() if samples.any() else precision.new_ones(())
            weight = precision / mean_precision
        match = self.match(student, teacher, samples, weight)

        extra = student.new_zeros(())
        if self.beta > 0:
            extra = self._extra(student, teacher, valid, student_feat, teacher_feat)
        loss = self.alpha * task + (1.0 - self.alpha) * match + self.beta * extra
        return loss, _parts(loss=loss, task=task, match=match, extra=extra)

    @staticmethod
    def _extra(
        student: torch.Tensor,
        teacher: torch.Tensor,
        valid: torch.Tensor | None,
        student_feat: torch.Tensor | None,
        teacher_feat: torch.Tensor | None,
    ) -> torch.Tensor:
        if (student_feat is None) != (teacher_feat is None):
            raise InputError("pass both student_feat and teacher_feat, or neither", "loss.features")
        if student_feat is not None and teacher_feat is not None:
            if student_feat.shape != teacher_feat.shape:
                raise InputError(
                    f"student {list(student_feat.shape)} and teacher {list(teacher_feat.shape)} "
                    "features differ: project the student's features first",
                    where="loss.features",
                )
            a, b = student_feat, teacher_feat.detach()
        else:
            # sequence shape: step-to-step changes along the horizon
            a, b = torch.diff(student, dim=1), torch.diff(teacher, dim=1)  # [batch, H-1, ...]
        return CRITERIA.build("mse")(a, b, _sample_mask(valid, a))


def speed_to_classes(
    speed: torch.Tensor, thresholds: Sequence[float] = SPEED_THRESHOLDS
) -> torch.Tensor:
    """Congestion class of each speed: class ``k`` holds ``thresholds[k-1] <= speed <
    thresholds[k]``, so ``len(thresholds) + 1`` classes, 0 = slowest. Returns int64, same shape."""
    bounds = _check_thresholds(thresholds)
    return torch.bucketize(speed, bounds.to(speed.device, speed.dtype), right=True)


def _check_thresholds(thresholds: Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if t.numel() == 0 or not torch.isfinite(t).all() or (t.numel() > 1 and (t.diff() <= 0).any()):
        raise ConfigError(
            f"must be a non-empty, strictly increasing list of numbers, got {list(thresholds)}",
            where="loss.thresholds",
        )
    return t


@LOSSES.register("hinton")
class HintonKD(nn.Module):
    """Hinton et al. soft-label distillation of congestion classes.

    ``L = α · CE(s, labels) + (1 − α) · T² · KL(softmax(t / T) ‖ softmax(s / T))``

    Labels are the classes of the observed target speeds (:func:`speed_to_classes`); the
    cross-entropy counts observed targets of valid samples only, the KL term every entry of the valid
    samples (teacher logits are dense). Both are means over their entries. A model produces class
    logits by being built with ``out_channels = C × K`` and its output viewed as
    ``[batch, H, node, C, K]`` (see :func:`as_class_logits`).

    Args:
        alpha: weight of the cross-entropy, in [0, 1].
        temperature: softening temperature ``T`` > 0.
        thresholds: class boundaries in target units, strictly increasing (``K = len + 1`` classes).
    """

    def __init__(
        self,
        alpha: float = 0.5,
        temperature: float = 2.0,
        thresholds: Sequence[float] = SPEED_THRESHOLDS,
    ) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not temperature > 0:
            raise ConfigError(f"must be positive, got {temperature!r}", where="loss.temperature")
        self.temperature = float(temperature)
        self.thresholds = tuple(float(v) for v in _check_thresholds(thresholds).tolist())
        self.classes = len(self.thresholds) + 1

    def forward(
        self,
        student: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        teacher: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Args: ``student``, ``teacher``: logits ``[batch, ..., K]``; ``target``: ``[batch, ...]``
        in original units; ``mask``: like ``target``, True where observed; ``valid``: ``[batch]``."""
        k = self.classes
        if student.shape[-1] != k or teacher.shape != student.shape:
            raise InputError(
                f"student {list(student.shape)} and teacher {list(teacher.shape)} logits must "
                f"have the same shape ending in K={k} classes",
                where="logits",
            )
        if tuple(target.shape) != tuple(student.shape[:-1]):
            raise InputError(
                f"target {list(target.shape)} must match the logits without the class axis",
                where="target",
            )
        samples = _sample_mask(valid, target)  # [batch, ...]
        observed = mask.bool() & samples
        labels = speed_to_classes(torch.where(observed, target, 0.0), self.thresholds)
        ce = F.cross_entropy(student[observed], labels[observed]) if observed.any() else None
        if ce is None:
            ce = student.sum() * 0.0

        t = self.temperature
        log_ps = F.log_softmax(student / t, dim=-1)
        log_pt = F.log_softmax(teacher.detach() / t, dim=-1)
        kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)  # like target
        kl = torch.where(samples, kl, 0.0).sum() / samples.sum().clamp_min(1)
        loss = self.alpha * ce + (1.0 - self.alpha) * t * t * kl
        return loss, _parts(loss=loss, ce=ce, kl=kl)


def as_class_logits(output: torch.Tensor, classes: int) -> torch.Tensor:
    """View a network output ``[batch, H, node, C × K]`` as logits ``[batch, H, node, C, K]``."""
    if output.shape[-1] % classes:
        raise InputError(
            f"last axis {output.shape[-1]} is not a multiple of {classes} classes", "logits"
        )
    return output.reshape(*output.shape[:-1], output.shape[-1] // classes, classes)


def build_loss(key: str, **kwargs: Any) -> nn.Module:
    """Build distillation loss ``key`` (unknown kwargs raise :class:`ConfigError`)."""
    return LOSSES.build(key, **kwargs)
