"""Shard plan: which windows each rank sees in one epoch, and in which order.

The plan is a pure function of its arguments (no I/O, no global random state), so every rank of a
data-parallel job computes the very same plan on its own and no rank has to broadcast it. Its
state is O(blocks), never O(windows): a rank holds its blocks and derives its window sequence
lazily (:class:`RankWindows`), block by block, from ``(seed, epoch, rank)``.

Rules, for ``n`` windows over ``W`` ranks:

1. **Blocks.** A *chunk-block* is the run of windows whose start steps lie in one storage time
   chunk (one block per window when the stride is at least the chunk length). When there are
   fewer chunk-blocks than ``T = min(4 × W, n)``, each chunk-block of ``m`` windows is cut into
   ``ceil(m × T / n)`` near-equal sub-blocks (sizes differ by at most one window; at least ``T``
   blocks in all, none over ``ceil(n / T)`` windows), so that the block order below has something
   to shuffle. No block straddles a chunk boundary. With the splits of rule 3 the plan has fewer
   than ``chunks + T + W`` blocks: its size is O(chunks + W), whatever the number of windows.
2. **Order.** The block order is a permutation seeded by ``(seed, epoch)`` (``shuffle=False``
   keeps time order, for evaluation).
3. **Assignment: exact balance.** The blocks, in that order, form one sequence of ``n`` windows,
   cut into ``W`` consecutive runs: rank ``r`` gets ``q + 1`` windows if ``r < n mod W`` and
   ``q = n // W`` otherwise. A block that straddles a cut is split there into two blocks (still
   inside its chunk, one per rank), so at most ``W - 1`` chunks hold blocks of two ranks. Every
   window lies in exactly one block and every block in exactly one rank, so every window appears
   exactly once per epoch across ranks. A rank visits its blocks in sequence order.
4. **Within a block** the windows are shuffled (``shuffle=True``) by a generator seeded by
   ``(seed, epoch, rank, i)``, ``i`` the block's position in the rank, so any block, and hence
   any suffix of the sequence (a resumed epoch), is derived without the blocks before it.
   ``shuffle=False`` keeps time order.
5. **Equal batch counts (padding).** Data-parallel ranks step in lockstep, so every rank iterates
   ``samples_per_rank = ceil(n / W)`` entries in ``num_batches = ceil(samples_per_rank /
   batch_size)`` batches, batch ``i`` of the same size on every rank. A rank with ``q`` windows
   (when ``W`` does not divide ``n``) gets one *padding* entry that repeats its last window
   (still in memory), flagged ``valid=False`` so its loss and metric masks are empty: at most
   ``W - 1`` padding entries per epoch. Windows are never dropped. A split with fewer windows than
   ranks is an error (a rank would have nothing to repeat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stkd_dist.data.blocks import Block, RankWindows, ShuffleKey
from stkd_dist.data.rank_shard import RankShard
from stkd_dist.errors import InputError

# 2: exact balance, lazily derived windows (format 1 listed every rank's windows)
PLAN_FORMAT = 2

__all__ = [
    "PLAN_FORMAT",
    "Block",
    "RankShard",
    "RankWindows",
    "ShardPlan",
    "ShuffleKey",
    "make_blocks",
    "make_plan",
]


@dataclass(frozen=True)
class ShardPlan:
    """Deterministic, serialisable assignment of a split's windows to ranks for one epoch."""

    split: str
    world_size: int
    epoch: int
    seed: int
    batch_size: int
    shuffle: bool
    chunk_steps: int
    ranks: tuple[RankShard, ...]
    num_batches: int
    # the epoch's earlier deals ``(world_size, steps)`` when it was re-dealt (:mod:`.regroup`)
    regroups: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ranks) != self.world_size:
            raise InputError(
                f"plan has {len(self.ranks)} ranks for world size {self.world_size}", where="plan"
            )
        sizes = {r.count + r.padding for r in self.ranks}
        if len(sizes) != 1 or math.ceil(sizes.pop() / self.batch_size) != self.num_batches:
            raise InputError("ranks must have equal padded lengths and num_batches", where="plan")

    @property
    def samples_per_rank(self) -> int:
        """Entries (windows + padding) every rank iterates."""
        return self.ranks[0].count + self.ranks[0].padding

    @property
    def total_windows(self) -> int:
        """Real windows over all ranks (the split's windows)."""
        return sum(r.count for r in self.ranks)

    @property
    def total_padding(self) -> int:
        """Padding entries over all ranks (at most ``world_size - 1`` for :func:`make_plan`)."""
        return sum(r.padding for r in self.ranks)

    @property
    def num_blocks(self) -> int:
        """Blocks over all ranks (the plan's state is O(this))."""
        return sum(len(r.blocks) for r in self.ranks)

    def rank(self, rank: int) -> RankShard:
        """The shard of ``rank`` (an :class:`InputError` outside ``0..world_size-1``)."""
        if not 0 <= rank < self.world_size:
            raise InputError(
                f"rank {rank} is outside 0..{self.world_size - 1} (world size {self.world_size})",
                where="rank",
            )
        return self.ranks[rank]

    def rank_windows(self, rank: int) -> list[int]:
        """The real windows of ``rank`` in the order it sees them (padding excluded).

        This materialises one rank's list; iterate ``plan.rank(rank).windows`` (or use its
        ``array``) to stay lazy.
        """
        return list(self.rank(rank).windows)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` entry positions of each batch (the same on every rank)."""
        n = self.samples_per_rank
        return [
            (i * self.batch_size, min((i + 1) * self.batch_size, n))
            for i in range(self.num_batches)
        ]

    def to_json(self, windows: bool = False) -> dict[str, Any]:
        """The plan as JSON: blocks and counts per rank, every rank's windows too if ``windows``."""
        return {
            "format": PLAN_FORMAT,
            "split": self.split,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "chunk_steps": self.chunk_steps,
            "num_batches": self.num_batches,
            "samples_per_rank": self.samples_per_rank,
            "total_padding": self.total_padding,
            "ranks": [r.to_json(windows=windows) for r in self.ranks],
            "regroups": [list(g) for g in self.regroups],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardPlan:
        """Rebuild a plan from :meth:`to_json` output (other keys are ignored)."""
        if d.get("format") != PLAN_FORMAT:
            raise InputError(
                f"plan format {d.get('format')!r} is not {PLAN_FORMAT}", where="plan.format"
            )
        if d.get("regroups"):
            raise InputError(
                "a re-dealt plan is rebuilt from its first deal and its regroups "
                "(stkd_dist.data.regroup.resume_plan), not from its blocks",
                where="plan.regroups",
            )
        try:
            seed, epoch, shuffle = int(d["seed"]), int(d["epoch"]), bool(d["shuffle"])
            return cls(
                split=str(d["split"]),
                world_size=int(d["world_size"]),
                epoch=epoch,
                seed=seed,
                batch_size=int(d["batch_size"]),
                shuffle=shuffle,
                chunk_steps=int(d["chunk_steps"]),
                ranks=tuple(
                    RankShard.from_json(r, (seed, epoch, i) if shuffle else None)
                    for i, r in enumerate(d["ranks"])
                ),
                num_batches=int(d["num_batches"]),
            )
        except KeyError as e:
            raise InputError(f"missing key {e.args[0]!r}", where="plan") from e


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise InputError(f"must be a positive integer, got {value!r}", where=name)
    return int(value)


def _block_arrays(
    windows: range, chunk_steps: int, min_blocks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rule 1 as arrays ``(chunk, first, count)``: first = position of a block's first window.

    Computed per chunk (not per window), so the cost is O(blocks) however many windows there are.
    """
    n, start, step = len(windows), windows.start, windows.step
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    if step >= chunk_steps:
        # two window starts `step` apart never share a chunk: one block per window
        first = np.arange(n, dtype=np.int64)
        chunk = (start + first * step) // chunk_steps
    else:
        # every chunk between the first and the last window's holds at least one window start
        chunk = np.arange(start // chunk_steps, windows[-1] // chunk_steps + 1, dtype=np.int64)
        # position of the first window starting at or after the chunk's first step
        first = np.maximum(0, -((start - chunk * chunk_steps) // step))
    count = np.diff(np.append(first, n))
    target = min(min_blocks, n)
    if chunk.size < target:  # fewer chunks than 4 x world size: this loop-free pass is cheap
        # parts in proportion to the chunk-block's share: sum >= target, and < target + chunks
        parts = -(-count * target // n)
        owner = np.repeat(np.arange(chunk.size), parts)
        j = np.arange(owner.size) - np.repeat(np.cumsum(parts) - parts, parts)
        # part j of an m-window chunk-block: positions [j*m//p, (j+1)*m//p), sizes differ by <= 1
        m, p = count[owner], parts[owner]
        lo, hi = j * m // p, (j + 1) * m // p
        chunk, first, count = chunk[owner], first[owner] + lo, hi - lo
    return chunk, first, count


def make_blocks(windows: range, chunk_steps: int, min_blocks: int) -> list[Block]:
    """Cut ``windows`` into chunk-aligned blocks (rule 1), in time order."""
    chunk, first, count = _block_arrays(windows, chunk_steps, min_blocks)
    start, step = windows.start, windows.step
    starts = start + first * step
    return list(
        map(
            Block,
            chunk.tolist(),
            starts.tolist(),
            (starts + count * step).tolist(),
            [step] * len(chunk),
        )
    )


def make_plan(
    windows: range,
    chunk_steps: int,
    world_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    shuffle: bool = True,
    split: str = "train",
) -> ShardPlan:
    """Plan one epoch of ``windows`` over ``world_size`` ranks (rules in the module docstring).

    Costs O(blocks) time and memory (vectorised over blocks, never over windows); the ranks'
    windows are derived lazily when a rank iterates them.

    Args:
        windows: the split's window indices (start steps), e.g. ``WindowReader.windows(split)``.
        chunk_steps: the store's time-chunk length (``store.chunks[0]``).
        world_size: number of data-parallel ranks.
        epoch, seed: together seed every shuffle; the same arguments give the same plan.
        batch_size: windows per batch on each rank.
        shuffle: shuffle block order and windows within blocks (training); False keeps time order.
        split: recorded in the plan.
    """
    if not isinstance(windows, range) or windows.step <= 0:
        raise InputError(f"windows must be an increasing range, got {windows!r}", where="windows")
    chunk_steps = _positive(chunk_steps, "chunk_steps")
    world_size = _positive(world_size, "world_size")
    batch_size = _positive(batch_size, "batch_size")
    if isinstance(epoch, bool) or int(epoch) < 0 or isinstance(seed, bool) or int(seed) < 0:
        raise InputError(f"epoch and seed must be >= 0, got {epoch!r}, {seed!r}", where="epoch")
    epoch, seed = int(epoch), int(seed)
    n = len(windows)
    if n < world_size:
        raise InputError(
            f"split {split!r} has {n} windows, fewer than the world size "
            f"{world_size}: every rank needs at least one window",
            where="world_size",
        )
    chunk, first, count = _block_arrays(windows, chunk_steps, 4 * world_size)
    if shuffle:  # rule 2
        order = np.random.default_rng([seed, epoch]).permutation(chunk.size)
        chunk, first, count = chunk[order], first[order], count[order]

    # rule 3: the dealt sequence is cut at the rank boundaries; pieces between consecutive cut
    # points (block ends or rank boundaries) are the plan's blocks, each in one block and one rank
    q, rem = divmod(n, world_size)
    ranks = np.arange(world_size + 1, dtype=np.int64)
    bounds = ranks * q + np.minimum(
        ranks, rem
    )  # rank r: sequence positions [bounds[r], bounds[r+1])
    ends = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(count)])
    # sorted and unique, from 0 to n (merged by hand: np.union1d's first call lazily imports
    # a numpy submodule that costs more than the whole plan)
    cuts = np.sort(np.concatenate([ends, bounds]))
    cuts = cuts[np.concatenate([[True], cuts[1:] != cuts[:-1]])]
    lo, hi = cuts[:-1], cuts[1:]
    src = np.searchsorted(ends, lo, side="right") - 1  # the dealt block each piece comes from
    owner = np.searchsorted(bounds, lo, side="right") - 1  # the rank each piece goes to
    step = windows.step
    starts = windows.start + (first[src] + lo - ends[src]) * step
    stops = starts + (hi - lo) * step
    pieces = tuple(
        map(Block, chunk[src].tolist(), starts.tolist(), stops.tolist(), [step] * lo.size)
    )
    split_at = np.searchsorted(owner, ranks)  # pieces of rank r: [split_at[r], split_at[r+1])

    longest = q + (rem > 0)
    shards = []
    for r in range(world_size):
        a, b = int(split_at[r]), int(split_at[r + 1])
        blocks = pieces[a:b]
        dealt = RankWindows(blocks, (seed, epoch, r) if shuffle else None, sizes=(hi - lo)[a:b])
        shards.append(RankShard(blocks, dealt, longest - int(bounds[r + 1] - bounds[r])))
    return ShardPlan(
        split=split,
        world_size=world_size,
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        chunk_steps=chunk_steps,
        ranks=tuple(shards),
        num_batches=math.ceil(longest / batch_size),
    )
