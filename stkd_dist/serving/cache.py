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
* :mod:`~stkd_dist.serving.cache_state`: its counts, and the checks against a teacher;
* this module: opening and creating a cache, and its splits.

Changing the cache's splits (:meth:`LabelCache.add_split`) is the only operation that rewrites
shared metadata: do it from one process.

Hidden states: a cache created with ``hidden=True`` also stores the teacher's hidden
representation ``[windows, N, F]`` of every window (its ``hidden_dim`` attribute is F), for
students trained with ``distill.loss: hint``; every write to it must then bring them. Caches made
without them (and those made before hidden states existed) have ``hidden_dim`` 0, and a read of
hidden states from them is an error naming what to do.
"""

from __future__ import annotations

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
from stkd_dist.location import PathInput, location, url
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
    _check_setting,
    _create_split,
    _stored_dtype,
    chunk_amplification,
    compute_attrs,
    decode_labels,
    default_cache_path,
    encode_labels,
    output_names,
    output_shape,
    plan_chunk_rows,
    rows_per_chunk,
    stored_compute,
)
from stkd_dist.serving.cache_layout import _block_rows as _block_rows  # tests of the chunk plan
from stkd_dist.serving.cache_markers import REFRESH_S, _exists, _Split, _writer_id
from stkd_dist.serving.cache_reader import CHUNK_CACHE_BYTES, SERVE_MEMORY_BYTES
from stkd_dist.serving.cache_state import _CacheState
from stkd_dist.serving.forward import DEFAULT_MICRO_BATCH, ComputeSettings
from stkd_dist.serving.label_arrays import NumpyLabels
from stkd_dist.serving.teacher import TeacherMeta
from stkd_dist.storage.chunks import ZarrMode, member_array, member_group

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
    "chunk_amplification",
    "decode_labels",
    "default_cache_path",
    "encode_labels",
    "open_cache",
    "plan_chunk_rows",
    "rows_per_chunk",
]


class LabelCache(_CacheState):
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
        path: PathInput,
        mode: ZarrMode = "r",
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
            attrs: dict[str, Any] = dict(self.group.attrs)
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
        # F of the stored hidden states; 0 (or absent: caches older than hidden states): none
        self.hidden_dim = int(attrs.get("hidden_dim") or 0)
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
        self._names = output_names(self.has_spread, self.hidden_dim)
        # _lock guards the in-memory state (present rows, partial chunks, resident copies, LRU)
        # and is never held across storage I/O, so lookups from the serving threads go on while
        # a write is uploading. _write_lock orders this instance's writes (one at a time).
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._splits: dict[str, _Split] = {}
        self._memory: dict[str, NumpyLabels] = {}  # split -> every array of it, float32, in RAM
        self._on_disk: set[str] = set()  # splits too large to hold
        self._lru: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._lru_bytes = 0
        self._forward = 0
        self._fragment_seq = 0
        for split, r in attrs["splits"].items():
            self._open_split(split, r)
        # one window's row of every array, as stored
        row = _stored_dtype(self.label_dtype).itemsize * sum(
            int(np.prod(output_shape(n, self.window_shape, self.hidden_dim))) for n in self._names
        )
        largest = max((s.block_rows + 2 * s.chunk_rows for s in self._splits.values()), default=0)
        self.chunk_cache_bytes = (
            int(chunk_cache_bytes)
            if chunk_cache_bytes is not None
            else max(CHUNK_CACHE_BYTES, 2 * largest * row)
        )

    def _open_split(self, split: str, r: dict[str, int]) -> None:
        windows = range(int(r["start"]), int(r["stop"]), int(r["step"]))
        group = member_group(self.group, split, url(self.path))
        assert group is not None, split  # listed in the attributes, created with them
        arrays = {name: member_array(group, name, url(self.path)) for name in self._names}
        chunk_rows = int(r.get("chunk_rows") or arrays["prediction"].chunks[0])
        n_chunks = -(-len(windows) // chunk_rows)
        s = _Split(
            name=split,
            windows=windows,
            chunk_rows=chunk_rows,
            block_rows=int(r.get("block_rows", chunk_rows)),
            arrays=arrays,
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
        path: PathInput,
        meta: TeacherMeta,
        splits: Sequence[str],
        *,
        codec: str = DEFAULT_CODEC,
        label_dtype: str = DEFAULT_LABEL_DTYPE,
        chunk_steps: int | None = None,
        label_device: str = "cpu",
        micro_batch: int = DEFAULT_MICRO_BATCH,
        precision: str = "fp32",
        hidden: bool = False,
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
            hidden: also store the teacher's hidden states ``[windows, N, F]`` (F is
                ``meta.hidden_dim``), for hint distillation.

        The commit marker is written last: until then no reader opens the folder.

        Raises:
            StoreError: an unknown codec or label dtype, or ``hidden`` for a teacher whose hidden
                width is unknown.
        """
        _check_setting(codec, CODECS, "codec")
        _check_setting(label_dtype, LABEL_DTYPES, "label_dtype")
        if hidden and not meta.hidden_dim:
            raise StoreError(
                f"teacher {meta.version}'s hidden width is unknown: cannot store its hidden states",
                where="hidden",
            )
        hidden_dim = int(meta.hidden_dim) if hidden else 0
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
                    "hidden_dim": hidden_dim,
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
                    codec, label_dtype, chunk_steps, hidden_dim,
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
            self.label_dtype, self._attrs().get("chunk_steps"), self.hidden_dim,
        )  # fmt: skip
        self._open_split(split, self._attrs()["splits"][split])

    def _attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)


def open_cache(
    path: PathInput,
    meta: TeacherMeta,
    writable: bool = False,
    memory_bytes: int = 0,
    *,
    chunk_steps: int | None = None,
    compute: ComputeSettings | None = None,
    hidden: bool = False,
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
    (:meth:`LabelCache.check_compute`). ``hidden``: a cache created here also stores the
    teacher's hidden states (an existing cache keeps what it stores).
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
        _create_shared(loc, meta, chunk_steps, compute, hidden)
    cache = LabelCache(loc, mode="r+" if writable else "r", memory_bytes=memory_bytes)
    cache.check_matches(meta)
    if writable:
        for split, windows in meta.splits.items():
            if split not in cache.ranges and len(windows):
                cache.add_split(split, windows)
    return cache


def _create_shared(
    loc: UPath,
    meta: TeacherMeta,
    chunk_steps: int | None,
    compute: ComputeSettings,
    hidden: bool = False,
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
            hidden=hidden,
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
