"""Masked elementwise criteria (``mae``, ``mse``, ``huber``) and the Gaussian NLL.

A criterion reduces an elementwise error to its mean over the entries where ``mask`` is True,
optionally weighted: ``sum(w · e · m) / sum(m)``. Entries outside the mask may hold anything (0 or
NaN targets); they are replaced before the error is taken, so they never reach the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stkd_dist.errors import ConfigError, InputError
from stkd_dist.registry import Registry


class Criterion(nn.Module):
    """Base of the masked criteria; subclasses implement :meth:`elementwise`."""

    def __init__(self) -> None:
        # an explicit signature: the registry rejects unknown kwargs by inspecting it
        super().__init__()

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked (weighted) mean of the elementwise error; 0 (with a graph) when nothing counts.

        Args:
            pred, target: same shape, e.g. ``[batch, H, node, C]``.
            mask: bool, broadcastable to ``pred``; None = every entry counts.
            weight: per-entry weights broadcastable to ``pred`` (not renormalised here).
        """
        if pred.shape != target.shape:
            raise InputError(
                f"pred {list(pred.shape)} and target {list(target.shape)} differ", "criterion"
            )
        if mask is None:
            mask = torch.ones_like(pred, dtype=torch.bool)
        m = torch.broadcast_to(mask.bool(), pred.shape)
        # replace unobserved targets by the (detached) prediction: zero error and a finite gradient
        clean = torch.where(m, target, pred.detach())
        err = self.elementwise(pred, clean)
        if weight is not None:
            err = err * weight
        return torch.where(m, err, 0.0).sum() / m.sum().clamp_min(1)


CRITERIA: Registry[Criterion] = Registry("criterion")


@CRITERIA.register("mae")
class MaskedMAE(Criterion):
    """Masked mean absolute error."""

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred, target, reduction="none")


@CRITERIA.register("mse")
class MaskedMSE(Criterion):
    """Masked mean squared error."""

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target, reduction="none")


@CRITERIA.register("huber")
class MaskedHuber(Criterion):
    """Masked Huber loss: ``½d²`` for ``|d| ≤ δ``, else ``δ(|d| − ½δ)``.

    Args:
        delta: the threshold ``δ`` (in the units of the predictions), > 0.
    """

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        if not delta > 0:
            raise ConfigError(f"must be positive, got {delta!r}", where="huber.delta")
        self.delta = float(delta)

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred, target, reduction="none", delta=self.delta)


def build_criterion(key: str, huber_delta: float = 1.0) -> Criterion:
    """Build criterion ``key``; ``huber_delta`` is used by ``huber`` only."""
    return CRITERIA.build(key, delta=huber_delta) if key == "huber" else CRITERIA.build(key)


class GaussianNLL(nn.Module):
    """Masked Gaussian negative log-likelihood ``½(log σ² + (y − μ)² / σ²)`` (constant dropped).

    Trains a model built with ``spread=True``. Args of :meth:`forward`: ``mean``, ``log_var``,
    ``target`` of the same shape and a bool ``mask``.

    Args:
        min_log_var: lower clamp of the log-variance, keeping ``1/σ²`` finite.
    """

    def __init__(self, min_log_var: float = -10.0) -> None:
        super().__init__()
        self.min_log_var = float(min_log_var)

    def forward(
        self,
        mean: torch.Tensor,
        log_var: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(mean, dtype=torch.bool)
        m = torch.broadcast_to(mask.bool(), mean.shape)
        clean = torch.where(m, target, mean.detach())
        var = log_var.clamp_min(self.min_log_var).exp()
        nll = F.gaussian_nll_loss(mean, clean, var, reduction="none", eps=0.0)
        return torch.where(m, nll, 0.0).sum() / m.sum().clamp_min(1)
