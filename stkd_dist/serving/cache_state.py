"""What an opened label cache holds, and whether it fits a teacher: counts and checks.

The layer between reading (:mod:`~stkd_dist.serving.cache_reader`) and the public
:class:`~stkd_dist.serving.cache.LabelCache`, which sets the attributes below when it opens a
cache: its splits' windows, how many are present, what the teacher's forward passes cost, and
the checks of a cache against the teacher a server holds (dataset, version, label and hidden
shapes, splits, compute settings).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stkd_dist import location as loc_
from stkd_dist.errors import StoreError
from stkd_dist.serving.cache_layout import META_DIR, check_compute, compute_attrs
from stkd_dist.serving.cache_markers import _listdir
from stkd_dist.serving.cache_reader import _ChunkReader
from stkd_dist.serving.forward import ComputeSettings
from stkd_dist.serving.teacher import TeacherMeta


class _CacheState(_ChunkReader):
    """Counts and checks of an opened cache (the base of ``LabelCache``)."""

    fingerprint: str
    version: str
    computed_with: dict[str, Any]
    _forward: int  # this writer's forward windows recorded so far

    @property
    def ranges(self) -> dict[str, range]:
        """Window range of each split the cache holds."""
        return {name: s.windows for name, s in self._splits.items()}

    def check_matches(self, meta: TeacherMeta) -> None:
        """Raise :class:`StoreError` unless this cache holds labels of teacher ``meta``."""
        where = str(self.path)
        if self.fingerprint != meta.fingerprint:
            raise StoreError(
                f"the cache holds labels for dataset {self.fingerprint}, the server's dataset is "
                f"{meta.fingerprint}",
                where=where,
            )
        if self.version != meta.version:
            raise StoreError(
                f"the cache holds labels of teacher {self.version}, the server's teacher is "
                f"{meta.version}",
                where=where,
            )
        if self.window_shape != tuple(meta.window_shape) or self.has_spread != meta.has_spread:
            raise StoreError(
                f"the cache's labels are {list(self.window_shape)} (spread: {self.has_spread}), "
                f"the teacher's are {list(meta.window_shape)} (spread: {meta.has_spread})",
                where=where,
            )
        if self.hidden_dim and meta.hidden_dim and self.hidden_dim != meta.hidden_dim:
            raise StoreError(
                f"the cache's hidden states are [N, {self.hidden_dim}], the teacher's are "
                f"[N, {meta.hidden_dim}]",
                where=where,
            )
        for split, windows in self.ranges.items():
            if meta.splits.get(split) != windows:
                raise StoreError(
                    f"split {split!r} covers windows {windows} in the cache but "
                    f"{meta.splits.get(split)} for the teacher (other window or split settings)",
                    where=where,
                )

    def check_compute(self, compute: ComputeSettings) -> None:
        """Check that a teacher computing with ``compute`` makes this cache's labels.

        Raises :class:`StoreError` naming both settings when the cache is writable
        (write-through would mix labels of different bits); logs a warning when read-only.
        """
        theirs = compute_attrs(compute.micro_batch, compute.precision, compute.device_type)
        check_compute(self.computed_with, theirs, self.writable, str(self.path))

    # -- counts --------------------------------------------------------------------------------
    @property
    def forward_windows(self) -> int:
        """Windows the teacher was run on to fill this cache (every writer's count, summed)."""
        total = 0
        for entry in _listdir(self.path / META_DIR / "forward"):
            if entry.name.endswith(".json"):
                try:
                    total += int(loc_.read_json(entry)["windows"])
                except (FileNotFoundError, ValueError, KeyError):
                    continue
        return total

    def add_forward_windows(self, n: int) -> None:
        """Add ``n`` to this writer's recorded count of teacher forward windows.

        Each writer keeps its own object (rewritten whole), so counts of concurrent writers
        never overwrite each other.
        """
        with self._write_lock:
            self._forward += int(n)
            loc_.write_json_atomic(
                self.path / META_DIR / "forward" / f"{self.writer_id}.json",
                {"windows": self._forward},
            )

    def filled_windows(self, split: str | None = None) -> int:
        """How many windows (of ``split``, or of all splits) the cache holds."""
        with self._lock:
            if split is not None:
                s = self._splits.get(split)
                return int(s.filled.sum()) if s is not None else 0
            return int(sum(s.filled.sum() for s in self._splits.values()))

    def is_complete(self, split: str) -> bool:
        """Whether every window of ``split`` is present (in chunks marked done or fragments)."""
        with self._lock:
            s = self._splits.get(split)
            return s is not None and bool(s.filled.all())

    def chunk_rows(self, split: str) -> int:
        """Windows per chunk of ``split``."""
        return self._splits[split].chunk_rows

    def chunk_windows(self, split: str) -> list[np.ndarray]:
        """The window indices of each chunk of ``split``, in order."""
        s = self._splits[split]
        index = np.asarray(s.windows, dtype=np.int64)
        return [index[s.chunk_slice(c)] for c in range(s.n_chunks)]

    def missing_chunks(self, split: str) -> list[int]:
        """Chunks of ``split`` whose marker does not exist."""
        with self._lock:
            return [int(c) for c in np.flatnonzero(~self._splits[split].done)]

    def stored_bytes(self, split: str | None = None) -> int:
        """Bytes of the label arrays in the store (chunks and array metadata)."""
        splits = [split] if split is not None else list(self._splits)
        return int(sum(a.nbytes_stored() for s in splits for a in self._splits[s].arrays.values()))

    @property
    def resident_splits(self) -> list[str]:
        """Splits whose labels are held in memory (see ``memory_bytes``)."""
        return sorted(self._memory)
