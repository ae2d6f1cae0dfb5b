"""Statistics of distilled vs scratch students over seeds: paired test, bootstrap, gap closed.

``stkd distill --seeds N`` trains the distilled and the scratch student with the same N seeds
(each pair on the same shard plan and initialisation), so the comparison is paired: the per-seed
differences ``d_i = kd_i − scratch_i`` are what is tested.

* :func:`paired_t_test`: Student's paired t-test, two-sided; the t distribution's CDF for an
  integer number of degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3–4), so no
  special-function library is needed;
* :func:`bootstrap_ci`: percentile bootstrap interval of the mean difference (pairs resampled);
* :func:`paired_variance_test`: the Pitman–Morgan test of equal variances of paired samples: do
  the distilled students' test MAEs vary less (or more) from seed to seed than the scratch
  students'? (A teacher can make students steadier without moving their mean.)
* :func:`kd_vs_scratch`: the ``kd_vs_scratch`` entry of ``metrics.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: significance level of the verdict
ALPHA = 0.05
BOOTSTRAP_SAMPLES = 10_000


def t_cdf_two_sided(t: float, dof: int) -> float:
    """``P(|T| <= |t|)`` for Student's t with ``dof`` >= 1 degrees of freedom."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if dof % 2 == 1:
        # A = 2/π [θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...)], ν−3 over 2 terms
        total, term = 0.0, 1.0
        for k in range((dof - 1) // 2):
            total += term
            term *= c2 * (2 * k + 2) / (2 * k + 3)
        series = s * math.cos(theta) * total if dof > 1 else 0.0
        return 2.0 / math.pi * (theta + series)
    # A = sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...), ν/2 terms
    total, term = 0.0, 1.0
    for k in range(dof // 2):
        total += term
        term *= c2 * (2 * k + 1) / (2 * k + 2)
    return s * total


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``mean(a − b) = 0``: ``(t, p)``.

    Needs at least 2 pairs; identical differences give ``t = ±inf, p = 0`` (or ``t = 0, p = 1``
    when they are all 0).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"needs at least 2 pairs of equal length, got {len(d)}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(len(d)))
    return t, max(0.0, 1.0 - t_cdf_two_sided(t, len(d) - 1))


def paired_variance_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Pitman–Morgan test of ``var(a) = var(b)`` for paired samples: ``(r, p)``.

    ``var(a) = var(b)`` exactly when ``a + b`` and ``a − b`` are uncorrelated, so the test is the
    t-test of their correlation ``r``: ``t = r·√(n − 2) / √(1 − r²)`` with ``n − 2`` degrees of
    freedom (Pitman 1939, Morgan 1939). ``r < 0``: ``a`` varies less than ``b``. Needs at least 3
    pairs; ``p`` is 1 when either sum or difference is constant (no evidence either way), 0 when
    ``|r| = 1``.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 3:
        raise ValueError(f"needs at least 3 pairs of equal length, got {len(x)} and {len(y)}")
    total, diff = x + y, x - y
    if float(total.std()) == 0.0 or float(diff.std()) == 0.0:
        return 0.0, 1.0
    r = float(np.clip(np.corrcoef(total, diff)[0, 1], -1.0, 1.0))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt(len(x) - 2) / math.sqrt(1.0 - r * r)
    return r, max(0.0, 1.0 - t_cdf_two_sided(t, len(x) - 2))


def bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    level: float = 0.95,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(a − b)``, resampling the pairs (seeded)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def gap_closed(kd_mean: float, scratch_mean: float, teacher: float) -> float | None:
    """Share of the scratch→teacher MAE gap the distilled students close.

    ``(scratch − kd) / (scratch − teacher)``: 1 = as good as the teacher, 0 = no better than
    scratch, negative = worse. None when the teacher is not better than the scratch students
    (there is no gap to close).
    """
    gap = scratch_mean - teacher
    if not gap > 0:
        return None
    return (scratch_mean - kd_mean) / gap


def verdict(entry: dict[str, Any]) -> str:
    """A plain-words reading of a ``kd_vs_scratch`` entry."""
    n = len(entry["kd"]["mae"])
    p, diff = entry.get("p_value"), entry["mean_difference"]
    if p is None:
        return f"with {n} seed(s) per student there is no test: run with --seeds 2 or more"
    if diff < 0 and p < ALPHA:
        text = (
            f"distillation helped: the distilled students' test MAE is lower by {-diff:.3f} on "
            f"average over {n} seeds (paired t-test p = {p:.3g})"
        )
    elif diff > 0 and p < ALPHA:
        text = (
            f"distillation hurt: the distilled students' test MAE is higher by {diff:.3f} on "
            f"average over {n} seeds (paired t-test p = {p:.3g})"
        )
    else:
        way = "lower" if diff < 0 else "higher"
        text = (
            f"distillation did not help at this sample size: the mean test MAE is {abs(diff):.3f} "
            f"{way} with it over {n} seeds, but p = {p:.3g} >= {ALPHA}"
        )
    g = entry.get("gap_closed")
    if g is not None:
        text += f"; it closes {100 * g:.0f} % of the gap between scratch student and teacher"
    spread = entry.get("spread")
    if spread and spread["p_value"] is not None and spread["p_value"] < ALPHA:
        way = "less" if spread["kd_sd"] < spread["scratch_sd"] else "more"
        text += (
            f"; the distilled students vary {way} from seed to seed (sd {spread['kd_sd']:.3f} vs "
            f"{spread['scratch_sd']:.3f}, Pitman–Morgan p = {spread['p_value']:.3g})"
        )
    return text


def kd_vs_scratch(
    kd: Sequence[float], scratch: Sequence[float], teacher_mae: float, seeds: Sequence[int]
) -> dict[str, Any]:
    """The ``kd_vs_scratch`` entry: per-seed test MAEs, paired test, bootstrap interval, gap,
    and ``spread``: the seed-to-seed standard deviations and their paired test (3 seeds or more).

    Args:
        kd, scratch: test MAE of the distilled and the scratch student of each seed (paired).
        teacher_mae: the teacher's test MAE.
        seeds: the seeds, in the order of the MAEs.
    """
    if len(kd) != len(scratch) or len(kd) != len(seeds) or not kd:
        raise ValueError("needs one distilled and one scratch MAE per seed")
    diff = float(np.mean(np.asarray(kd) - np.asarray(scratch)))
    entry: dict[str, Any] = {
        "seeds": [int(s) for s in seeds],
        "kd": {"mae": [float(v) for v in kd], "mean": float(np.mean(kd))},
        "scratch": {"mae": [float(v) for v in scratch], "mean": float(np.mean(scratch))},
        "teacher_mae": float(teacher_mae),
        "mean_difference": diff,
        "p_value": None,
        "t": None,
        "ci95": None,
        "gap_closed": gap_closed(float(np.mean(kd)), float(np.mean(scratch)), teacher_mae),
        "wins": int(sum(a < b for a, b in zip(kd, scratch, strict=True))),
    }
    if len(kd) >= 2:
        t, p = paired_t_test(kd, scratch)
        entry["t"] = t if math.isfinite(t) else None
        entry["p_value"] = p
        entry["ci95"] = list(bootstrap_ci(kd, scratch))
    if len(kd) >= 3:
        r, p = paired_variance_test(kd, scratch)
        entry["spread"] = {
            "kd_sd": float(np.std(kd, ddof=1)),
            "scratch_sd": float(np.std(scratch, ddof=1)),
            "r": r,
            "p_value": p,
        }
    entry["verdict"] = verdict(entry)
    return entry
