"""Per-step seeding and the decision of when to take a mid-epoch checkpoint (one process)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stkd_dist.config import CheckpointSection
from stkd_dist.errors import ConfigError
from stkd_dist.train.steps import (
    EpochProgress,
    StepCheckpoints,
    regroup_progress,
    seed_step,
    step_seed,
)


def _draws() -> tuple[torch.Tensor, float, float]:
    mask = torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True)
    return mask, float(np.random.random()), random.random()


def test_each_rank_and_step_draws_its_own_reproducible_stream() -> None:
    seen = {}
    for rank in range(2):
        for epoch in range(2):
            for step in range(3):
                seed_step(7, rank, epoch, step)
                seen[rank, epoch, step] = _draws()
    # the same place in training draws the same numbers from every generator, whatever ran before
    seed_step(7, 1, 1, 2)
    again = _draws()
    assert torch.equal(again[0], seen[1, 1, 2][0]) and again[1:] == seen[1, 1, 2][1:]
    # ranks differ (different dropout masks under DDP), and so do steps and epochs
    masks = [m for m, _, _ in seen.values()]
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)
    assert step_seed(0, 0, 0, 1) != step_seed(0, 0, 1, 0) != step_seed(1, 0, 0, 0)
    assert 0 <= step_seed(2**31, 7, 9, 10**6) < 2**63


def test_every_steps_checkpoints_inside_the_epoch_only() -> None:
    steps = StepCheckpoints(CheckpointSection(every_steps=3), world_size=1)
    assert [s for s in range(1, 10) if steps.due(s, num_batches=9)] == [3, 6]  # 9: the epoch's
    assert not any(StepCheckpoints(CheckpointSection(), 1).due(s, 9) for s in range(1, 10))


def test_every_minutes_counts_from_the_last_checkpoint() -> None:
    now = [0.0]
    steps = StepCheckpoints(CheckpointSection(every_minutes=0.5), 1, clock=lambda: now[0])
    now[0] = 29.0
    assert not steps.due(1, 100)
    now[0] = 30.0
    assert steps.due(2, 100)
    steps.mark()
    now[0] = 59.0
    assert not steps.due(3, 100)
    now[0] = 60.0
    assert steps.due(4, 100) and not steps.due(100, 100)


def test_checkpoint_section_refuses_negative_intervals() -> None:
    with pytest.raises(ConfigError, match="every_steps"):
        CheckpointSection(every_steps=-1)


def test_epoch_progress_round_trips_through_json() -> None:
    p = EpochProgress()
    p.add(0.1, 3.0, 2)
    p.add(0.7, 5.0, 4)
    p.hooks = {"parts": {"kd": 1.5}, "weight": 8.0}
    q = EpochProgress.from_json(p.to_json())
    assert q == p and q.loss_sum == 0.1 * 3.0 + 0.7 * 5.0


def test_a_re_dealt_epoch_keeps_its_sums_on_the_new_rank_0() -> None:
    old = []
    for r in range(3):
        p = EpochProgress(loss_sum=1.0 + r, weight_sum=10.0 * r, samples=5 + r)
        p.hooks = {"parts": {"kd": 0.5 * r, "task": 1.0}, "weight": 2.0 + r}
        old.append(p.to_json())
    new = [EpochProgress.from_json(d) for d in regroup_progress(old, 2)]
    assert len(new) == 2
    assert (new[0].loss_sum, new[0].weight_sum, new[0].samples) == (6.0, 30.0, 18)
    assert new[0].hooks == {"parts": {"kd": 1.5, "task": 3.0}, "weight": 9.0}
    assert new[1] == EpochProgress()  # the others start from nothing
