"""What the training loop does around each optimiser step: seeding and mid-epoch checkpoints.

* :func:`seed_step` seeds torch, NumPy and Python's ``random`` before every step from
  ``(run.seed, rank, epoch, step)``. Ranks therefore draw different dropout masks, yet the random
  state at any step is a pure function of where training is: a run resumed at step ``s`` of
  epoch ``e`` draws exactly what the uninterrupted run drew there, with no generator state saved.
* :class:`EpochProgress` is one rank's sums over the epoch's steps so far (the epoch's reported
  loss and sample count), kept in a mid-epoch checkpoint for every rank.
* :class:`StepCheckpoints` decides, identically on every rank, after which steps a mid-epoch
  checkpoint is taken (``checkpoint.every_steps``, ``checkpoint.every_minutes``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stkd_dist.config import CheckpointSection

#: the metric Ray Train ranks checkpoints by (lowest first) when it prunes them (run.keep_best)
SCORE = "checkpoint_score"
#: the score of a mid-epoch checkpoint, or of an epoch whose validation MAE is not finite: worse
#: than any epoch's, so Ray keeps it only while it is the latest. Finite, because Ray's snapshot
#: of its checkpoints is JSON and would bring an infinity back as null.
WORST_SCORE = 1e300


def checkpoint_score(val_mae: float | None) -> float:
    """What a report gives Ray as :data:`SCORE`: the validation MAE, or :data:`WORST_SCORE`."""
    if val_mae is None or not math.isfinite(val_mae):
        return WORST_SCORE
    return float(val_mae)


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A 63-bit seed for ``step`` of ``epoch`` on ``rank`` (NumPy's SeedSequence mixes the four,
    so neighbouring steps or ranks get unrelated streams)."""
    hi, lo = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, np.uint32)
    return (int(hi) << 31) ^ int(lo)


def seed_step(seed: int, rank: int, epoch: int, step: int) -> None:
    """Seed every generator a training step may draw from (torch on all devices, NumPy, Python)."""
    s = step_seed(seed, rank, epoch, step)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def seed_step_from(seed: int, rank: int, epoch: int, before: int, step: int) -> None:
    """:func:`seed_step` of step ``before + step``: the ``step``-th step of an epoch whose first
    ``before`` steps ran in an earlier deal (a re-dealt epoch's steps draw new masks)."""
    seed_step(seed, rank, epoch, before + step)


@dataclass
class EpochProgress:
    """One rank's sums over the steps of the current epoch.

    Attributes:
        loss_sum: the weighted loss sum (``sum(mean * weight)``).
        weight_sum: the loss terms it sums.
        samples: the windows trained on (padding excluded).
        hooks: what the loss's epoch hooks keep over the epoch (e.g. a student's loss parts).
    """

    loss_sum: float = 0.0
    weight_sum: float = 0.0
    samples: int = 0
    hooks: dict[str, Any] = field(default_factory=dict)

    def add(self, mean: float, weight: float, samples: int) -> None:
        """Account one step."""
        self.loss_sum += mean * weight
        self.weight_sum += weight
        self.samples += samples

    def to_json(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "weight_sum": self.weight_sum,
            "samples": self.samples,
            "hooks": dict(self.hooks),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpochProgress:
        return cls(
            float(d["loss_sum"]), float(d["weight_sum"]), int(d["samples"]), dict(d["hooks"])
        )


def gather_progress(progress: EpochProgress, world_size: int) -> list[dict[str, Any]]:
    """Every rank's progress, entry ``r`` rank ``r``'s.

    SYNC: one ``all_gather_object``; every rank calls it at the same step. The sums are kept per
    rank (not summed here) so a resumed epoch adds the same numbers in the same order as an
    uninterrupted one, and its metrics match to the last digit.
    """
    mine = progress.to_json()
    if world_size == 1:
        return [mine]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, mine)
    return out


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _add(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in a | b}
    return a + b


def regroup_progress(partial: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The progress of an epoch re-dealt to ``world_size`` ranks (elastic training).

    The old ranks' sums (loss, weights, samples and the hooks' sums, nested dicts of numbers
    added key by key: :meth:`EpochHooks.partial` returns sums for this reason) go to the new
    rank 0 and the other ranks start from zero, so the epoch's totals stay the same.
    """
    total = EpochProgress()
    for p in partial:
        old = EpochProgress.from_json(p)
        total.loss_sum += old.loss_sum
        total.weight_sum += old.weight_sum
        total.samples += old.samples
        total.hooks = _add(total.hooks, old.hooks) if total.hooks else dict(old.hooks)
    return [total.to_json()] + [EpochProgress().to_json() for _ in range(world_size - 1)]


class StepCheckpoints:
    """After which optimiser steps of an epoch a mid-epoch checkpoint is taken.

    Every rank holds one and calls :meth:`due` after every step, in lockstep: ``every_steps``
    is a pure function of the step; with ``every_minutes`` rank 0's clock decides and
    :meth:`due` broadcasts its decision (SYNC: one broadcast per step, on every rank), because
    ranks' clocks would disagree on the step where the minutes run out.

    Args:
        section: the ``checkpoint`` section.
        world_size: the DDP world size.
        device: the device collectives run on (the rank's CUDA device under NCCL).
        clock: monotonic clock in seconds (tests).
    """

    def __init__(
        self,
        section: CheckpointSection,
        world_size: int,
        device: torch.device | str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.section = section
        self.world_size = world_size
        self.device = device
        self._clock = clock
        self._last = clock()

    def mark(self) -> None:
        """A checkpoint was just written (any kind): the minutes count from now."""
        self._last = self._clock()

    def due(self, step: int, num_batches: int) -> bool:
        """Whether to checkpoint after ``step`` steps (1-based) of an epoch of ``num_batches``.

        Never after the epoch's last step: the epoch checkpoint follows it.
        """
        s = self.section
        if not s.enabled:
            return False
        by_steps = s.every_steps > 0 and step % s.every_steps == 0
        if s.every_minutes > 0:
            late = self._clock() - self._last >= s.every_minutes * 60
            flag = torch.tensor([int(late)], dtype=torch.int64, device=self.device)
            if self.world_size > 1:
                dist.broadcast(flag, src=0)  # SYNC: rank 0's clock decides for every rank
            by_steps = by_steps or bool(flag.item())
        return by_steps and step < num_batches
