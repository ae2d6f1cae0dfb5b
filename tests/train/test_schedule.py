"""Learning-rate schedule golden values (warm-up + cosine, step, constant) and LambdaLR stepping."""

from __future__ import annotations

import math

import pytest
import torch

from stkd_dist.config import ScheduleSection
from stkd_dist.train.schedule import build_scheduler, lr_at


def test_warmup_then_cosine_golden_values() -> None:
    s = ScheduleSection(epochs=10, warmup_epochs=2, kind="cosine", min_lr=0.0)
    lrs = [lr_at(e, s, 1.0) for e in range(10)]
    # warm-up: (e + 1) / (W + 1) = 1/3, 2/3; then cosine over 8 epochs from 1.0
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5)  # half way through the cosine
    assert lrs[9] == pytest.approx(0.0380602337, abs=1e-9)


def test_cosine_floor_is_min_lr() -> None:
    s = ScheduleSection(epochs=5, warmup_epochs=0, kind="cosine", min_lr=1e-4)
    lrs = [lr_at(e, s, 1e-3) for e in range(5)]
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert lr_at(50, s, 1e-3) == pytest.approx(1e-4)  # past the end stays at the floor


def test_step_and_constant_golden_values() -> None:
    s = ScheduleSection(epochs=12, warmup_epochs=1, kind="step", step_size=3, gamma=0.1)
    lrs = [lr_at(e, s, 0.01) for e in range(8)]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.0001])
    c = ScheduleSection(epochs=4, warmup_epochs=0, kind="constant")
    assert [lr_at(e, c, 0.3) for e in range(4)] == pytest.approx([0.3] * 4)


def test_lambda_lr_follows_the_formula_and_resumes_from_state() -> None:
    s = ScheduleSection(epochs=6, warmup_epochs=1, kind="cosine", min_lr=1e-4)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-3)
    sched = build_scheduler(opt, s)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(e, s, 2e-3) for e in range(3)])
    # a fresh optimiser + scheduler loaded from the state continue at epoch 3
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched2 = build_scheduler(opt2, s)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(3, s, 2e-3))
