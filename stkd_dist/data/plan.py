"""Shard plan: which windows each rank sees in one epoch, and in which order.

The plan is a pure function of its arguments (no I/O, no global random state), so every rank of a
data-parallel job computes the very same plan on its own and no rank has to broadcast it.

Rules:

1. **Blocks.** A *block* is a contiguous run of windows whose start steps lie in one storage time
   chunk; blocks never straddle a chunk boundary. When the split has fewer such chunk-blocks than
   ``4 × world_size``, chunk-blocks are subdivided into near-equal sub-blocks (sizes differ by at
   most one window; still inside one chunk) until there are at least
   ``min(4 × world_size, windows)`` blocks, so that window counts can be balanced across ranks. A
   rank therefore reads only the chunks its blocks start in plus the ``L+H-1``-step halo after
   each block.
2. **Order.** The block order is a permutation seeded by ``(seed, epoch)`` (``shuffle=False``
   keeps time order, for evaluation).
3. **Assignment.** Blocks are dealt in that order, each to the rank with the fewest windows so far
   (ties → lowest rank). Every window is in exactly one block and every block in exactly one
   rank, so every window appears exactly once per epoch across ranks. A rank's blocks are
   visited in the order they were dealt.
4. **Within a block** the windows are shuffled with a generator seeded by
   ``(seed, epoch, rank)`` when ``shuffle``; otherwise they stay in time order.
5. **Equal batch counts (padding).** Data-parallel ranks must step in lockstep, so every rank gets
   ``num_batches = ceil(max_rank_windows / batch_size)`` batches, and batch ``i`` has the same
   size on every rank. A rank with fewer windows is *padded* up to ``max_rank_windows``: the
   padding entries repeat the rank's own windows (its last windows first, still in memory)
   flagged ``valid=False``, so their loss and metric masks are empty. Windows are never dropped.
   A split with fewer windows than ranks is an error (a rank would have nothing to repeat).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stkd_dist.errors import InputError

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Block:
    """A contiguous run of windows ``range(start, stop, step)`` inside time chunk ``chunk``."""

    chunk: int
    start: int
    stop: int
    step: int = 1

    @property
    def windows(self) -> range:
        return range(self.start, self.stop, self.step)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def last(self) -> int:
        """The last window index of the block."""
        return self.windows[-1]

    def read_range(self, window_length: int) -> tuple[int, int]:
        """Steps ``[lo, hi)`` the block's windows of ``L+H = window_length`` steps need."""
        return self.start, self.last + window_length

    def to_json(self) -> list[int]:
        return [self.chunk, self.start, self.stop, self.step]

    @classmethod
    def from_json(cls, d: list[int]) -> Block:
        chunk, start, stop, step = (int(v) for v in d)
        return cls(chunk, start, stop, step)


