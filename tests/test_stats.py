"""kd-vs-scratch statistics: the t distribution against printed tables, the paired test by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stkd_dist.stats import (
    bootstrap_ci,
    gap_closed,
    kd_vs_scratch,
    paired_t_test,
    paired_variance_test,
    t_cdf_two_sided,
)


@pytest.mark.parametrize(
    "t, dof, p",
    [  # two-sided critical values of Student's t (standard tables)
        (12.706, 1, 0.05),
        (4.303, 2, 0.05),
        (2.776, 4, 0.05),
        (4.604, 4, 0.01),
        (2.571, 5, 0.05),
        (2.228, 10, 0.05),
        (0.0, 3, 1.0),
    ],
)
def test_t_distribution_matches_tables(t: float, dof: int, p: float) -> None:
    assert 1.0 - t_cdf_two_sided(t, dof) == pytest.approx(p, abs=2e-4)


def test_paired_t_by_hand() -> None:
    kd, scratch = [3.0, 3.1, 2.9, 3.2], [3.2, 3.2, 3.1, 3.3]
    # d = (-0.2, -0.1, -0.2, -0.1): mean -0.15, sd 0.057735, t = -0.15 / (0.057735 / 2) = -5.196
    t, p = paired_t_test(kd, scratch)
    assert t == pytest.approx(-5.196152, rel=1e-6)
    assert p == pytest.approx(0.013847, abs=2e-5)  # 3 degrees of freedom
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)
    assert paired_t_test([1.0, 2.0], [2.0, 3.0]) == (-math.inf, 0.0)


def test_bootstrap_interval_brackets_the_mean_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(3.0, 0.1, 8), rng.normal(3.2, 0.1, 8)
    lo, hi = bootstrap_ci(a, b)
    assert lo < float(np.mean(a - b)) < hi
    assert bootstrap_ci(a, b) == (lo, hi)


def test_gap_closed() -> None:
    assert gap_closed(kd_mean=3.5, scratch_mean=4.0, teacher=3.0) == pytest.approx(0.5)
    assert gap_closed(4.5, 4.0, 3.0) == pytest.approx(-0.5)
    assert gap_closed(3.5, 4.0, 4.2) is None  # the teacher is worse: no gap to close


def test_entry_and_verdict() -> None:
    e = kd_vs_scratch([3.0, 3.1, 2.9, 3.2], [3.2, 3.2, 3.1, 3.3], 2.8, [0, 1, 2, 3])
    assert e["kd"]["mae"] == [3.0, 3.1, 2.9, 3.2] and e["seeds"] == [0, 1, 2, 3]
    assert e["mean_difference"] == pytest.approx(-0.15)
    assert e["gap_closed"] == pytest.approx(0.15 / 0.4)
    assert e["wins"] == 4 and e["ci95"][1] < 0
    assert e["verdict"].startswith("distillation helped") and "38 %" in e["verdict"]
    flat = kd_vs_scratch([3.0, 3.3], [3.1, 3.1], 2.8, [0, 1])
    assert flat["verdict"].startswith("distillation did not help at this sample size")
    one = kd_vs_scratch([3.0], [3.1], 2.8, [0])
    assert one["p_value"] is None and "no test" in one["verdict"]


def _t_tail_reference(t: float, dof: int) -> float:
    """Two-sided tail ``P(|T| > |t|)`` by integrating Student's t density numerically."""
    x = np.linspace(abs(t), 4000.0, 4_000_001)
    c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
    pdf = c * (1 + x * x / dof) ** (-(dof + 1) / 2)
    return float(2 * np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))


def test_paired_variance_test_matches_pitmans_statistic() -> None:
    # the PEMS08-prefix seeds of bench/RESULTS.md: steady distilled, scattered scratch students
    kd = [25.388, 25.292, 25.306, 25.218, 25.275]
    scratch = [25.685, 25.776, 24.359, 27.021, 25.332]
    r, p = paired_variance_test(kd, scratch)
    n, f = 5, np.var(kd, ddof=1) / np.var(scratch, ddof=1)
    rho = np.corrcoef(kd, scratch)[0, 1]
    # Pitman's own form of the statistic, from the variance ratio and the pairs' correlation
    t_ref = (f - 1) * math.sqrt(n - 2) / (2 * math.sqrt(f * (1 - rho**2)))
    assert r * math.sqrt(n - 2) / math.sqrt(1 - r * r) == pytest.approx(t_ref, rel=1e-9)
    assert p == pytest.approx(_t_tail_reference(t_ref, n - 2), rel=1e-4)
    assert r < 0 and p < 0.01  # kd varies less
    r2, p2 = paired_variance_test(scratch, kd)  # swapped: same p, opposite sign
    assert r2 == pytest.approx(-r) and p2 == pytest.approx(p)


def test_paired_variance_test_edge_cases() -> None:
    assert paired_variance_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)  # no difference
    with pytest.raises(ValueError, match="at least 3 pairs"):
        paired_variance_test([1.0, 2.0], [1.0, 2.5])
    e = kd_vs_scratch(
        [25.388, 25.292, 25.306, 25.218, 25.275],
        [25.685, 25.776, 24.359, 27.021, 25.332],
        26.2,
        range(5),
    )
    assert e["spread"]["kd_sd"] == pytest.approx(np.std(e["kd"]["mae"], ddof=1))
    assert "vary less from seed to seed" in e["verdict"] and "Pitman–Morgan" in e["verdict"]
    assert "spread" not in kd_vs_scratch([3.0, 3.3], [3.1, 3.1], 2.8, [0, 1])
