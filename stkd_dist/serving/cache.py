"""The soft-label cache: a teacher's outputs stored in Zarr, aligned with the windows.

Layout (one Zarr v3 group per teacher version and dataset)::

    <storage>/labels/<dataset fingerprint>/<teacher version>.zarr/
      <split>/prediction  float32 [windows of split, H, N, C_out]   NaN until filled
      <split>/spread      float32 [windows of split, H, N, C_out]   (teachers with spread only)
      <split>/filled      bool    [windows of split]                 True once the row is written

Row ``i`` of a split holds window ``split_start + i * stride``. Root attributes record the schema
version, the dataset fingerprint, the teacher version and its validation MAE (``val_mae``), the
label shape, each split's window range and ``forward_windows``: how many windows the teacher was
run on to fill it.

``stkd precompute-labels`` (:func:`stkd_dist.serving.precompute.precompute_labels`) writes a complete cache under a temporary
name and renames it into place. A server in write-through mode fills a cache as it serves
(:mod:`~stkd_dist.serving.write_through`): data rows are written before their ``filled`` flags,
and Zarr writes each chunk file atomically, so a crash leaves unflagged rows, never flagged
garbage. Only one process may write to a cache at a time (a second writer could lose the other's
rows in a shared chunk).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from stkd_dist.errors import StoreError
from stkd_dist.paths import storage_root
from stkd_dist.serving.teacher import TeacherMeta, safe_version

log = logging.getLogger(__name__)

CACHE_SCHEMA_ATTR = "stkd_label_cache_version"
CACHE_SCHEMA_VERSION = 1
# Rows per chunk: about this many bytes of labels per chunk file.
TARGET_CHUNK_BYTES = 4 * 2**20
FILLED_CHUNK = 65536
# labels `stkd serve` holds in memory per cache by default (see LabelCache, --cache-memory-mb)
SERVE_MEMORY_BYTES = 2 * 2**30

Labels = tuple[np.ndarray, np.ndarray | None]


def default_cache_path(
    fingerprint: str, version: str, storage: str | os.PathLike[str] | None = None
) -> Path:
    """``<storage>/labels/<fingerprint>/<teacher version>.zarr``."""
    return storage_root(storage) / "labels" / fingerprint / f"{safe_version(version)}.zarr"


def rows_per_chunk(window_shape: tuple[int, ...], n_rows: int) -> int:
    """Rows of a chunk: about :data:`TARGET_CHUNK_BYTES` each, at most ``n_rows``."""
    row_bytes = int(np.prod(window_shape)) * 4
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // max(row_bytes, 1)))


def _range_attr(r: range) -> dict[str, int]:
    return {"start": r.start, "stop": r.stop, "step": r.step, "windows": len(r)}


class LabelCache:
    """An opened soft-label cache.

    A split whose labels fit in ``memory_bytes`` (with the splits already held) is read into
    memory on its first lookup, so serving copies rows from RAM instead of decoding Zarr chunks
    for every chunk sent; larger splits, and every split with the default of 0, are read from
    Zarr row by row. Rows returned from memory may be views: do not modify them.

    Args:
        path: the ``.zarr`` directory.
        mode: ``"r"`` to read, ``"r+"`` to fill (write-through).
        memory_bytes: how many bytes of labels may be held in memory (0 = none).

    Raises:
        StoreError: no cache there, or not a label cache of this schema version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        memory_bytes: int = 0,
    ) -> None:
        self.path = Path(path)
        self.memory_bytes = int(memory_bytes)
        where = str(self.path)
        if not self.path.exists():
            raise StoreError("no such label cache", where=where)
        try:
            self.group = zarr.open_group(self.path, mode=mode, zarr_format=3)
        except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"not a Zarr v3 group ({e})", where=where) from e
        attrs = dict(self.group.attrs)
        if attrs.get(CACHE_SCHEMA_ATTR) != CACHE_SCHEMA_VERSION:
            raise StoreError(
                f"not a label cache of schema version {CACHE_SCHEMA_VERSION} "
                f"(found {attrs.get(CACHE_SCHEMA_ATTR)!r}); recompute it with "
                "`stkd precompute-labels`",
                where=where,
            )
        self.fingerprint = str(attrs["dataset_fingerprint"])
        self.version = str(attrs["teacher_version"])
        self.window_shape = tuple(int(s) for s in attrs["window_shape"])
        self.has_spread = bool(attrs["has_spread"])
        # the teacher's validation MAE (None for caches written before it was recorded)
        self.val_mae: float | None = attrs.get("val_mae")
        self.ranges = {
            s: range(int(r["start"]), int(r["stop"]), int(r["step"]))
            for s, r in attrs["splits"].items()
        }
        # guards the filled flags, the in-memory copies and every write
        self._lock = threading.Lock()
        self._memory: dict[str, Labels] = {}  # split -> (prediction, spread) held in RAM
        self._on_disk: set[str] = set()  # splits too large to hold
        # the filled flags live in memory; every lookup consults them without touching disk
        self._filled = {s: np.asarray(self.group[s]["filled"][...]) for s in self.ranges}

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | os.PathLike[str], meta: TeacherMeta, splits: Sequence[str]
    ) -> LabelCache:
        """Create an empty cache for teacher ``meta`` holding ``splits`` (overwrites ``path``)."""
        group = zarr.open_group(Path(path), mode="w", zarr_format=3)
        group.attrs.update(
            {
                CACHE_SCHEMA_ATTR: CACHE_SCHEMA_VERSION,
                "dataset_fingerprint": meta.fingerprint,
                "teacher_version": meta.version,
                "model_key": meta.model_key,
                "window_shape": list(meta.window_shape),
                "has_spread": meta.has_spread,
                "splits": {},
                "forward_windows": 0,
                "val_mae": meta.val_mae,
            }
        )
        cache = cls(path, mode="r+")
        for split in splits:
            cache.add_split(split, meta.splits[split])
        return cache

    def add_split(self, split: str, windows: range) -> None:
        """Add the empty arrays of ``split`` (its windows are ``windows``)."""
        n = len(windows)
        if n == 0:
            return
        rows = rows_per_chunk(self.window_shape, n)
        names = ("prediction", "spread") if self.has_spread else ("prediction",)
        group = self.group.require_group(split)
        for name in names:
            group.create_array(
                name,
                shape=(n, *self.window_shape),
                chunks=(rows, *self.window_shape),
                dtype="float32",
                fill_value=np.nan,
                # teacher outputs are noisy floats: compression costs time and saves little
                compressors=None,
                dimension_names=("window", "horizon", "node", "channel"),
            )
        group.create_array(
            "filled", shape=(n,), chunks=(min(n, FILLED_CHUNK),), dtype="bool", fill_value=False
        )
        splits = dict(self.group.attrs["splits"])
        splits[split] = _range_attr(windows)
        self.group.attrs["splits"] = splits
        self.ranges[split] = windows
        self._filled[split] = np.zeros(n, dtype=bool)

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
        for split, windows in self.ranges.items():
            if meta.splits.get(split) != windows:
                raise StoreError(
                    f"split {split!r} covers windows {windows} in the cache but "
                    f"{meta.splits.get(split)} for the teacher (other window or split settings)",
                    where=where,
                )

    # -- counts --------------------------------------------------------------------------------
    @property
    def forward_windows(self) -> int:
        """Windows the teacher was run on to fill this cache (as recorded in its attributes)."""
        return int(self.group.attrs.get("forward_windows", 0))

    def add_forward_windows(self, n: int) -> None:
        """Add ``n`` to the recorded count of teacher forward windows."""
        with self._lock:
            self.group.attrs["forward_windows"] = self.forward_windows + int(n)

    def filled_windows(self, split: str | None = None) -> int:
        """How many windows (of ``split``, or of all splits) the cache holds."""
        with self._lock:
            if split is not None:
                return int(self._filled[split].sum()) if split in self._filled else 0
            return int(sum(f.sum() for f in self._filled.values()))

    def is_complete(self, split: str) -> bool:
        """Whether every window of ``split`` is in the cache."""
        with self._lock:
            return split in self._filled and bool(self._filled[split].all())

    @property
    def resident_splits(self) -> list[str]:
        """Splits whose labels are held in memory (see ``memory_bytes``)."""
        return sorted(self._memory)

    # -- reads and writes ----------------------------------------------------------------------
    def _positions(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Rows of windows ``indices`` in ``split``; -1 where a window is not in the split."""
        r = self.ranges.get(split)
        if r is None or len(r) == 0:
            return np.full(indices.shape, -1, dtype=np.int64)
        off = indices - r.start
        pos = off // r.step
        ok = (off >= 0) & (off % r.step == 0) & (pos < len(r))
        return np.where(ok, pos, -1)

    def lookup(self, split: str, indices: np.ndarray) -> tuple[np.ndarray, Labels | None]:
        """Labels of the cached windows among ``indices``.

        Returns ``(hit, labels)``: ``hit`` ``[n]`` bool marks the windows found, ``labels`` holds
        ``(prediction, spread)`` of those windows in order (None when there is no hit).
        """
        idx = np.asarray(indices, dtype=np.int64)
        pos = self._positions(split, idx)
        hit = pos >= 0
        if not hit.any():
            return hit, None
        resident = self._resident(split)  # before the flags: loading may unflag lost rows
        with self._lock:
            hit[hit] = self._filled[split][pos[hit]]
        if not hit.any():
            return hit, None
        rows = pos[hit]
        if resident is not None:
            # rows flagged filled are never rewritten (write-through only adds missing rows),
            # so a view into the resident arrays stays valid while it is being sent
            spread_rows = None if resident[1] is None else _take(resident[1], rows)
            return hit, (_take(resident[0], rows), spread_rows)
        group = self.group[split]
        pred = _read_rows(group["prediction"], rows)
        spread = _read_rows(group["spread"], rows) if self.has_spread else None
        # a row flagged filled but holding the NaN fill value was lost by a concurrent writer:
        # treat it as a miss rather than serve it
        finite = np.isfinite(pred.reshape(len(rows), -1)).all(axis=1)
        if not finite.all():
            log.warning(
                "label cache %s: %d rows flagged but empty", self.path, int((~finite).sum())
            )
            hit[np.flatnonzero(hit)[~finite]] = False
            pred = pred[finite]
            spread = spread[finite] if spread is not None else None
            if not hit.any():
                return hit, None
        return hit, (pred, spread)

    def _resident(self, split: str) -> Labels | None:
        """The labels of ``split`` in memory (read on first use), or None when too large."""
        held = self._memory.get(split)
        if held is not None or split in self._on_disk:
            return held
        group = self.group[split]
        n = group["prediction"].shape[0]
        size = n * int(np.prod(self.window_shape)) * 4 * (2 if self.has_spread else 1)
        with self._lock:  # no write may land between reading the arrays and publishing them
            if split in self._memory or split in self._on_disk:
                return self._memory.get(split)
            used = sum(
                p.nbytes + (0 if sp is None else sp.nbytes) for p, sp in self._memory.values()
            )
            if used + size > self.memory_bytes:
                self._on_disk.add(split)
                log.info(
                    "label cache %s: split %s (%d bytes) read from disk", self.path, split, size
                )
                return None
            pred = np.asarray(group["prediction"][...])
            spread = np.asarray(group["spread"][...]) if self.has_spread else None
            # a row flagged filled but holding the NaN fill value was lost by a concurrent
            # writer: unflag it (checked once here instead of on every lookup)
            self._filled[split] &= np.isfinite(pred.reshape(n, -1)).all(axis=1)
            self._memory[split] = (pred, spread)
            return self._memory[split]

    def write(self, indices: np.ndarray, prediction: np.ndarray, spread: np.ndarray | None) -> int:
        """Store the labels of windows ``indices`` (any split); returns the rows written.

        Windows of splits the cache does not hold are skipped.
        """
        idx = np.asarray(indices, dtype=np.int64)
        written = 0
        with self._lock:
            for split in self.ranges:
                pos = self._positions(split, idx)
                sel = pos >= 0
                if not sel.any():
                    continue
                rows = pos[sel]
                order = np.argsort(rows)
                rows = rows[order]
                group = self.group[split]
                # data rows first, flags after: a crash in between leaves rows unflagged
                _write_rows(group["prediction"], rows, prediction[sel][order])
                if self.has_spread:
                    assert spread is not None, "a teacher with spread returns it"
                    _write_rows(group["spread"], rows, spread[sel][order])
                held = self._memory.get(split)
                if held is not None:
                    held[0][rows] = prediction[sel][order]
                    if held[1] is not None and spread is not None:
                        held[1][rows] = spread[sel][order]
                filled = self._filled[split]
                filled[rows] = True
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                group["filled"][lo:hi] = filled[lo:hi]
                written += len(rows)
        return written


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``: a view when the rows are contiguous and ascending, else a copy."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
        return array[lo:hi]
    return array[rows]


def _read_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` with one slice read when the rows are contiguous and ascending."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
        return np.asarray(array[lo:hi])
    unique, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(array.get_orthogonal_selection((unique,)))[inverse]


def _write_rows(array: zarr.Array, rows: np.ndarray, values: np.ndarray) -> None:
    """``array[rows] = values`` for ascending ``rows``, as one slice when they are contiguous."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):
        array[lo:hi] = values
    else:
        unique, first = np.unique(rows, return_index=True)
        array.set_orthogonal_selection((unique,), values[first])


def open_cache(
    path: str | os.PathLike[str],
    meta: TeacherMeta,
    writable: bool = False,
    memory_bytes: int = 0,
) -> LabelCache:
    """Open the cache at ``path`` for teacher ``meta`` (checked to match).

    With ``writable`` (write-through) a missing cache is created with every split, and splits a
    cache lacks are added; otherwise a missing cache raises :class:`StoreError`.
    ``memory_bytes``: see :class:`LabelCache`.
    """
    p = Path(path)
    if not p.exists():
        if not writable:
            raise StoreError(
                "no label cache here; create one with `stkd precompute-labels` or serve with "
                "--write-through",
                where=str(p),
            )
        p.parent.mkdir(parents=True, exist_ok=True)
        cache = LabelCache.create(p, meta, [s for s in meta.splits if len(meta.splits[s])])
        cache.memory_bytes = int(memory_bytes)
        return cache
    cache = LabelCache(p, mode="r+" if writable else "r", memory_bytes=memory_bytes)
    cache.check_matches(meta)
    if writable:
        for split, windows in meta.splits.items():
            if split not in cache.ranges and len(windows):
                cache.add_split(split, windows)
    return cache
