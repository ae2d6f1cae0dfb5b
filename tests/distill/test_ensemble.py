"""Multi-teacher ensembles against the NumPy golden values."""

from __future__ import annotations

import pytest
import torch

from stkd_dist.distill import combine_teachers, teacher_weights
from stkd_dist.errors import ConfigError, InputError


def test_ensemble_matches_golden(golden: dict) -> None:
    x = golden["x"]
    preds, log_vars = list(x["ens_preds"]), list(x["ens_log_vars"])
    for case in golden["ensemble"]:
        expected_mean = torch.tensor(case["mean"], dtype=torch.float64)
        expected_lv = torch.tensor(case["log_var"], dtype=torch.float64)
        mean = combine_teachers(preds, case["rule"], case["val_errors"])
        torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-9)
        mean2, log_var = combine_teachers(preds, case["rule"], case["val_errors"], log_vars)
        torch.testing.assert_close(mean2, expected_mean, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(log_var, expected_lv, rtol=1e-6, atol=1e-9)


def test_inverse_error_weights() -> None:
    assert teacher_weights(3, "inverse_error", [1.0, 2.0, 4.0]) == pytest.approx(
        [4 / 7, 2 / 7, 1 / 7]
    )
    assert teacher_weights(2) == [0.5, 0.5]


def test_single_teacher_is_itself() -> None:
    p, lv = torch.randn(2, 3), torch.randn(2, 3)
    mean, log_var = combine_teachers([p], "mean", None, [lv])
    torch.testing.assert_close(mean, p)
    torch.testing.assert_close(log_var, lv)


def test_bad_arguments_raise() -> None:
    p = [torch.zeros(2), torch.ones(2)]
    with pytest.raises(ConfigError, match="one validation error per teacher"):
        combine_teachers(p, "inverse_error")
    with pytest.raises(ConfigError, match="finite and positive"):
        combine_teachers(p, "inverse_error", [1.0, 0.0])
    with pytest.raises(ConfigError, match=r"ensemble\.rule"):
        combine_teachers(p, "median")
    with pytest.raises(InputError, match="shape"):
        combine_teachers([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(InputError, match="at least one"):
        combine_teachers([])
