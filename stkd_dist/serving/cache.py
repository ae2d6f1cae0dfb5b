"""The soft-label cache: a teacher's outputs stored in Zarr, chunked the way ranks read them.

This module is the cache's public face: :class:`LabelCache` (open, create, fill, read) and
:func:`open_cache`, with the public names of the modules below re-exported. Each layer imports
only those below it:

* :mod:`~stkd_dist.serving.cache_layout`: the objects and attributes of a cache, the stored
  dtypes and codecs, and the chunk rows chosen for the shard plans;
* :mod:`~stkd_dist.serving.cache_markers`: completeness markers, fragments, and how concurrent
  writers (write-through replicas, precompute workers) fill one cache;
* :mod:`~stkd_dist.serving.cache_reader`: lookups, from the resident copy or whole chunks
  through an LRU;
* this module: opening, creating and checking a cache, its splits and its counts.

Changing the cache's splits (:meth:`LabelCache.add_split`) is the only operation that rewrites
shared metadata: do it from one process.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr
from upath import UPath

from stkd_dist import location as loc_
from stkd_dist.errors import StoreError
from stkd_dist.location import location
from stkd_dist.serving.cache_layout import (
    CACHE_SCHEMA_ATTR,
    CACHE_SCHEMA_VERSION,
    CODECS,
    COMMIT_MARKER,
    DEFAULT_CODEC,
    DEFAULT_LABEL_DTYPE,
    DESIGN_AMPLIFICATION,
    FILLED_CHUNK,
    LABEL_DTYPES,
    META_DIR,
    MIN_CHUNK_BYTES,
    PLAN_WORLD_SIZES,
    TARGET_CHUNK_BYTES,
    Labels,
    _check_setting,
    _create_split,
    _stored_dtype,
    check_compute,
    chunk_amplification,
    compute_attrs,
    decode_labels,
    default_cache_path,
    encode_labels,
    plan_chunk_rows,
    rows_per_chunk,
    stored_compute,
)
from stkd_dist.serving.cache_layout import _block_rows as _block_rows  # tests of the chunk plan
from stkd_dist.serving.cache_markers import REFRESH_S, _exists, _listdir, _Split, _writer_id
from stkd_dist.serving.cache_reader import CHUNK_CACHE_BYTES, SERVE_MEMORY_BYTES, _ChunkReader
from stkd_dist.serving.forward import DEFAULT_MICRO_BATCH, ComputeSettings
from stkd_dist.serving.teacher import TeacherMeta

__all__ = [
    "CACHE_SCHEMA_ATTR",
    "CACHE_SCHEMA_VERSION",
    "CHUNK_CACHE_BYTES",
    "CODECS",
    "COMMIT_MARKER",
    "DEFAULT_CODEC",
    "DEFAULT_LABEL_DTYPE",
    "DESIGN_AMPLIFICATION",
    "FILLED_CHUNK",
    "LABEL_DTYPES",
    "META_DIR",
    "MIN_CHUNK_BYTES",
    "PLAN_WORLD_SIZES",
    "REFRESH_S",
    "SERVE_MEMORY_BYTES",
    "TARGET_CHUNK_BYTES",
    "LabelCache",
    "Labels",
    "PathLike",
    "chunk_amplification",
    "decode_labels",
    "default_cache_path",
    "encode_labels",
    "open_cache",
    "plan_chunk_rows",
    "rows_per_chunk",
]

PathLike = str | os.PathLike[str] | UPath


class LabelCache(_ChunkReader):
    """An opened soft-label cache (a local path or an object-store URL).

    A split whose labels fit in ``memory_bytes`` (with the splits already held) is read into
    memory on its first lookup, so serving copies rows from RAM; larger splits, and every split
    with the default of 0, are read chunk by chunk: a reader fetches the whole chunks a lookup
    needs and keeps the last ones (``chunk_cache_bytes``) decoded-ready in an LRU, so the
    shuffled batches of a plan block fetch each chunk once. Rows returned from memory may be
    views: do not modify them.

    Args:
        path: the cache (``.zarr`` folder or URL).
        mode: ``"r"`` to read, ``"r+"`` to fill (write-through, precompute).
        memory_bytes: how many bytes of labels may be held in memory (0 = none).
        chunk_cache_bytes: bytes of chunks kept by the reader (None: enough for two of the
            largest plan blocks, at least :data:`CHUNK_CACHE_BYTES`).
        wrap_store: applied to the Zarr store before it is opened (e.g. a byte-counting
            wrapper for measurements).

    Raises:
        StoreError: no cache there, an unfinished one, or not a label cache of this schema.
    """

    def __init__(
        self,
        path: PathLike,
        mode: str = "r",
        memory_bytes: int = 0,
        *,
        chunk_cache_bytes: int | None = None,
        wrap_store: Callable[[Any], Any] | None = None,
    ) -> None:
        self.path = location(path)
        self.memory_bytes = int(memory_bytes)
        self.writable = mode != "r"
        where = str(self.path)
        with loc_.storage_errors(where):
            if not _exists(self.path):
                raise StoreError("no such label cache", where=where)
            store = loc_.zarr_store(self.path, read_only=not self.writable)
            if wrap_store is not None:
                if isinstance(store, str):
                    store = zarr.storage.LocalStore(store, read_only=not self.writable)
                store = wrap_store(store)
            try:
                self.group = zarr.open_group(store, mode=mode, zarr_format=3)
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
            if not _exists(self.path / COMMIT_MARKER):
                raise StoreError(
                    "an unfinished label cache (its creation did not complete); recompute it "
                    "with `stkd precompute-labels --overwrite`",
                    where=where,
                )
        self.fingerprint = str(attrs["dataset_fingerprint"])
        self.version = str(attrs["teacher_version"])
        self.window_shape = tuple(int(s) for s in attrs["window_shape"])
        self.has_spread = bool(attrs["has_spread"])
        self.codec = str(attrs.get("codec", "none"))
        self.label_dtype = str(attrs.get("label_dtype", DEFAULT_LABEL_DTYPE))
        # how the labels were computed: micro_batch, precision, label_device (device type)
        self.computed_with = stored_compute(attrs)
        self.label_device = str(self.computed_with["label_device"])
        # the teacher's validation MAE (None for caches written before it was recorded)
        self.val_mae: float | None = attrs.get("val_mae")
        self.writer_id = _writer_id()
        # writers share the work: a miss is looked up in the store again at once (a marker and
        # a listing per missed chunk), readers of a cache being filled look every REFRESH_S
        self.refresh_s = 0.0 if self.writable else REFRESH_S
        self._names = ("prediction", "spread") if self.has_spread else ("prediction",)
        # _lock guards the in-memory state (present rows, partial chunks, resident copies, LRU)
        # and is never held across storage I/O, so lookups from the serving threads go on while
        # a write is uploading. _write_lock orders this instance's writes (one at a time).
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._splits: dict[str, _Split] = {}
        self._memory: dict[str, Labels] = {}  # split -> (prediction, spread) float32 in RAM
        self._on_disk: set[str] = set()  # splits too large to hold
        self._lru: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._lru_bytes = 0
        self._forward = 0
        self._fragment_seq = 0
        for split, r in attrs["splits"].items():
            self._open_split(split, r)
        row = int(np.prod(self.window_shape)) * _stored_dtype(self.label_dtype).itemsize
        largest = max((s.block_rows + 2 * s.chunk_rows for s in self._splits.values()), default=0)
        self.chunk_cache_bytes = (
            int(chunk_cache_bytes)
            if chunk_cache_bytes is not None
            else max(CHUNK_CACHE_BYTES, 2 * largest * row * len(self._names))
        )

    @property
    def ranges(self) -> dict[str, range]:
        """Window range of each split the cache holds."""
        return {name: s.windows for name, s in self._splits.items()}

    def _open_split(self, split: str, r: dict[str, int]) -> None:
        windows = range(int(r["start"]), int(r["stop"]), int(r["step"]))
        group = self.group[split]
        arrays = {name: group[name] for name in self._names}
        chunk_rows = int(r.get("chunk_rows") or arrays["prediction"].chunks[0])
        n_chunks = -(-len(windows) // chunk_rows)
        s = _Split(
            name=split,
            windows=windows,
            chunk_rows=chunk_rows,
            block_rows=int(r.get("block_rows", chunk_rows)),
            arrays=arrays,  # type: ignore[arg-type]
            done=np.zeros(n_chunks, dtype=bool),
            filled=np.zeros(len(windows), dtype=bool),
            checked=np.full(n_chunks, time.monotonic()),
        )
        self._splits[split] = s
        self._scan(s)

    # -- creation ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: PathLike,
        meta: TeacherMeta,
        splits: Sequence[str],
        *,
        codec: str = DEFAULT_CODEC,
        label_dtype: str = DEFAULT_LABEL_DTYPE,
        chunk_steps: int | None = None,
        label_device: str = "cpu",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        precision: str = "fp32",
    ) -> LabelCache:
        """Create an empty cache for teacher ``meta`` holding ``splits`` (replaces ``path``).

        Args:
            codec: the compressor of the label chunks (one of :data:`CODECS`).
            label_dtype: how labels are stored (one of :data:`LABEL_DTYPES`).
            chunk_steps: the time-chunk length of the teacher's store; chunks then follow its
                shard plans (:func:`plan_chunk_rows`). None chunks by size alone.
            label_device, micro_batch, precision: how the labels are computed (the device type,
                windows per model call, precision), recorded: labels of other settings differ in
                their last bits (see :meth:`check_compute`).

        The commit marker is written last: until then no reader opens the folder.
        """
        _check_setting(codec, CODECS, "codec")
        _check_setting(label_dtype, LABEL_DTYPES, "label_dtype")
        loc = location(path)
        with loc_.storage_errors(loc):
            loc_.remove(loc)
            loc_.makedirs(loc.parent)
            group = zarr.open_group(loc_.zarr_store(loc, read_only=False), mode="w", zarr_format=3)
            group.attrs.update(
                {
                    CACHE_SCHEMA_ATTR: CACHE_SCHEMA_VERSION,
                    "dataset_fingerprint": meta.fingerprint,
                    "teacher_version": meta.version,
                    "model_key": meta.model_key,
                    "window_shape": list(meta.window_shape),
                    "has_spread": meta.has_spread,
                    "codec": codec,
                    "label_dtype": label_dtype,
                    **compute_attrs(micro_batch, precision, label_device),
                    "chunk_steps": chunk_steps,
                    "splits": {},
                    "val_mae": meta.val_mae,
                }
            )
            for split in splits:
                _create_split(
                    group, tuple(meta.window_shape), meta.has_spread, split, meta.splits[split],
                    codec, label_dtype, chunk_steps,
                )  # fmt: skip
            # last: from now on the folder is a label cache (empty until chunks are written)
            loc_.write_json_atomic(loc / COMMIT_MARKER, {"schema": CACHE_SCHEMA_VERSION})
        return cls(loc, mode="r+")

    def add_split(self, split: str, windows: range) -> None:
        """Add the empty arrays of ``split`` (its windows are ``windows``).

        This rewrites the group's attributes: only one process may add splits at a time.
        """
        if len(windows) == 0 or split in self._splits:
            return
        _create_split(
            self.group, self.window_shape, self.has_spread, split, windows, self.codec,
            self.label_dtype, dict(self.group.attrs).get("chunk_steps"),
        )  # fmt: skip
        self._open_split(split, dict(self.group.attrs)["splits"][split])

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


def open_cache(
    path: PathLike,
    meta: TeacherMeta,
    writable: bool = False,
    memory_bytes: int = 0,
    *,
    chunk_steps: int | None = None,
    compute: ComputeSettings | None = None,
) -> LabelCache:
    """Open the cache at ``path`` for teacher ``meta`` (checked to match).

    With ``writable`` (write-through) a missing cache is created with every split (chunked for
    the shard plans of a store chunked ``chunk_steps`` when given), and splits a cache lacks are
    added; otherwise a missing cache raises :class:`StoreError`. Replicas starting at once may
    both find the cache missing: each builds it under a temporary name, and only the first
    moves into place (the others open it).
    ``memory_bytes``: see :class:`LabelCache`. ``compute``: how the teacher computes labels,
    recorded in a cache created here (None = the defaults: CPU, fp32, 32 windows per call); the
    server checks an existing cache's settings against its teacher's
    (:meth:`LabelCache.check_compute`).
    """
    loc = location(path)
    compute = compute if compute is not None else ComputeSettings()
    if not _exists(loc):
        if not writable:
            raise StoreError(
                "no label cache here; create one with `stkd precompute-labels` or serve with "
                "--write-through",
                where=str(loc),
            )
        _create_shared(loc, meta, chunk_steps, compute)
    cache = LabelCache(loc, mode="r+" if writable else "r", memory_bytes=memory_bytes)
    cache.check_matches(meta)
    if writable:
        for split, windows in meta.splits.items():
            if split not in cache.ranges and len(windows):
                cache.add_split(split, windows)
    return cache


def _create_shared(
    loc: UPath, meta: TeacherMeta, chunk_steps: int | None, compute: ComputeSettings
) -> None:
    """Create an empty cache at ``loc`` unless another process does so first."""
    tmp = loc_.temporary_sibling(loc)
    try:
        LabelCache.create(
            tmp,
            meta,
            [s for s in meta.splits if len(meta.splits[s])],
            chunk_steps=chunk_steps,
            label_device=compute.device_type,
            micro_batch=compute.micro_batch,
            precision=compute.precision,
        )
        if _exists(loc):
            return  # another replica was first: use its cache
        try:
            loc_.rename_or_copy(tmp, loc, last=(COMMIT_MARKER,))
        except OSError:
            # a local rename onto a folder another replica created meanwhile fails: use theirs
            if not _exists(loc):
                raise
    finally:
        loc_.remove(tmp)
