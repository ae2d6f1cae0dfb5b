"""Rank loader: one rank's batches for one epoch, read block by block from the Zarr store.

For each block of its :class:`~stkd_dist.data.plan.RankShard` the loader reads the block's steps
plus the ``L+H-1``-step halo in one ``store.read`` (so only those chunks are touched), cuts the
windows out with :meth:`WindowReader.batch_from_block` and yields :class:`WindowBatch` es of
``plan.batch_size`` entries (a batch may take windows from two consecutive blocks). The window
order of a block is derived from the plan only when that block is read (the plan is lazy, see
:class:`~stkd_dist.data.plan.RankWindows`), so the loader never holds the rank's whole sequence.

Prefetch uses one background **thread**, never a process: zarr v3 runs its I/O on an asyncio
event loop in a thread of its own, and a process forked after that loop started inherits a loop
whose thread does not exist in the child, so reads there can hang. Threads share the loop safely,
and decompression and NumPy release the GIL, so a reading thread overlaps with batch assembly.
(Use ``torch.utils.data.DataLoader(num_workers=0)`` and the ``spawn`` start method for any extra
processes.)

Memory: at most two blocks are held at once (steps and their entry indices), the one batches are
cut from and the next one being read, plus the batch under construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from stkd_dist.data.batch import WindowBatch
from stkd_dist.data.plan import ShardPlan
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.regroup import Regroup, resume_plan
from stkd_dist.errors import InputError

_Block = tuple[np.ndarray, np.ndarray]  # values float32, mask bool: [t, node, channel]


@dataclass(frozen=True, eq=False)
class _Read:
    """A segment as read: its steps (None for a ``random`` segment) and its entries."""

    block: _Block | None
    indices: np.ndarray  # [stop - first] int64 window indices
    valid: np.ndarray  # [stop - first] bool


@dataclass(frozen=True)
class Segment:
    """Entries ``[first, stop)`` of the rank's sequence, served from steps ``[lo, hi)``.

    ``random`` segments (padding that reaches beyond the last block) are read window by window
    with :meth:`WindowReader.batch` instead of as one block.
    """

    lo: int
    hi: int
    first: int
    stop: int
    random: bool = False


def concat_batches(parts: list[WindowBatch]) -> WindowBatch:
    """Concatenate batches along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    return WindowBatch(*(torch.cat(ts) for ts in zip(*parts, strict=True)))