@dataclass(frozen=True)
class RankShard:
    """One rank's part of an epoch.

    Attributes:
        blocks: the blocks in the order the rank reads them.
        windows: the rank's real windows in the order it sees them (block by block).
        padding: how many padding entries follow them (see :meth:`padding_windows`).
    """

    blocks: tuple[Block, ...]
    windows: tuple[int, ...]
    padding: int

    def padding_windows(self) -> tuple[int, ...]:
        """Windows repeated as padding: the rank's windows from the last backwards, cycled.

        Taking them from the end means they usually lie in the block the loader still holds.
        """
        n = len(self.windows)
        return tuple(self.windows[n - 1 - (i % n)] for i in range(self.padding))

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, valid)`` of every entry the rank iterates: real windows then padding."""
        idx = np.asarray(self.windows + self.padding_windows(), dtype=np.int64)
        valid = np.zeros(idx.size, dtype=bool)
        valid[: len(self.windows)] = True
        return idx, valid

    def chunks(self, chunk_steps: int, window_length: int) -> list[int]:
        """Time chunks the rank reads: its blocks' chunks plus the halo of each block."""
        out: set[int] = set()
        for b in self.blocks:
            lo, hi = b.read_range(window_length)
            out.update(range(lo // chunk_steps, (hi - 1) // chunk_steps + 1))
        return sorted(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "blocks": [b.to_json() for b in self.blocks],
            "windows": list(self.windows),
            "padding": self.padding,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankShard:
        return cls(
            blocks=tuple(Block.from_json(b) for b in d["blocks"]),
            windows=tuple(int(w) for w in d["windows"]),
            padding=int(d["padding"]),
        )


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

    def __post_init__(self) -> None:
        if len(self.ranks) != self.world_size:
            raise InputError(
                f"plan has {len(self.ranks)} ranks for world size {self.world_size}", where="plan"
            )
        sizes = {len(r.windows) + r.padding for r in self.ranks}
        if len(sizes) != 1 or math.ceil(sizes.pop() / self.batch_size) != self.num_batches:
            raise InputError("ranks must have equal padded lengths and num_batches", where="plan")

    @property
    def samples_per_rank(self) -> int:
        """Entries (windows + padding) every rank iterates."""
        return len(self.ranks[0].windows) + self.ranks[0].padding

    @property
    def total_windows(self) -> int:
        return sum(len(r.windows) for r in self.ranks)

    def rank(self, rank: int) -> RankShard:
        if not 0 <= rank < self.world_size:
            raise InputError(
                f"rank {rank} is outside 0..{self.world_size - 1} (world size {self.world_size})",
                where="rank",
            )
        return self.ranks[rank]

    def rank_windows(self, rank: int) -> list[int]:
        """The real windows of ``rank`` in the order it sees them (padding excluded)."""
        return list(self.rank(rank).windows)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """``[start, stop)`` entry positions of each batch (the same on every rank)."""
        n = self.samples_per_rank
        return [
            (i * self.batch_size, min((i + 1) * self.batch_size, n))
            for i in range(self.num_batches)
        ]

    def to_json(self) -> dict[str, Any]:
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
            "ranks": [r.to_json() for r in self.ranks],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardPlan:
        """Rebuild a plan from :meth:`to_json` output (other keys are ignored)."""
        if d.get("format") != PLAN_FORMAT:
            raise InputError(
                f"plan format {d.get('format')!r} is not {PLAN_FORMAT}", where="plan.format"
            )
        try:
            return cls(
                split=str(d["split"]),
                world_size=int(d["world_size"]),
                epoch=int(d["epoch"]),
                seed=int(d["seed"]),
                batch_size=int(d["batch_size"]),
                shuffle=bool(d["shuffle"]),
                chunk_steps=int(d["chunk_steps"]),
                ranks=tuple(RankShard.from_json(r) for r in d["ranks"]),
                num_batches=int(d["num_batches"]),
            )
        except KeyError as e:
            raise InputError(f"missing key {e.args[0]!r}", where="plan") from e


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise InputError(f"must be a positive integer, got {value!r}", where=name)
    return int(value)


def make_blocks(windows: range, chunk_steps: int, min_blocks: int) -> list[Block]:
    """Cut ``windows`` into chunk-aligned blocks (rule 1), in time order."""
    step = windows.step
    starts = np.arange(windows.start, windows.stop, step, dtype=np.int64)
    chunk_of = starts // chunk_steps
    # positions where the chunk changes cut the (sorted) windows into chunk-blocks
    cuts = np.flatnonzero(np.diff(chunk_of)) + 1
    firsts = np.concatenate([[0], cuts])
    lasts = np.concatenate([cuts, [starts.size]]) - 1
    chunk_blocks = [
        Block(int(chunk_of[a]), int(starts[a]), int(starts[b]) + step, step)
        for a, b in zip(firsts, lasts, strict=True)
    ]
    total = len(windows)
    target = min(min_blocks, total)
    if len(chunk_blocks) >= target:
        return chunk_blocks
    # sub-blocks of at most `size` windows give at least total / size >= target blocks
    size = max(1, total // target)
    blocks: list[Block] = []
    for cb in chunk_blocks:
        ws = cb.windows
        parts = math.ceil(len(ws) / size)
        bounds = np.linspace(0, len(ws), parts + 1).round().astype(int)  # near-equal parts
        for lo, hi in itertools.pairwise(bounds):
            blocks.append(Block(cb.chunk, ws[lo], ws[hi - 1] + step, step))
    return blocks


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
    if len(windows) < world_size:
        raise InputError(
            f"split {split!r} has {len(windows)} windows, fewer than the world size "
            f"{world_size}: every rank needs at least one window",
            where="world_size",
        )
    blocks = make_blocks(windows, chunk_steps, 4 * world_size)
    order = np.arange(len(blocks))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(blocks))

    # greedy balance: next block to the rank with the fewest windows, ties -> lowest rank
    heap = [(0, r) for r in range(world_size)]
    assigned: list[list[Block]] = [[] for _ in range(world_size)]
    for i in order:
        count, r = heapq.heappop(heap)
        assigned[r].append(blocks[int(i)])
        heapq.heappush(heap, (count + len(blocks[int(i)]), r))

    rank_windows: list[tuple[int, ...]] = []
    for r, rank_blocks in enumerate(assigned):
        rng = np.random.default_rng([seed, epoch, r]) if shuffle else None
        ws: list[int] = []
        for b in rank_blocks:
            block_ws = np.asarray(b.windows, dtype=np.int64)
            if rng is not None:
                block_ws = rng.permutation(block_ws)
            ws.extend(int(w) for w in block_ws)
        rank_windows.append(tuple(ws))
    longest = max(len(ws) for ws in rank_windows)
    ranks = tuple(
        RankShard(blocks=tuple(bs), windows=ws, padding=longest - len(ws))
        for bs, ws in zip(assigned, rank_windows, strict=True)
    )
    return ShardPlan(
        split=split,
        world_size=world_size,
        epoch=int(epoch),
        seed=int(seed),
        batch_size=batch_size,
        shuffle=bool(shuffle),
        chunk_steps=chunk_steps,
        ranks=ranks,
        num_batches=math.ceil(longest / batch_size),
    )
