"""Masked forecasting metrics (MAE, RMSE, MAPE), overall and per horizon step, DDP-correct.

Metrics are accumulated as float64 SUMS and COUNTS per horizon step, never as averages, so summing
the accumulators of every rank (or every batch) and dividing once gives exactly the metric over the
concatenated data, whatever the number of observed targets on each rank.

Conventions (those of the traffic-forecasting literature, in original units):

* an entry counts only where the target is observed (``mask`` True);
* MAPE also ignores targets with ``|y| <= mape_eps`` (near-zero targets make it explode; with
  ``mape_eps=0`` exactly the zero targets, the null value of the DCRNN / Graph WaveNet code) and is
  reported as a percentage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from stkd_dist.errors import InputError

_ROWS = ("abs_err", "sq_err", "abs_pct_err", "count", "mape_count")


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


@dataclass(frozen=True)
class MetricResult:
    """Masked metrics in original units; ``nan`` where nothing was observed.

    Attributes:
        mae, rmse: overall mean absolute and root mean squared error.
        mape: overall mean absolute percentage error, in percent.
        mae_h, rmse_h, mape_h: the same per horizon step (index 0 = first step ahead).
        count: observed target entries counted for MAE / RMSE.
    """

    mae: float
    rmse: float
    mape: float
    mae_h: list[float] = field(default_factory=list)
    rmse_h: list[float] = field(default_factory=list)
    mape_h: list[float] = field(default_factory=list)
    count: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``nan`` becomes ``None``)."""
        d = asdict(self)
        for k in ("mae", "rmse", "mape"):
            d[k] = None if math.isnan(d[k]) else d[k]
        for k in ("mae_h", "rmse_h", "mape_h"):
            d[k] = _nan_to_none(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricResult:
        def f(v: float | None) -> float:
            return math.nan if v is None else float(v)

        return cls(
            mae=f(d["mae"]),
            rmse=f(d["rmse"]),
            mape=f(d["mape"]),
            mae_h=[f(v) for v in d.get("mae_h", [])],
            rmse_h=[f(v) for v in d.get("rmse_h", [])],
            mape_h=[f(v) for v in d.get("mape_h", [])],
            count=int(d.get("count", 0)),
        )


class MetricAccumulator:
    """Accumulates masked error sums and counts per horizon step.

    Args:
        horizon: ``H``, the number of forecast steps.
        mape_eps: targets with ``|y| <= mape_eps`` are left out of MAPE.
    """

    def __init__(self, horizon: int, mape_eps: float = 1e-3) -> None:
        if not isinstance(horizon, int) or horizon <= 0:
            raise InputError(f"must be a positive integer, got {horizon!r}", where="horizon")
        if not mape_eps >= 0:
            raise InputError(f"must be non-negative, got {mape_eps!r}", where="mape_eps")
        self.horizon = horizon
        self.mape_eps = float(mape_eps)
        # rows: abs_err, sq_err, abs_pct_err, count, mape_count; columns: horizon steps
        self.sums = torch.zeros(len(_ROWS), horizon, dtype=torch.float64)
        self.reduced = False

    def reset(self) -> None:
        self.sums.zero_()
        self.reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred, target: ``[batch, H, node, channel]`` in original units.
            mask: same shape (or broadcastable), True where the target is observed.
        """
        if self.reduced:
            raise RuntimeError("update() after all_reduce(): the sums are already global")
        if pred.shape != target.shape or pred.dim() < 2 or pred.shape[1] != self.horizon:
            raise InputError(
                f"pred {list(pred.shape)} and target {list(target.shape)} must both be "
                f"[batch, H={self.horizon}, ...]",
                where="metrics",
            )
        p = pred.detach().to(torch.float64)
        y = target.detach().to(torch.float64)
        m = torch.broadcast_to(mask.detach().bool(), p.shape)
        # unobserved targets may hold anything (0, NaN): zero them before multiplying by the mask
        err = torch.where(m, (p - y).abs(), 0.0)
        mape_m = m & (y.abs() > self.mape_eps)
        pct = torch.where(mape_m, err / torch.where(mape_m, y.abs(), 1.0), 0.0)
        dims = [0, *range(2, p.dim())]  # everything but the horizon
        batch_sums = torch.stack(
            [
                err.sum(dims),
                (err * err).sum(dims),
                pct.sum(dims),
                m.sum(dims).to(torch.float64),
                mape_m.sum(dims).to(torch.float64),
            ]
        )  # [5, H]
        self.sums += batch_sums.cpu()

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's sums into this one (same horizon); returns self."""
        if other.horizon != self.horizon:
            raise InputError(f"horizon {other.horizon} != {self.horizon}", where="metrics")
        self.sums += other.sums
        return self

    def all_reduce(self, group: Any = None) -> MetricAccumulator:
        """Sum the accumulators of every rank in place (no-op without a process group).

        Sync point: EVERY rank of ``group`` must call this, in lockstep (same number of calls, same
        order relative to other collectives), even a rank that saw no data, or the job hangs. The
        sums and counts are all-reduced in one collective, so each rank then computes the exact
        global metric — never an average of per-rank averages.
        """
        if self.reduced:
            raise RuntimeError("all_reduce() called twice: the sums would be counted twice")
        if dist.is_available() and dist.is_initialized():
            buf = self.sums
            if dist.get_backend(group) == "nccl":  # NCCL reduces CUDA tensors only
                buf = buf.cuda()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            self.sums = buf.cpu()
        self.reduced = True
        return self

    def compute(self) -> MetricResult:
        """The metrics of everything added so far (``nan`` where nothing counted)."""
        abs_err, sq_err, pct, count, mape_count = self.sums

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            return torch.where(den > 0, num / den.clamp_min(1.0), math.nan)

        mae_h = ratio(abs_err, count)
        rmse_h = ratio(sq_err, count).sqrt()
        mape_h = 100.0 * ratio(pct, mape_count)
        n, n_mape = count.sum(), mape_count.sum()
        return MetricResult(
            mae=float(ratio(abs_err.sum(), n)),
            rmse=float(ratio(sq_err.sum(), n).sqrt()),
            mape=float(100.0 * ratio(pct.sum(), n_mape)),
            mae_h=mae_h.tolist(),
            rmse_h=rmse_h.tolist(),
            mape_h=mape_h.tolist(),
            count=int(n),
        )


def evaluate_metrics(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mape_eps: float = 1e-3
) -> MetricResult:
    """Metrics of one set of predictions ``[batch, H, ...]`` (no distributed reduction)."""
    acc = MetricAccumulator(int(pred.shape[1]), mape_eps=mape_eps)
    acc.update(pred, target, mask)
    return acc.compute()