class RankLoader:
    """Iterates one rank's batches for one epoch: reads each block's chunks (plus the L+H-1 halo) from Zarr, prefetches the next block in a background THREAD, yields WindowBatch.

    Every rank of a plan yields ``len(loader) == plan.num_batches`` batches and batch ``i`` has
    the same size on every rank, so data-parallel ranks step in lockstep. Padding entries have
    ``valid=False`` and an all-False ``mask``.

    Args:
        reader: the window reader of the dataset.
        plan: the epoch's shard plan (the same on every rank).
        rank: this rank, ``0 <= rank < plan.world_size``.
        prefetch: read the next block in a background thread while batches are cut.
        start_batch: the first batch to yield (a resumed epoch): the loader yields batches
            ``start_batch .. num_batches - 1``, exactly those an uninterrupted epoch yields from
            there on, and reads no block that lies entirely before it.
    """

    def __init__(
        self,
        reader: WindowReader,
        plan: ShardPlan,
        rank: int,
        prefetch: bool = True,
        start_batch: int = 0,
    ) -> None:
        self.reader = reader
        self.plan = plan
        self.rank = rank
        self.prefetch = bool(prefetch)
        if not 0 <= start_batch <= plan.num_batches:
            raise InputError(
                f"start batch {start_batch} is outside 0..{plan.num_batches} (the epoch's "
                "batches): the checkpoint was taken with another batch size or world size",
                where="start_batch",
            )
        self.start_batch = int(start_batch)
        self.shard = plan.rank(rank)  # validates the rank
        # from the blocks, O(blocks): the windows themselves are derived only block by block
        if self.shard.blocks and self.shard.last_window > reader.last_window:
            raise InputError(
                f"the plan has window {self.shard.last_window} but this dataset's last window "
                f"is {reader.last_window}: the plan was made for another dataset or window",
                where="plan",
            )
        self.segments = self._segments()

    @property
    def start_entry(self) -> int:
        """The position in the rank's sequence (windows, then padding) of the first entry
        yielded: ``start_batch * batch_size``."""
        return min(self.start_batch * self.plan.batch_size, self.plan.samples_per_rank)

    @property
    def start_window(self) -> int:
        """How many of the rank's real windows the skipped batches held (padding comes last)."""
        return min(self.start_entry, self.shard.count)

    def _segments(self) -> list[Segment]:
        length = self.reader.window.length
        out: list[Segment] = []
        pos = 0
        # one span per block (a re-dealt epoch's rank may hold part of a block: its span)
        for block, first, stop in self.shard.spans():
            assert first == pos
            lo, hi = block.read_range(length)
            out.append(Segment(lo, hi, first, stop))
            pos = stop
        assert pos == self.shard.count
        if self.shard.padding:
            if self.shard.padding <= out[-1].stop - out[-1].first:
                # padding repeats the last block's windows: serve it from the block still held
                tail = out.pop()
                out.append(Segment(tail.lo, tail.hi, tail.first, pos + self.shard.padding))
            else:
                pad, _ = self.shard.entries(pos, pos + self.shard.padding)
                lo, hi = int(pad.min()), int(pad.max()) + length
                out.append(Segment(lo, hi, pos, pos + self.shard.padding, random=True))
        return out

    def __len__(self) -> int:
        return self.plan.num_batches - self.start_batch

    def _read(self, seg: Segment) -> _Read:
        # the segment's window order is derived here, in the prefetch thread with its read
        idx, valid = self.shard.entries(seg.first, seg.stop)
        if seg.random:
            return _Read(None, idx, valid)  # read window by window when the batch is cut
        return _Read(self.reader.store.read(seg.lo, seg.hi), idx, valid)

    def _cut(self, seg: Segment, read: _Read, start: int, stop: int) -> WindowBatch:
        idx = read.indices[start - seg.first : stop - seg.first]
        valid = read.valid[start - seg.first : stop - seg.first]
        if read.block is None:
            return self.reader.batch(idx, valid)
        values, mask = read.block
        return self.reader.batch_from_block(values, mask, seg.lo, idx, valid)

    def __iter__(self) -> Iterator[WindowBatch]:
        batch_size = self.plan.batch_size
        total = self.plan.samples_per_rank
        start = self.start_entry
        # a resumed epoch: the segments (blocks) it has left, the first one perhaps partly
        segments = [seg for seg in self.segments if seg.stop > start]
        if not segments:
            return
        pending: list[WindowBatch] = []
        pool = ThreadPoolExecutor(1, thread_name_prefix="stkd-prefetch") if self.prefetch else None
        try:
            future: Future[_Read] | None = None
            if pool is not None:
                future = pool.submit(self._read, segments[0])
            for i, seg in enumerate(segments):
                if future is not None:
                    read = future.result()  # re-raises a read error of the background thread
                    future = None
                else:
                    read = self._read(seg)
                if pool is not None and i + 1 < len(segments):
                    # the next block is read while this one is cut: two blocks in memory at most
                    future = pool.submit(self._read, segments[i + 1])
                pos = max(seg.first, start)
                while pos < seg.stop:
                    batch_end = min((pos // batch_size + 1) * batch_size, total)
                    end = min(seg.stop, batch_end)
                    pending.append(self._cut(seg, read, pos, end))
                    pos = end
                    if end == batch_end:
                        yield concat_batches(pending)
                        pending = []
                del read  # release the current block before taking the next one
            assert not pending
        finally:
            if pool is not None:
                # wait for an in-flight read so no thread touches the store after we return
                pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"RankLoader(rank={self.rank}/{self.plan.world_size}, split={self.plan.split!r}, "
            f"epoch={self.plan.epoch}, batches={len(self)}, blocks={len(self.shard.blocks)})"
        )


def make_loader(
    reader: WindowReader,
    split: str,
    world_size: int = 1,
    rank: int = 0,
    *,
    epoch: int = 0,
    seed: int = 0,
    batch_size: int = 32,
    shuffle: bool | None = None,
    prefetch: bool = True,
    start_batch: int = 0,
    regroups: tuple[Regroup, ...] = (),
) -> RankLoader:
    """The loader of ``rank`` for ``split`` and ``epoch`` (from batch ``start_batch`` on).

    Every rank calls this with the same arguments except ``rank`` and gets its part of the same
    plan. ``shuffle`` defaults to True for the training split and False otherwise. An epoch that
    was re-dealt to another world size (elastic training) names its earlier deals in
    ``regroups`` (:mod:`.regroup`); ``start_batch`` then counts in the last deal.
    """
    plan = resume_plan(
        reader.windows(split),
        reader.store.chunks[0],
        world_size,
        regroups,
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        shuffle=split == "train" if shuffle is None else shuffle,
        split=split,
    )
    return RankLoader(reader, plan, rank, prefetch=prefetch, start_batch=start_batch)
