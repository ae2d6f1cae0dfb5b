"""Blocks of windows and one rank's lazily derived window sequence (see :mod:`.plan`).

A :class:`Block` is a contiguous run of windows inside one storage time chunk; a
:class:`RankWindows` is the sequence of windows a rank visits, derived block by block from its
blocks and the shuffle key ``(seed, epoch, rank)`` without ever materialising the whole sequence.
A :class:`ResumedWindows` is a rank's sequence in an epoch re-dealt to another world size
(:mod:`.regroup`): consecutive pieces of the original ranks' sequences, just as lazy.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

# (seed, epoch, rank): seeds the within-block shuffles of one rank (rule 4 of the plan)
ShuffleKey = tuple[int, int, int]


@dataclass(frozen=True)
class Block:
    """A contiguous run of windows ``range(start, stop, step)`` inside time chunk ``chunk``."""

    chunk: int
    start: int
    stop: int
    step: int = 1

    @property
    def windows(self) -> range:
        """The block's windows in time order."""
        return range(self.start, self.stop, self.step)

    def __len__(self) -> int:
        # arithmetic rather than len(self.windows): plans take the length of every block
        return max(0, -((self.start - self.stop) // self.step))

    @property
    def last(self) -> int:
        """The last window index of the block."""
        return self.windows[-1]

    def read_range(self, window_length: int) -> tuple[int, int]:
        """Steps ``[lo, hi)`` the block's windows of ``L+H = window_length`` steps need."""
        return self.start, self.last + window_length

    def to_json(self) -> list[int]:
        """``[chunk, start, stop, step]``."""
        return [self.chunk, self.start, self.stop, self.step]

    @classmethod
    def from_json(cls, d: list[int]) -> Block:
        """Inverse of :meth:`to_json`."""
        chunk, start, stop, step = (int(v) for v in d)
        return cls(chunk, start, stop, step)


class _LazyWindows(Sequence[int]):
    """What both lazy window sequences share: indexing and slicing by :meth:`array` and
    :meth:`take`, which a subclass implements (deriving only the blocks they touch)."""

    __slots__ = ()
    # [parts + 1] the sequence position of each part's first window; [-1] = the length
    _offsets: np.ndarray

    @abstractmethod
    def array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[k]`` int64: positions ``[start, stop)`` of the sequence (clamped like a slice)."""

    @abstractmethod
    def _take_part(self, i: int, local: np.ndarray) -> np.ndarray:
        """The windows at positions ``local`` of part ``i`` (a block, or a piece)."""

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def take(self, positions: np.ndarray | Sequence[int]) -> np.ndarray:
        """``[k]`` int64: the windows at sequence ``positions`` (each part derived once)."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise IndexError(f"positions outside 0..{n - 1}")
        offsets = self._offsets
        out = np.empty(pos.size, dtype=np.int64)
        which = np.searchsorted(offsets, pos, side="right") - 1
        for i in np.unique(which):
            sel = which == i
            out[sel] = self._take_part(int(i), pos[sel] - offsets[i])
        return out

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> list[int]: ...
    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self.array(start, stop).tolist()
            return self.take(np.arange(start, stop, step)).tolist()
        n = len(self)
        i = int(index) + n if int(index) < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"window position {index} outside a sequence of {n}")
        return int(self.take([i])[0])


class RankWindows(_LazyWindows):
    """A rank's window sequence, derived lazily from its blocks (rules 3 and 4).

    Holds only the blocks and one offset per block, O(blocks). Every access derives just the
    blocks it touches: iteration generates one block at a time, :meth:`array` and slices only the
    blocks they overlap, an index lookup one block. Supports ``len``, iteration (also reversed),
    indexing, slicing (a slice is a ``list``), ``in`` (O(blocks)) and equality with any sequence of
    ints.

    Args:
        blocks: the rank's blocks in the order it reads them.
        key: ``(seed, epoch, rank)`` to shuffle within blocks, or None for time order.
        sizes: ``[blocks]`` the block lengths, when the caller has them (saves a pass).
    """

    __slots__ = ("_offsets", "blocks", "key")

    def __init__(
        self, blocks: Sequence[Block], key: ShuffleKey | None, sizes: np.ndarray | None = None
    ) -> None:
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.key: ShuffleKey | None = None
        if key is not None:
            self.key = (int(key[0]), int(key[1]), int(key[2]))
        if sizes is None:
            sizes = np.fromiter((len(b) for b in self.blocks), np.int64, len(self.blocks))
        assert len(sizes) == len(self.blocks)
        # _offsets[i] = position of block i's first window in the sequence; [-1] = len
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])

    def block_windows(self, i: int) -> np.ndarray:
        """``[len(block)]`` int64: the windows of block ``i`` in the order the rank sees them."""
        b = self.blocks[i]
        order = np.arange(len(b), dtype=np.int64)
        if self.key is not None:
            # seeded per block, so this block is derived without any other (resumable suffix)
            order = np.random.default_rng([*self.key, i]).permutation(len(b))
        return b.start + order * b.step

    def spans(self) -> Iterator[tuple[Block, int, int]]:
        """``(block, first, stop)``: the sequence positions ``[first, stop)`` block by block."""
        for i, b in enumerate(self.blocks):
            yield b, int(self._offsets[i]), int(self._offsets[i + 1])

    def block_spans(self, start: int, stop: int) -> Iterator[tuple[Block, int, int]]:
        """Like :meth:`spans`, only the parts of blocks inside positions ``[start, stop)``."""
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self.blocks)):
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            if lo >= stop:
                break
            if hi > start:
                yield self.blocks[i], max(lo, start), min(hi, stop)

    def iter_blocks(self) -> Iterator[tuple[Block, np.ndarray]]:
        """``(block, its windows in rank order)`` one block at a time."""
        for i, b in enumerate(self.blocks):
            yield b, self.block_windows(i)

    def array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[k]`` int64: positions ``[start, stop)`` of the sequence (clamped like a slice).

        Only the blocks overlapping the range are derived, so a suffix costs its own length.
        """
        n = len(self)
        start, stop, _ = slice(start, stop).indices(n)
        if start >= stop:
            return np.zeros(0, dtype=np.int64)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        last = int(np.searchsorted(self._offsets, stop, side="left")) - 1
        parts = []
        for i in range(first, last + 1):
            lo = int(self._offsets[i])
            ws = self.block_windows(i)
            parts.append(ws[max(start - lo, 0) : stop - lo])
        return np.concatenate(parts)

    def _take_part(self, i: int, local: np.ndarray) -> np.ndarray:
        return self.block_windows(i)[local]

    def __iter__(self) -> Iterator[int]:
        for i in range(len(self.blocks)):
            yield from self.block_windows(i).tolist()

    def __reversed__(self) -> Iterator[int]:
        for i in reversed(range(len(self.blocks))):
            yield from self.block_windows(i)[::-1].tolist()

    def __contains__(self, value: object) -> bool:
        # a block holds the same windows in any order: test membership without deriving
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            return False
        v = int(value)  # range's O(1) membership test needs a plain int
        return any(v in b.windows for b in self.blocks)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankWindows):
            if (self.blocks, self.key) == (other.blocks, other.key):
                return True
        elif not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        if len(other) != len(self):
            return False
        # block by block, so comparing with another lazy sequence never materialises it whole
        pos = 0
        for _, ws in self.iter_blocks():
            theirs = (
                other.array(pos, pos + len(ws))
                if isinstance(other, RankWindows)
                else np.asarray(other[pos : pos + len(ws)], dtype=np.int64)
            )
            if not np.array_equal(ws, theirs):
                return False
            pos += len(ws)
        return True

    def __hash__(self) -> int:
        return hash((self.blocks, self.key))

    def __repr__(self) -> str:
        order = "time order" if self.key is None else f"shuffled by {self.key}"
        return f"RankWindows({len(self)} windows in {len(self.blocks)} blocks, {order})"


#: positions ``[a, b)`` of one original rank's sequence (a piece of a re-dealt rank's sequence)
Piece = tuple[RankWindows, int, int]


class ResumedWindows(_LazyWindows):
    """A rank's window sequence in an epoch re-dealt to another world size (see :mod:`.regroup`).

    The sequence is the concatenation of ``pieces``, each a run of positions of one original
    rank's :class:`RankWindows`; it holds O(pieces) state (a few per rank and re-deal) and
    derives windows only for the blocks an access touches, like :class:`RankWindows`.
    """

    __slots__ = ("_offsets", "pieces")

    def __init__(self, pieces: Sequence[Piece]) -> None:
        merged: list[Piece] = []
        for w, a, b in pieces:
            if b <= a:
                continue
            if merged and merged[-1][0] is w and merged[-1][2] == a:
                # two runs of one sequence that meet again (after two re-deals): one piece
                merged[-1] = (w, merged[-1][1], int(b))
            else:
                merged.append((w, int(a), int(b)))
        self.pieces: tuple[Piece, ...] = tuple(merged)
        sizes = np.fromiter((b - a for _, a, b in self.pieces), np.int64, len(self.pieces))
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(sizes)])

    def sub(self, start: int, stop: int) -> list[Piece]:
        """Positions ``[start, stop)`` of this sequence as pieces of the original ranks'."""
        out = []
        for (w, a, b), lo in zip(self.pieces, self._offsets[:-1].tolist(), strict=True):
            hi = lo + b - a
            if hi > start and lo < stop:
                out.append((w, a + max(start - lo, 0), a + min(stop, hi) - lo))
        return out

    def spans(self) -> Iterator[tuple[Block, int, int]]:
        """``(block, first, stop)``: the positions ``[first, stop)`` of this sequence whose
        windows all lie in ``block`` (a block cut by a re-deal appears in part)."""
        for (w, a, b), lo in zip(self.pieces, self._offsets[:-1].tolist(), strict=True):
            for block, x, y in w.block_spans(a, b):
                yield block, lo + x - a, lo + y - a

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The blocks the sequence reads, in order (those of :meth:`spans`)."""
        return tuple(b for b, _, _ in self.spans())

    def array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[k]`` int64: positions ``[start, stop)`` (clamped like a slice)."""
        start, stop, _ = slice(start, stop).indices(len(self))
        parts = [w.array(a, b) for w, a, b in self.sub(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _take_part(self, i: int, local: np.ndarray) -> np.ndarray:
        w, a, _ = self.pieces[i]
        return w.take(a + local)

    def __iter__(self) -> Iterator[int]:
        for w, a, b in self.pieces:
            for _, x, y in w.block_spans(a, b):
                yield from w.array(x, y).tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        if len(other) != len(self):
            return False
        theirs = other.array() if isinstance(other, RankWindows | ResumedWindows) else other
        return bool(np.array_equal(self.array(), np.asarray(theirs, dtype=np.int64)))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ResumedWindows({len(self)} windows in {len(self.pieces)} pieces)"
