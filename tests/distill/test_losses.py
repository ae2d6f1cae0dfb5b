"""Distillation losses: NumPy golden values, masking, and what α and β do to the gradients."""

from __future__ import annotations

import pytest
import torch

from stkd_dist.distill import (
    LOSSES,
    HintonKD,
    RegressionKD,
    as_class_logits,
    build_loss,
    speed_to_classes,
)
from stkd_dist.errors import ConfigError, InputError


def _regression_call(loss: RegressionKD, x: dict, features: bool, student=None):
    return loss(
        x["student"] if student is None else student,
        x["target"],
        x["mask"],
        x["teacher"],
        valid=x["valid"],
        teacher_log_var=x["teacher_log_var"],
        student_feat=x["student_feat"] if features else None,
        teacher_feat=x["teacher_feat"] if features else None,
    )


def test_regression_matches_golden(golden: dict) -> None:
    x = golden["x"]
    for case in golden["regression"]:
        loss, parts = _regression_call(
            build_loss("regression", **case["kwargs"]), x, case["features"]
        )
        for name, expected in case["expected"].items():
            assert parts[name] == pytest.approx(expected, rel=1e-6, abs=1e-12), (case, name)
        assert loss.item() == pytest.approx(case["expected"]["loss"], rel=1e-6)


def test_hinton_matches_golden(golden: dict) -> None:
    x = golden["x"]
    for case in golden["hinton"]:
        k = case["logits"]
        loss, parts = build_loss("hinton", **case["kwargs"])(
            x[f"student_logits{k}"],
            x["speed"],
            x["mask"],
            x[f"teacher_logits{k}"],
            valid=x["valid"],
        )
        for name, expected in case["expected"].items():
            assert parts[name] == pytest.approx(expected, rel=1e-6), (case, name)
        assert loss.item() == pytest.approx(case["expected"]["loss"], rel=1e-6)


def test_registry_keys() -> None:
    assert {"regression", "hinton"} <= set(LOSSES.keys())
    with pytest.raises(ConfigError, match="unknown argument"):
        build_loss("regression", temperature=2.0)


