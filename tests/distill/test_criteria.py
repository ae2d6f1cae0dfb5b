"""Masked criteria and the Gaussian NLL against the NumPy golden values."""

from __future__ import annotations

import pytest
import torch

from stkd_dist.distill import CRITERIA, GaussianNLL, build_criterion
from stkd_dist.errors import ConfigError, InputError


def test_criteria_match_golden(golden: dict) -> None:
    x = golden["x"]
    assert {c["key"] for c in golden["criteria"]} == set(CRITERIA.keys())
    for case in golden["criteria"]:
        crit = CRITERIA.build(case["key"], **case["kwargs"])
        value = crit(x["student"], x["target"], x["mask"])
        assert float(value) == pytest.approx(case["value"], rel=1e-6, abs=1e-12), case


def test_gaussian_nll_matches_golden(golden: dict) -> None:
    x = golden["x"]
    value = GaussianNLL()(x["student"], x["teacher_log_var"], x["target"], x["mask"])
    assert float(value) == pytest.approx(golden["gaussian_nll"], rel=1e-6)


@pytest.mark.parametrize("key", ["mae", "mse", "huber"])
def test_unobserved_nan_targets_do_not_poison_gradients(key: str) -> None:
    pred = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4)
    mask = torch.rand(2, 3, 4) > 0.4
    clean = build_criterion(key)(pred, target, mask)
    nan = build_criterion(key)(pred, target.masked_fill(~mask, float("nan")), mask)
    assert torch.equal(clean, nan)
    nan.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[~mask] == 0)


def test_empty_mask_is_zero_with_a_graph() -> None:
    pred = torch.randn(2, 3, requires_grad=True)
    loss = build_criterion("mae")(pred, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(2, 3))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError, match=r"huber\.delta"):
        build_criterion("huber", huber_delta=0.0)
    with pytest.raises(ConfigError, match="unknown criterion 'mea'"):
        CRITERIA.build("mea")
    with pytest.raises(ConfigError, match="unknown argument"):
        CRITERIA.build("mae", delta=1.0)
    with pytest.raises(InputError, match="differ"):
        build_criterion("mse")(torch.zeros(2, 3), torch.zeros(3, 2))
