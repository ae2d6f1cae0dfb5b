"""Re-dealing the rest of an epoch to another world size (elastic training).

A mid-epoch checkpoint that ``W`` ranks took after ``S`` steps of batch size ``B`` says where
every rank was: rank ``r`` had trained on the first ``min(S × B, count_r)`` windows of its
sequence (padding comes last, so a rank past its windows had only padding left). When the worker
group restarts with ``W' != W`` ranks (elastic training: a node was lost, or came back), the
windows still to train on in this epoch (the rest of each rank's sequence, in rank order) are
dealt again to the ``W'`` ranks by the plan's own rules (:mod:`.plan`):

* **exact balance** (rule 3): the remaining ``n'`` windows are cut into ``W'`` consecutive runs,
  ``q' + 1`` windows for the first ``n' mod W'`` ranks and ``q' = n' // W'`` for the others;
* **equal batch counts** (rule 5): a rank with ``q'`` windows gets one padding entry, so all ranks
  iterate ``ceil(n' / W')`` entries in the same number of batches of ``B``.

Within each run the windows keep the order the old ranks would have read them in, so blocks (and
the storage chunks under them) are still read one after another. Each window of the epoch is
therefore trained on exactly once, whatever sequence of world sizes the epoch went through.

The re-dealt plan is a pure function of the epoch's first plan and its list of ``(world_size,
steps)`` deals (:attr:`ShardPlan.regroups`), so every rank, and a teacher server streaming soft
labels, rebuilds it without communicating, in O(blocks + the world sizes) memory like the plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stkd_dist.data.blocks import Piece, RankWindows, ResumedWindows
from stkd_dist.data.plan import RankShard, ShardPlan, make_plan
from stkd_dist.errors import InputError

#: one earlier deal of an epoch: ``(world_size, steps)``, that many ranks ran that many steps
Regroup = tuple[int, int]

__all__ = ["Regroup", "regroup_plan", "resume_plan", "windows_left"]


def _rest(shard: RankShard, start: int) -> list[Piece]:
    """The rank's windows from sequence position ``start`` on, as pieces of original ranks'."""
    w = shard.windows
    if start >= shard.count:
        return []
    if isinstance(w, RankWindows):
        return [(w, start, shard.count)]
    if isinstance(w, ResumedWindows):
        return w.sub(start, shard.count)
    raise InputError("only plans from make_plan can be re-dealt", where="plan")


def windows_left(plan: ShardPlan, steps: int) -> int:
    """Real windows of ``plan``'s epoch no rank has trained on after ``steps`` steps.

    A pure function of the plan, so every rank computes the same number without a collective.
    A mid-epoch checkpoint with fewer windows left than the most workers a run may continue on
    could not be re-dealt to them (each rank needs a window), so the epoch loop takes none then.
    """
    done = int(steps) * plan.batch_size  # entries every rank consumed, padding comes last
    return sum(max(0, shard.count - done) for shard in plan.ranks)


def regroup_plan(plan: ShardPlan, steps: int, world_size: int) -> ShardPlan:
    """The rest of ``plan``'s epoch after ``steps`` steps, dealt to ``world_size`` ranks.

    Args:
        plan: the epoch's plan so far (from :func:`make_plan`, or already re-dealt).
        steps: the steps every rank of ``plan`` completed (``0 < steps < plan.num_batches``).
        world_size: the ranks that continue the epoch.

    Raises:
        InputError: ``steps`` outside the epoch, or fewer windows left than ranks (each rank
            needs one, to repeat as padding).
    """
    if not 0 < steps < plan.num_batches:
        raise InputError(
            f"a plan of {plan.num_batches} steps is re-dealt after step 1..{plan.num_batches - 1}"
            f", not {steps}",
            where="steps",
        )
    if world_size <= 0:
        raise InputError(f"must be a positive integer, got {world_size!r}", where="world_size")
    done = steps * plan.batch_size  # entries every rank consumed (the same on every rank)
    pieces = [p for shard in plan.ranks for p in _rest(shard, min(done, shard.count))]
    rest = ResumedWindows(pieces)
    n = len(rest)
    if n < world_size:
        raise InputError(
            f"epoch {plan.epoch} has {n} windows left after step {steps}, fewer than the "
            f"{world_size} workers it continues on: every rank needs at least one window",
            where="world_size",
        )
    q, rem = divmod(n, world_size)
    longest = q + (rem > 0)
    shards = []
    for r in range(world_size):
        lo = r * q + min(r, rem)
        size = q + (r < rem)
        windows = ResumedWindows(rest.sub(lo, lo + size))
        shards.append(RankShard(windows.blocks, windows, longest - size))
    return ShardPlan(
        split=plan.split,
        world_size=world_size,
        epoch=plan.epoch,
        seed=plan.seed,
        batch_size=plan.batch_size,
        shuffle=plan.shuffle,
        chunk_steps=plan.chunk_steps,
        ranks=tuple(shards),
        num_batches=math.ceil(longest / plan.batch_size),
        regroups=(*plan.regroups, (plan.world_size, int(steps))),
    )


def resume_plan(
    windows: range,
    chunk_steps: int,
    world_size: int,
    regroups: Sequence[Regroup] = (),
    **plan_args: object,
) -> ShardPlan:
    """The plan of an epoch that went through ``regroups`` and continues on ``world_size`` ranks.

    ``regroups[i] = (w_i, s_i)``: the epoch was dealt to ``w_i`` ranks, which ran ``s_i`` steps;
    then the rest was dealt to ``w_{i+1}`` (the last one to ``world_size``). With no regroups
    this is :func:`make_plan`. ``plan_args`` are :func:`make_plan`'s keyword arguments.
    """
    sizes = [int(w) for w, _ in regroups] + [int(world_size)]
    plan = make_plan(windows, chunk_steps, sizes[0], **plan_args)  # type: ignore[arg-type]
    for (_, steps), nxt in zip(regroups, sizes[1:], strict=True):
        plan = regroup_plan(plan, int(steps), nxt)
    return plan


def dealt_windows(plan: ShardPlan) -> np.ndarray:
    """``[n]`` int64: every window the plan deals, all ranks, in rank order (for checks)."""
    parts = [s.window_array() for s in plan.ranks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
