"""Window reader: turns window indices into :class:`WindowBatch` tensors.

A window ``t`` covers input steps ``[t, t+L)`` and target steps ``[t+L, t+L+H)`` (see
:mod:`stkd_dist.data.windows`). The reader

* normalises inputs with the training split's statistics (per channel, or per node and channel):
  ``x = (value - mean) / std`` where observed and ``0`` where not, so NaN never reaches a model;
* keeps targets in original units: ``y = value`` where observed and ``0`` where not, with
  ``mask`` True exactly where the target is observed (and all False for padding samples);
* derives the time features of every input step from the store's time axis: ``time_of_day`` =
  minutes since midnight / 1440 and ``day_of_week`` with Monday = 0.

Two entry points share one assembly routine, so a batch is the same however it was read:
:meth:`WindowReader.batch` reads just the step ranges the given windows need (random access,
nearby windows merged into one read), and :meth:`WindowReader.batch_from_block` cuts windows out
of steps already in memory (what the rank loader does with a prefetched block).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from stkd_dist.data.batch import DataDims, WindowBatch
from stkd_dist.data.block_cache import BLOCK_CACHE_BYTES, BlockCache
from stkd_dist.data.stats import Stats, load_stats
from stkd_dist.data.windows import SplitSpec, WindowSpec, split_windows
from stkd_dist.errors import ConfigError, InputError
from stkd_dist.storage.store import DatasetStore


def _channel_indices(store: DatasetStore, names: Sequence[str] | None, field: str) -> list[int]:
    """Resolve channel names to indices; ``None`` means every channel in store order."""
    if names is None:
        return list(range(len(store.channels)))
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise InputError("select at least one channel", where=field)
    if len(set(names)) != len(names):
        raise InputError(f"channels must not repeat, got {', '.join(names)}", where=field)
    unknown = [n for n in names if n not in store.channels]
    if unknown:
        raise InputError(
            f"unknown channel {unknown[0]!r}; the store {store.name!r} has "
            f"{', '.join(store.channels)}",
            where=field,
        )
    return [store.channels.index(n) for n in names]


def merge_spans(starts: np.ndarray, length: int, gap: int) -> list[tuple[int, int]]:
    """Group sorted window starts into step ranges ``[lo, hi)`` to read in one go each.

    Two windows share a read when the steps between their spans are fewer than ``gap``; with
    ``gap`` = the time-chunk length no chunk is read that neither window touches, while a chunk
    needed by both is decoded once instead of twice.
    """
    spans: list[tuple[int, int]] = []
    for t in np.asarray(starts, dtype=np.int64):
        lo, hi = int(t), int(t) + length
        if spans and lo - spans[-1][1] < gap:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans


class WindowReader:
    """Turns window indices into WindowBatch tensors (normalised x, original-unit y, masks, time features).

    Args:
        store: an opened canonical store.
        window: input length ``L``, horizon ``H`` and stride.
        splits: train / val / test fractions; statistics come from its training split.
        input_channels: channel names fed to the model (``None`` = all, in store order).
        target_channels: channel names forecast (``None`` = all, in store order).
        per_node_stats: normalise per (node, channel) instead of per channel.

    Raises:
        InputError: unknown or repeated channel, a series or training split shorter than one
            window of ``L + H`` steps.
        ConfigError: ``window`` / ``splits`` of the wrong type.
    """

    def __init__(
        self,
        store: DatasetStore,
        window: WindowSpec = WindowSpec(),
        splits: SplitSpec = SplitSpec(),
        input_channels: Sequence[str] | None = None,
        target_channels: Sequence[str] | None = None,
        per_node_stats: bool = False,
        target_fraction: float = 1.0,
        recent_days: int | None = None,
    ) -> None:
        if not isinstance(window, WindowSpec):
            raise ConfigError(f"expected a WindowSpec, got {type(window).__name__}", "window")
        if not isinstance(splits, SplitSpec):
            raise ConfigError(f"expected a SplitSpec, got {type(splits).__name__}", "splits")
        self.store = store
        self.window = window
        self.splits = splits
        self.per_node_stats = bool(per_node_stats)
        self.input_idx: list[int] = _channel_indices(store, input_channels, "input_channels")
        self.target_idx: list[int] = _channel_indices(store, target_channels, "target_channels")
        # The training split must hold at least one window: statistics and training come from it.
        # This also rejects a series shorter than L+H (with a message naming the window).
        split_windows(store.steps, window, splits, "train")
        self.stats: Stats = load_stats(store, splits)
        self.dims = DataDims(
            nodes=store.nodes,
            input_steps=window.input_steps,
            horizon=window.horizon,
            in_channels=len(self.input_idx),
            out_channels=len(self.target_idx),
        )
        mean, std = self.stats.scale(self.per_node_stats)  # [1 or node, channel]
        self._in_mean = np.ascontiguousarray(mean[:, self.input_idx], dtype=np.float32)
        self._in_std = np.ascontiguousarray(std[:, self.input_idx], dtype=np.float32)
        self._all_inputs = self.input_idx == list(range(len(store.channels)))
        self._all_targets = self.target_idx == list(range(len(store.channels)))
        time = store.time
        minutes = (time - time.normalize()) / np.timedelta64(1, "m")
        self._time_of_day = (np.asarray(minutes, dtype=np.float64) / 1440.0).astype(np.float32)
        self._day_of_week = np.asarray(time.day_of_week, dtype=np.int64)  # Monday = 0
        # None: every batch reads its steps from the store (see use_block_cache)
        self.block_cache: BlockCache | None = None
        # [steps] bool: which steps' readings may be training targets (None: all)
        self.target_keep: np.ndarray | None = None
        if target_fraction < 1.0:
            self.target_keep = kept_target_steps(
                store.steps, splits.step_ranges(store.steps)["train"], target_fraction, time
            )
        # the first step of the training windows (data.recent_days; 0 = all of the split)
        self._train_from = 0
        if recent_days is not None:
            self._train_from = recent_start(
                splits.step_ranges(store.steps)["train"], recent_days, time
            )

    def use_block_cache(self, max_bytes: int = BLOCK_CACHE_BYTES) -> BlockCache:
        """Read :meth:`batch`'s steps through an LRU of decoded time chunks from now on.

        For readers that come back to the same chunks batch after batch (a teacher server):
        each chunk is then read and decoded once while it stays in the ``max_bytes`` budget.
        Batches are the same either way. Returns the cache (its ``stats`` count chunk reads).
        """
        if self.block_cache is None or self.block_cache.max_bytes != max_bytes:
            self.block_cache = BlockCache(self.store, max_bytes)
        return self.block_cache

    # -- scales and splits ---------------------------------------------------------------------
    def _scale(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.stats.scale(self.per_node_stats)
        shape = (self.store.nodes, len(idx))
        return (
            np.broadcast_to(mean[:, idx], shape).astype(np.float32),
            np.broadcast_to(std[:, idx], shape).astype(np.float32),
        )

    def target_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of the target channels, each ``[node, C_out]`` float32.

        Models predict in normalised units and de-normalise with ``pred * std + mean``.
        """
        return self._scale(self.target_idx)

    def input_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of the input channels, each ``[node, C_in]`` float32."""
        return self._scale(self.input_idx)

    def windows(self, split: str) -> range:
        """Window indices (start steps) of ``split`` (``train``, ``val`` or ``test``); with
        ``recent_days`` the training windows start in the last days of the split only."""
        w = split_windows(self.store.steps, self.window, self.splits, split)
        return windows_from(w, self._train_from) if split == "train" else w

    @property
    def last_window(self) -> int:
        """The largest valid window index: ``steps - (L + H)``."""
        return self.store.steps - self.window.length

    def span(self, indices: Sequence[int] | np.ndarray) -> tuple[int, int]:
        """The step range ``[lo, hi)`` covering every window in ``indices``."""
        idx = self._check_indices(indices)
        if idx.size == 0:
            return (0, 0)
        return int(idx.min()), int(idx.max()) + self.window.length

    # -- batches -------------------------------------------------------------------------------
    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise InputError(
                f"window indices must be a 1-d sequence of integers, got shape {idx.shape} "
                f"dtype {idx.dtype}",
                where="indices",
            )
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() > self.last_window):
            bad = int(idx[(idx < 0) | (idx > self.last_window)][0])
            raise InputError(
                f"window {bad} is out of range: windows of L+H = {self.window.length} steps in a "
                f"series of {self.store.steps} steps start at 0..{self.last_window}",
                where="indices",
            )
        return idx

    def _check_valid(self, valid: np.ndarray | None, n: int) -> np.ndarray:
        if valid is None:
            return np.ones(n, dtype=bool)
        v = np.asarray(valid, dtype=bool)
        if v.shape != (n,):
            raise InputError(f"valid must have shape ({n},), got {v.shape}", where="valid")
        return v

    def batch(
        self, indices: Sequence[int] | np.ndarray, valid: np.ndarray | None = None
    ) -> WindowBatch:
        """Read the windows ``indices`` (in that order) from the store.

        Only the step ranges the windows need are read; windows closer than one time chunk share
        one read. ``valid`` marks padding samples (False): their ``mask`` is all False.
        """
        idx = self._check_indices(indices)
        ok = self._check_valid(valid, idx.size)
        if idx.size == 0:
            return self.batch_from_block(
                np.empty((0, *self.store.shape[1:]), np.float32),
                np.empty((0, *self.store.shape[1:]), bool),
                0,
                idx,
                ok,
            )
        order = np.argsort(idx, kind="stable")
        parts: list[WindowBatch] = []
        positions: list[np.ndarray] = []
        sorted_idx = idx[order]
        for lo, hi in merge_spans(sorted_idx, self.window.length, self.store.chunks[0]):
            sel = order[(sorted_idx >= lo) & (sorted_idx < hi)]
            # [t, node, channel]; through the block cache the arrays may be read-only views,
            # which batch_from_block only reads (its fancy indexing copies)
            cache = self.block_cache
            values, mask = cache.read(lo, hi) if cache is not None else self.store.read(lo, hi)
            parts.append(self.batch_from_block(values, mask, lo, idx[sel], ok[sel]))
            positions.append(sel)
        if len(parts) == 1:
            part, pos = parts[0], positions[0]
            if np.array_equal(pos, np.arange(idx.size)):
                return part
            inverse = torch.from_numpy(np.argsort(pos))
            return WindowBatch(*(t[inverse] for t in part))
        # restore the caller's order: parts are in step order
        inverse = torch.from_numpy(np.argsort(np.concatenate(positions)))
        return WindowBatch(*(torch.cat(ts)[inverse] for ts in zip(*parts, strict=True)))

    def batch_from_block(
        self,
        values: np.ndarray,
        mask: np.ndarray,
        block_start: int,
        indices: np.ndarray,
        valid: np.ndarray | None = None,
    ) -> WindowBatch:
        """Cut windows ``indices`` out of steps already read.

        Args:
            values: ``[t, node, channel]`` float32 of steps ``[block_start, block_start + t)``
                (NaN allowed where not observed), every channel of the store.
            mask: ``[t, node, channel]`` bool, True where observed.
            block_start: the step of ``values[0]``.
            indices: window indices; each window must lie inside the block.
            valid: ``[batch]`` bool, False for padding samples (default all True).
        """
        idx = self._check_indices(indices)
        ok = self._check_valid(valid, idx.size)
        if values.shape != mask.shape or values.shape[1:] != self.store.shape[1:]:
            raise InputError(
                f"block values {values.shape} and mask {mask.shape} must be [t, "
                f"{self.store.nodes}, {len(self.store.channels)}]",
                where="block",
            )
        L, H = self.window.input_steps, self.window.horizon
        off = idx - int(block_start)
        if idx.size and (off.min() < 0 or off.max() + L + H > values.shape[0]):
            raise InputError(
                f"windows {int(idx.min())}..{int(idx.max())} need steps outside the block "
                f"[{block_start}, {block_start + values.shape[0]})",
                where="indices",
            )
        x_steps = off[:, None] + np.arange(L)  # [batch, L] rows of the block
        y_steps = off[:, None] + np.arange(L, L + H)  # [batch, H]

        # x: [batch, L, node, channel_in]; fancy indexing copies, so normalising in place is safe
        x = values[x_steps]
        x_mask = mask[x_steps]
        if not self._all_inputs:
            x, x_mask = x[..., self.input_idx], x_mask[..., self.input_idx]
        x_mask = x_mask & np.isfinite(x)  # a non-finite reading counts as unobserved
        x -= self._in_mean
        x /= self._in_std
        x[~x_mask] = 0.0

        # y, mask: [batch, H, node, channel_out], original units
        y = values[y_steps]
        y_mask = mask[y_steps]
        if not self._all_targets:
            y, y_mask = y[..., self.target_idx], y_mask[..., self.target_idx]
        y_mask = y_mask & np.isfinite(y)
        if self.target_keep is not None:
            # data.target_fraction: training steps outside the kept days are no targets
            y_mask &= self.target_keep[int(block_start) + y_steps][:, :, None, None]
        y[~y_mask] = 0.0
        y_mask &= ok[:, None, None, None]  # padding samples contribute nothing

        abs_steps = idx[:, None] + np.arange(L)  # [batch, L] absolute steps of the inputs
        return WindowBatch(
            index=torch.from_numpy(idx.copy()),
            x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
            mask=torch.from_numpy(np.ascontiguousarray(y_mask)),
            x_mask=torch.from_numpy(np.ascontiguousarray(x_mask)),
            time_of_day=torch.from_numpy(self._time_of_day[abs_steps]),
            day_of_week=torch.from_numpy(self._day_of_week[abs_steps]),
            valid=torch.from_numpy(ok.copy()),
        )

    def __repr__(self) -> str:
        return (
            f"WindowReader({self.store!r}, L={self.window.input_steps}, H={self.window.horizon}, "
            f"stride={self.window.stride}, inputs={self.input_idx}, targets={self.target_idx})"
        )


def windows_from(windows: range, first: int) -> range:
    """The windows of ``windows`` that start at step ``first`` or later (its stride kept)."""
    if first <= windows.start:
        return windows
    skip = -(-(first - windows.start) // windows.step)  # whole strides, rounded up
    return range(min(windows.start + skip * windows.step, windows.stop), windows.stop, windows.step)


def recent_start(train: tuple[int, int], days: int, time: pd.DatetimeIndex) -> int:
    """The first step of the last ``days`` days of the training steps ``train`` (by the time
    axis; the last day may be partial): where ``data.recent_days`` training windows start."""
    lo, hi = train
    day = np.asarray(time[lo:hi].normalize().asi8)  # [train steps] the day of each step
    first = np.flatnonzero(np.r_[True, day[1:] != day[:-1]])  # where each day starts
    return lo + int(first[max(0, len(first) - days)])


def kept_target_steps(
    steps: int, train: tuple[int, int], fraction: float, time: pd.DatetimeIndex
) -> np.ndarray:
    """``[steps]`` bool: the steps whose readings may be training targets (``target_fraction``).

    The training split is cut into whole hours (by the time axis; the first and last may be
    partial) and only the last ``max(1, round(fraction x hours))`` hours keep their targets, one
    contiguous block: a network with little history has its most recent readings. Hours, not
    days: a few days of history at several fractions must still be several amounts. Steps
    outside the training split keep theirs (validation and test are never reduced).
    """
    lo, hi = train
    keep = np.ones(steps, dtype=bool)
    hours = np.asarray(time[lo:hi].floor("h").asi8)  # [train steps] the hour of each step
    first = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])  # where each hour starts
    kept = max(1, round(fraction * len(first)))
    keep[lo : lo + int(first[len(first) - kept])] = False
    return keep
