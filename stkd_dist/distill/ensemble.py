"""Multi-teacher ensembles: one soft target from several teachers' forecasts.

Rules: ``mean`` (equal weights) and ``inverse_error`` (weights ∝ 1 / validation MAE, normalised).
Spreads are combined by the law of total variance over the mixture::

    μ = Σ wᵢ μᵢ        σ² = Σ wᵢ (σᵢ² + (μᵢ − μ)²)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import torch

from stkd_dist.errors import ConfigError, InputError

RULES = ("mean", "inverse_error")


def teacher_weights(
    count: int, rule: str = "mean", val_errors: Sequence[float] | None = None
) -> list[float]:
    """Normalised weights of ``count`` teachers under ``rule``.

    Args:
        count: number of teachers (>= 1).
        rule: ``"mean"`` or ``"inverse_error"``.
        val_errors: validation MAE of each teacher (required by ``inverse_error``), finite and > 0.
    """
    if count < 1:
        raise InputError("needs at least one teacher", where="teachers")
    if rule == "mean":
        return [1.0 / count] * count
    if rule != "inverse_error":
        raise ConfigError(f"must be one of {', '.join(RULES)}, got {rule!r}", where="ensemble.rule")
    if val_errors is None or len(val_errors) != count:
        raise ConfigError(
            f"inverse_error needs one validation error per teacher ({count}), got "
            f"{None if val_errors is None else len(val_errors)}",
            where="ensemble.val_errors",
        )
    errors = [float(e) for e in val_errors]
    if not all(math.isfinite(e) and e > 0 for e in errors):
        raise ConfigError(f"must be finite and positive, got {errors}", where="ensemble.val_errors")
    inv = [1.0 / e for e in errors]
    total = sum(inv)
    return [w / total for w in inv]


@overload
def combine_teachers(
    preds: Sequence[torch.Tensor],
    rule: str = ...,
    val_errors: Sequence[float] | None = ...,
    log_vars: None = ...,
) -> torch.Tensor: ...


@overload
def combine_teachers(
    preds: Sequence[torch.Tensor],
    rule: str = ...,
    val_errors: Sequence[float] | None = ...,
    log_vars: Sequence[torch.Tensor] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def combine_teachers(
    preds: Sequence[torch.Tensor],
    rule: str = "mean",
    val_errors: Sequence[float] | None = None,
    log_vars: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Combine teachers' forecasts (all ``[batch, H, node, C]``, original units).

    Returns the weighted mean; with ``log_vars`` (one per teacher) also the mixture's
    log-variance, as ``(mean, log_var)``.
    """
    weights = teacher_weights(len(preds), rule, val_errors)
    shape = preds[0].shape
    if any(p.shape != shape for p in preds):
        raise InputError(
            f"teacher forecasts differ in shape: {[list(p.shape) for p in preds]}", "teachers"
        )
    stacked = torch.stack(list(preds))  # [teacher, batch, H, node, C]
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * len(shape)))
    mean = (w * stacked).sum(0)
    if log_vars is None:
        return mean
    if len(log_vars) != len(preds) or any(v.shape != shape for v in log_vars):
        raise InputError("needs one log-variance per teacher, shaped like its forecast", "log_vars")
    var = (w * (torch.stack(list(log_vars)).exp() + (stacked - mean) ** 2)).sum(0)
    return mean, torch.log(var)
