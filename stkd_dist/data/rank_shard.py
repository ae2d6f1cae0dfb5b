"""One rank's part of an epoch of a shard plan: its blocks, its lazily derived windows, its padding.

:func:`stkd_dist.data.plan.make_plan` deals these (rules 3-5 of :mod:`stkd_dist.data.plan`);
a loader iterates a shard's entries block by block, and a resumed epoch asks for a suffix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stkd_dist.data.blocks import Block, RankWindows, ResumedWindows, ShuffleKey
from stkd_dist.errors import InputError


@dataclass(frozen=True)
class RankShard:
    """One rank's part of an epoch.

    Attributes:
        blocks: the blocks in the order the rank reads them.
        windows: the rank's real windows in the order it sees them (block by block). Plans from
            :func:`~stkd_dist.data.plan.make_plan` hold a lazy :class:`RankWindows`; any other sequence of ints (an
            explicit order, e.g. in tests) is kept as a tuple.
        padding: how many padding entries follow them (see :meth:`padding_windows`).
    """

    blocks: tuple[Block, ...]
    windows: Sequence[int]
    padding: int

    def __post_init__(self) -> None:
        if isinstance(self.windows, RankWindows | ResumedWindows):
            # derived from these very blocks, so the lengths agree by construction
            if self.windows.blocks != self.blocks:
                raise InputError("a rank's windows are derived from other blocks", where="plan")
        else:
            object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
            total = sum(len(b) for b in self.blocks)
            if len(self.windows) != total:
                raise InputError(
                    f"a rank lists {len(self.windows)} windows for blocks of {total}",
                    where="plan",
                )
        if self.padding < 0 or (self.padding and not self.windows):
            raise InputError(f"padding {self.padding} is invalid for this rank", where="plan")

    @property
    def count(self) -> int:
        """Real windows of the rank."""
        return len(self.windows)

    def window_array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[k]`` int64: real windows at positions ``[start, stop)`` (clamped like a slice).

        Only the blocks the range overlaps are derived (e.g. a resumed epoch's suffix).
        """
        if isinstance(self.windows, RankWindows | ResumedWindows):
            return self.windows.array(start, stop)
        return np.asarray(self.windows[start:stop], dtype=np.int64)

    def _take(self, positions: np.ndarray) -> np.ndarray:
        if isinstance(self.windows, RankWindows | ResumedWindows):
            return self.windows.take(positions)
        return np.asarray(self.windows, dtype=np.int64)[positions]

    def entries(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, valid)`` of entries ``[start, stop)`` the rank iterates (default: all).

        The entries are the real windows then the padding; only the blocks the range touches are
        derived, so a loader (or a resumed epoch) asks for one block's entries at a time.
        """
        n = self.count
        start, stop, _ = slice(start, stop).indices(n + self.padding)
        stop = max(start, stop)
        pos = np.arange(start, stop, dtype=np.int64)
        # padding entry j repeats the window at position n-1-(j mod n): the last ones first
        pad = pos >= n
        pos[pad] = n - 1 - (pos[pad] - n) % max(n, 1)
        if isinstance(self.windows, RankWindows | ResumedWindows) and not pad.any():
            idx = self.windows.array(start, stop)  # the common case: one contiguous run
        else:
            idx = self._take(pos)
        return idx, ~pad

    def padding_windows(self) -> tuple[int, ...]:
        """Windows repeated as padding: the rank's windows from the last backwards, cycled.

        Taking them from the end means they usually lie in the block the loader still holds.
        """
        n = self.count
        return tuple(self.entries(n, n + self.padding)[0].tolist())

    def spans(self) -> list[tuple[Block, int, int]]:
        """``(block, first, stop)``: the sequence positions ``[first, stop)`` whose windows lie
        in ``block``, in sequence order (one per block, or per part of a block a re-dealt epoch
        kept: :mod:`.regroup`)."""
        if isinstance(self.windows, RankWindows | ResumedWindows):
            return list(self.windows.spans())
        out, pos = [], 0
        for b in self.blocks:
            out.append((b, pos, pos + len(b)))
            pos += len(b)
        return out

    @property
    def last_window(self) -> int:
        """The largest window index of the rank (from its blocks, without deriving windows)."""
        return max(b.last for b in self.blocks)

    def chunks(self, chunk_steps: int, window_length: int) -> list[int]:
        """Time chunks the rank reads: its blocks' chunks plus the halo of each block."""
        out: set[int] = set()
        for b in self.blocks:
            lo, hi = b.read_range(window_length)
            out.update(range(lo // chunk_steps, (hi - 1) // chunk_steps + 1))
        return sorted(out)

    def to_json(self, windows: bool = False) -> dict[str, Any]:
        """Blocks, window count and padding; the window sequence too when ``windows``."""
        out: dict[str, Any] = {
            "blocks": [b.to_json() for b in self.blocks],
            "count": self.count,
            "padding": self.padding,
        }
        if windows:
            out["windows"] = list(self.windows)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], key: ShuffleKey | None) -> RankShard:
        """Inverse of :meth:`to_json` for the rank whose shuffle key is ``key`` (rule 4).

        The windows are derived from the blocks; a ``windows`` list, when present, must match.
        """
        blocks = tuple(Block.from_json(b) for b in d["blocks"])
        shard = cls(blocks=blocks, windows=RankWindows(blocks, key), padding=int(d["padding"]))
        if "count" in d and int(d["count"]) != shard.count:
            raise InputError(
                f"a rank's count {d['count']} is not the {shard.count} windows of its blocks",
                where="plan",
            )
        if "windows" in d and shard.windows != [int(w) for w in d["windows"]]:
            raise InputError(
                "a rank's windows are not the ones its blocks, seed and epoch give", where="plan"
            )
        return shard