def _grad(loss: RegressionKD, x: dict, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    student = x["student"].clone().requires_grad_(True)
    value, _ = loss(student, target, x["mask"], teacher, valid=x["valid"])
    value.backward()
    return student.grad


def test_alpha_one_ignores_the_teacher(golden: dict) -> None:
    x = golden["x"]
    loss = RegressionKD(alpha=1.0, task="mse")
    a = _grad(loss, x, x["teacher"], x["target"])
    b = _grad(loss, x, x["teacher"] + 100.0, x["target"])
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_alpha_zero_ignores_the_target(golden: dict) -> None:
    x = golden["x"]
    loss = RegressionKD(alpha=0.0, match="huber")
    a = _grad(loss, x, x["teacher"], x["target"])
    b = _grad(loss, x, x["teacher"], x["target"] + 100.0)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_padding_samples_are_excluded(golden: dict) -> None:
    x = golden["x"]
    g = _grad(RegressionKD(alpha=0.5, beta=1.0), x, x["teacher"], x["target"])
    assert torch.all(g[~x["valid"]] == 0)  # sample 2 is padding
    assert g[x["valid"]].abs().sum() > 0


def test_match_term_covers_unobserved_targets(golden: dict) -> None:
    x = golden["x"]
    g = _grad(RegressionKD(alpha=0.0), x, x["teacher"], x["target"])
    unobserved_valid = ~x["mask"] & x["valid"][:, None, None, None]
    assert unobserved_valid.any()
    assert torch.all(g[unobserved_valid] != 0)  # the dense teacher still teaches there


@pytest.mark.parametrize("kwargs", [{}, {"beta": 0.5, "task": "huber"}, {"alpha": 0.0}])
def test_a_gradient_step_decreases_the_loss(golden: dict, kwargs: dict) -> None:
    x = golden["x"]
    loss = RegressionKD(**kwargs)
    student = x["student"].clone().requires_grad_(True)
    opt = torch.optim.SGD([student], lr=0.5)
    before, _ = loss(student, x["target"], x["mask"], x["teacher"], valid=x["valid"])
    before.backward()
    opt.step()
    after, _ = loss(student, x["target"], x["mask"], x["teacher"], valid=x["valid"])
    assert after.item() < before.item()


def test_hinton_gradient_step_and_alpha(golden: dict) -> None:
    x = golden["x"]
    s = x["student_logits4"].clone().requires_grad_(True)
    kd = HintonKD(alpha=0.5)
    before, _ = kd(s, x["speed"], x["mask"], x["teacher_logits4"], valid=x["valid"])
    before.backward()
    assert torch.all(s.grad[~x["valid"]] == 0)
    with torch.no_grad():
        s -= 2.0 * s.grad
    after, _ = kd(s, x["speed"], x["mask"], x["teacher_logits4"], valid=x["valid"])
    assert after.item() < before.item()
    # alpha = 1: only the hard labels count
    only_ce = HintonKD(alpha=1.0)
    a, _ = only_ce(s, x["speed"], x["mask"], x["teacher_logits4"])
    b, _ = only_ce(s, x["speed"], x["mask"], -x["teacher_logits4"])
    assert torch.equal(a, b)


def test_confidence_weighting_needs_log_var(golden: dict) -> None:
    x = golden["x"]
    with pytest.raises(ConfigError, match="spread=True"):
        RegressionKD(confidence_weighting=True)(x["student"], x["target"], x["mask"], x["teacher"])


def test_confidence_weighting_follows_the_confident_teacher() -> None:
    student = torch.zeros(1, 2, 1, 1, requires_grad=True)
    teacher = torch.ones(1, 2, 1, 1)
    log_var = torch.tensor([-2.0, 2.0]).reshape(1, 2, 1, 1)  # confident on step 0 only
    loss = RegressionKD(alpha=0.0, confidence_weighting=True)
    value, _ = loss(student, teacher, torch.ones_like(teacher, dtype=torch.bool), teacher,
                    teacher_log_var=log_var)  # fmt: skip
    value.backward()
    g = student.grad.flatten().abs()
    assert g[0] > 10 * g[1]


def test_bad_inputs_and_config_raise(golden: dict) -> None:
    x = golden["x"]
    with pytest.raises(ConfigError, match="alpha"):
        RegressionKD(alpha=1.5)
    with pytest.raises(ConfigError, match=r"loss\.match"):
        RegressionKD(match="l3")
    with pytest.raises(InputError, match="teacher"):
        RegressionKD()(x["student"], x["target"], x["mask"], x["teacher"][:, :2])
    with pytest.raises(InputError, match="both"):
        RegressionKD(beta=1.0)(
            x["student"], x["target"], x["mask"], x["teacher"], student_feat=x["student_feat"]
        )
    with pytest.raises(InputError, match="project"):
        RegressionKD(beta=1.0)(
            x["student"],
            x["target"],
            x["mask"],
            x["teacher"],
            student_feat=x["student_feat"][..., :2],
            teacher_feat=x["teacher_feat"],
        )
    with pytest.raises(ConfigError, match="strictly increasing"):
        HintonKD(thresholds=(40.0, 20.0))
    with pytest.raises(InputError, match="K=4"):
        HintonKD()(x["student_logits3"], x["speed"], x["mask"], x["teacher_logits3"])


def test_speed_to_classes_boundaries() -> None:
    speed = torch.tensor([0.0, 19.9, 20.0, 39.99, 40.0, 59.0, 60.0, 120.0])
    assert speed_to_classes(speed).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert speed_to_classes(speed, (50.0,)).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_as_class_logits() -> None:
    out = torch.arange(2 * 3 * 8, dtype=torch.float32).reshape(1, 2, 3, 8)
    logits = as_class_logits(out, 4)
    assert logits.shape == (1, 2, 3, 2, 4)
    assert torch.equal(logits[0, 1, 2, 1], out[0, 1, 2, 4:])
    with pytest.raises(InputError, match="multiple"):
        as_class_logits(out, 3)
