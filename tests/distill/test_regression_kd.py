"""The teacher-bounded and hint losses against a NumPy reference written here, and their config.

The reference computes each loss from its definition with plain NumPy loops over the entries, so
it shares no code with the torch implementation (criteria, masking helpers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stkd_dist.config import load_config
from stkd_dist.config.validate import validate_config
from stkd_dist.distill import LOSSES, build_loss
from stkd_dist.errors import ConfigError, InputError

SHAPE = (3, 2, 4, 1)  # batch, H, node, C


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.normal(50, 5, SHAPE)
    missing = rng.random(SHAPE) < 0.2
    return {
        "student": target + rng.normal(0, 3, SHAPE),
        "teacher": target + rng.normal(0, 2, SHAPE),
        # some targets missing (NaN, mask False), as batches have them
        "target": np.where(missing, np.nan, target),
        "mask": ~missing,
        "valid": np.array([True, True, False]),  # the last sample is padding
        "student_feat": rng.normal(0, 1, (3, 4, 5)),
        "teacher_feat": rng.normal(0, 1, (3, 4, 5)),
    }


def _err(kind: str, a: float, b: float, delta: float = 1.0) -> float:
    d = a - b
    if kind == "mae":
        return abs(d)
    if kind == "mse":
        return d * d
    return 0.5 * d * d if abs(d) <= delta else delta * (abs(d) - 0.5 * delta)


def reference_teacher_bounded(x: dict, alpha: float, margin: float, task: str, match: str) -> dict:
    """Mean over observed entries of valid samples; the teacher term only where it is closer."""
    mask = x["mask"] & ~np.isnan(x["target"])
    task_sum = match_sum = 0.0
    count = active = 0
    for idx in np.ndindex(*SHAPE):
        if not (x["valid"][idx[0]] and mask[idx]):
            continue
        s, t, y = x["student"][idx], x["teacher"][idx], x["target"][idx]
        count += 1
        task_sum += _err(task, s, y)
        if abs(s - y) > abs(t - y) + margin:
            active += 1
            match_sum += _err(match, s, t)
    task_v, match_v = task_sum / count, match_sum / count
    return {
        "task": task_v,
        "match": match_v,
        "active": active / count,
        "loss": alpha * task_v + (1 - alpha) * match_v,
    }


def reference_hint(x: dict, alpha: float, beta: float) -> dict:
    """MAE task over observed entries, MAE match over every entry, MSE hint, valid samples only."""
    mask = x["mask"] & ~np.isnan(x["target"])
    task, match = [], []
    for idx in np.ndindex(*SHAPE):
        if not x["valid"][idx[0]]:
            continue
        s = x["student"][idx]
        match.append(abs(s - x["teacher"][idx]))
        if mask[idx]:
            task.append(abs(s - x["target"][idx]))
    hint = [
        (x["student_feat"][idx] - x["teacher_feat"][idx]) ** 2
        for idx in np.ndindex(*x["student_feat"].shape)
        if x["valid"][idx[0]]
    ]
    t, m, h = float(np.mean(task)), float(np.mean(match)), float(np.mean(hint))
    return {"task": t, "match": m, "hint": h, "loss": alpha * t + (1 - alpha) * m + beta * h}


def _torch(x: dict) -> dict:
    return {
        k: torch.tensor(v, dtype=torch.bool if v.dtype == bool else torch.float64)
        for k, v in x.items()
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 0.5, "margin": 0.0},
        {"alpha": 0.3, "margin": 1.0, "task": "mse", "match": "huber"},
        {"alpha": 0.0, "margin": 0.5, "match": "mse"},
    ],
)
def test_teacher_bounded_matches_numpy(kwargs: dict) -> None:
    x = _inputs()
    t = _torch(x)
    loss, parts = build_loss("teacher_bounded", **kwargs)(
        t["student"], t["target"], t["mask"], t["teacher"], valid=t["valid"]
    )
    ref = reference_teacher_bounded(
        x,
        kwargs["alpha"],
        kwargs["margin"],
        kwargs.get("task", "mae"),
        kwargs.get("match", "mae"),
    )
    for name, expected in ref.items():
        assert parts[name] == pytest.approx(expected, rel=1e-9), name
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-9)
    assert 0 < parts["active"] < 1  # the case really has both open and closed gates


def test_teacher_bounded_never_pulls_where_the_student_is_closer() -> None:
    target = torch.zeros(1, 1, 2, 1)
    student = torch.tensor([0.5, 3.0]).reshape(1, 1, 2, 1).requires_grad_()
    teacher = torch.tensor([2.0, 1.0]).reshape(1, 1, 2, 1)  # worse on node 0, better on node 1
    loss, parts = build_loss("teacher_bounded", alpha=0.0)(
        student, target, torch.ones_like(target, dtype=torch.bool), teacher
    )
    loss.backward()
    assert parts["active"] == 0.5
    # node 0: the student is closer to the truth, no gradient; node 1: pulled towards 1.0
    assert student.grad.flatten().tolist() == [0.0, pytest.approx(0.5)]


@pytest.mark.parametrize("alpha, beta", [(0.5, 1.0), (0.2, 0.3)])
def test_hint_matches_numpy(alpha: float, beta: float) -> None:
    x = _inputs(1)
    t = _torch(x)
    loss, parts = build_loss("hint", alpha=alpha, beta=beta)(
        t["student"],
        t["target"],
        t["mask"],
        t["teacher"],
        valid=t["valid"],
        student_feat=t["student_feat"],
        teacher_feat=t["teacher_feat"],
    )
    ref = reference_hint(x, alpha, beta)
    for name, expected in ref.items():
        assert parts[name] == pytest.approx(expected, rel=1e-9), name
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-9)


def test_hint_needs_features_of_the_teachers_width() -> None:
    x = _torch(_inputs())
    loss = build_loss("hint")
    with pytest.raises(InputError, match="hidden states"):
        loss(x["student"], x["target"], x["mask"], x["teacher"])
    with pytest.raises(InputError, match=r"teacher.s hidden width \(5\)"):
        loss(
            x["student"],
            x["target"],
            x["mask"],
            x["teacher"],
            student_feat=x["student_feat"][..., :3],
            teacher_feat=x["teacher_feat"],
        )


def test_registered_with_typed_parameters() -> None:
    assert {"teacher_bounded", "hint"} <= set(LOSSES.keys())
    with pytest.raises(ConfigError, match=r"loss\.margin"):
        build_loss("teacher_bounded", margin=-1.0)
    with pytest.raises(ConfigError, match="unknown criterion 'l3'"):
        build_loss("hint", match="l3")


@pytest.mark.parametrize(
    "overrides, key, loss",
    [
        (["distill.temperature=8"], "distill.temperature", "'regression'"),
        (["distill.loss=teacher_bounded", "distill.beta=0.5"], "distill.beta", "'teacher_bounded'"),
        (["distill.loss=hinton", "distill.margin=1"], "distill.margin", "'hinton'"),
        (
            ["distill.loss=hint", "distill.confidence_weighting=true"],
            "distill.confidence",
            "'hint'",
        ),
    ],
)
def test_a_parameter_the_loss_does_not_take_is_a_config_error(
    overrides: list[str], key: str, loss: str
) -> None:
    cfg = load_config("demo", overrides)
    with pytest.raises(ConfigError, match=rf"{key}.*: loss {loss} does not take") as err:
        validate_config(cfg, roles=())
    assert "remove" in err.value.message


def test_parameters_the_loss_takes_are_passed() -> None:
    validate_config(load_config("demo", ["distill.loss=hinton", "distill.temperature=8"]), ())
    validate_config(
        load_config("demo", ["distill.loss=teacher_bounded", "distill.margin=0.5"]), roles=()
    )
    with pytest.raises(ConfigError, match=r"distill\.margin: must be >= 0"):
        load_config("demo", ["distill.loss=teacher_bounded", "distill.margin=-0.5"])
