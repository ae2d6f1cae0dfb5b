"""The soft-label cache: a teacher's outputs stored in Zarr, chunked the way ranks read them.

Layout (one Zarr v3 group per teacher version and dataset; a local folder or an object-store
prefix such as ``s3://bucket/labels/…``)::

    <cache>/                              group attributes: schema, teacher, dataset, settings
      <split>/prediction                  [windows of split, H, N, C_out], ``chunk_rows`` windows
      <split>/spread                      per chunk, compressed (teachers with spread only)
      _stkd/commit.json                   written last when the cache is created
      _stkd/done/<split>/<chunk>          one per chunk whose rows are all written
      _stkd/rows/<split>/<chunk>/<id>.npz rows of a chunk not yet complete (write-through)
      _stkd/forward/<writer>.json         windows the teacher ran on, one object per writer

Row ``i`` of a split holds window ``split_start + i * stride``. Root attributes record the schema
version, the dataset fingerprint, the teacher version and its validation MAE (``val_mae``), the
label shape, the codec and ``label_dtype`` (``float32``, the default, keeps labels bitwise equal to
a live forward pass; ``float16`` and ``bfloat16`` halve the bytes; reads always return float32),
and each split's window range and chunk rows.

Chunks follow the shard plan (:mod:`stkd_dist.data.plan`): ranks read chunk-aligned blocks of
contiguous windows, shuffled only within a block, so the chunk rows are chosen
(:func:`plan_chunk_rows`) such that the chunks overlapping the plan's blocks hold at most
:data:`DESIGN_AMPLIFICATION` times the rows of the blocks, for world sizes up to
``max(PLAN_WORLD_SIZES)``. A reader keeps the chunks it fetched in a small LRU, so a shuffled
epoch fetches each chunk of a block once.

Completeness and concurrency. Nothing here is taken for complete unless the object saying so
exists, and every such object is written after the data it vouches for:

* a folder without ``_stkd/commit.json`` is no label cache (its creation did not finish);
* a chunk's rows count as present only once its ``done`` marker exists; the marker is written
  after the chunk's data objects, and each data object is one whole chunk written by one writer
  in one atomic write (one PUT on an object store, a rename on a local disk);
* rows of a chunk that is not complete yet (write-through serving) are written as a fragment: one
  new object per write, named by its writer, so writers never touch each other's objects. A writer
  that has (from its own and the other writers' fragments) every row of a chunk writes the whole
  chunk, then its marker, then deletes the fragments. Two writers completing the same chunk write
  the same rows; either object is whole.

So several serving replicas may fill one cache at once (write-through), and a crashed writer
leaves at most objects no reader takes for complete. Changing the cache's splits
(:meth:`LabelCache.add_split`) is the only operation that rewrites shared metadata: do it from
one process.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from upath import UPath

from stkd_dist import location as loc_
from stkd_dist.data.plan import make_blocks
from stkd_dist.errors import StoreError
from stkd_dist.location import location
from stkd_dist.paths import storage_root
from stkd_dist.serving.teacher import TeacherMeta, safe_version

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str] | UPath

CACHE_SCHEMA_ATTR = "stkd_label_cache_version"
CACHE_SCHEMA_VERSION = 2
COMMIT_MARKER = "_stkd/commit.json"
META_DIR = "_stkd"
# Rows per chunk: at most about this many bytes of float32 labels per chunk object, and at
# least this many (below it the cost of an object, a request, outweighs what it saves in reads).
TARGET_CHUNK_BYTES = 4 * 2**20
MIN_CHUNK_BYTES = 4 * 2**10
# kept for callers of schema 1; the ``filled`` flags are gone (see the module docstring)
FILLED_CHUNK = 65536
# labels `stkd serve` holds in memory per cache by default (see LabelCache, --cache-memory-mb)
SERVE_MEMORY_BYTES = 2 * 2**30
# world sizes the chunk rows are chosen for (plan_chunk_rows), and the amplification allowed
PLAN_WORLD_SIZES = (1, 2, 4, 8)
DESIGN_AMPLIFICATION = 1.25
# decoded chunks a reader keeps (bytes, at least two of the largest blocks; see LabelCache)
CHUNK_CACHE_BYTES = 64 * 2**20
# how often a reader looks again for the marker of a chunk it misses (write-through replicas)
REFRESH_S = 10.0

LABEL_DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("blosc-zstd", "zstd", "none")
DEFAULT_CODEC = "blosc-zstd"
DEFAULT_LABEL_DTYPE = "float32"
_BF16_NAN = np.uint16(0x7FC0)

Labels = tuple[np.ndarray, np.ndarray | None]


def default_cache_path(
    fingerprint: str, version: str, storage: str | os.PathLike[str] | None = None
) -> UPath:
    """``<storage>/labels/<fingerprint>/<teacher version>.zarr``."""
    root = location(storage_root(storage))
    return root / "labels" / fingerprint / f"{safe_version(version)}.zarr"


# -- stored dtypes and codecs ------------------------------------------------------------------
def _stored_dtype(label_dtype: str) -> np.dtype:
    """The numpy dtype of the Zarr arrays: bfloat16 is kept as its 16 bits (Zarr has no bf16)."""
    return np.dtype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[label_dtype]
    )


def _fill_value(label_dtype: str) -> Any:
    return int(_BF16_NAN) if label_dtype == "bfloat16" else np.nan


def encode_labels(values: np.ndarray, label_dtype: str) -> np.ndarray:
    """Float32 labels as stored: unchanged, float16, or bfloat16 bits (round to nearest even)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if label_dtype == "float32":
        return v
    if label_dtype == "float16":
        return v.astype(np.float16)
    bits = v.view(np.uint32).astype(np.uint64)  # 64 bits: the rounding carry must not wrap
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(v), _BF16_NAN, rounded)


def decode_labels(stored: np.ndarray, label_dtype: str) -> np.ndarray:
    """Stored labels back to float32 (a copy unless they are float32 already)."""
    if label_dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored, dtype=np.float32)


def _compressors(codec: str) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec == "none":
        return None
    if codec == "zstd":
        return (ZstdCodec(level=3),)
    if codec == "blosc-zstd":
        # byte shuffle first: the high bytes of neighbouring floats compress, the low ones not
        return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),)
    raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}", where="codec")


def _check_setting(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise StoreError(
            f"unknown {what} {value!r}; choose one of {', '.join(allowed)}", where=what
        )
    return value


# -- chunking ----------------------------------------------------------------------------------
def rows_per_chunk(window_shape: tuple[int, ...], n_rows: int) -> int:
    """Rows of a chunk by size alone: about :data:`TARGET_CHUNK_BYTES` each, at most ``n_rows``."""
    row_bytes = int(np.prod(window_shape)) * 4
    return max(1, min(n_rows, TARGET_CHUNK_BYTES // max(row_bytes, 1)))


def _block_rows(windows: range, chunk_steps: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first row, rows)`` of each block of the shard plan for ``world`` ranks."""
    blocks = make_blocks(windows, chunk_steps, 4 * world)
    first = np.array([(b.start - windows.start) // windows.step for b in blocks], dtype=np.int64)
    return first, np.array([len(b) for b in blocks], dtype=np.int64)


def chunk_amplification(first: np.ndarray, rows: np.ndarray, chunk_rows: int, n_rows: int) -> float:
    """Rows of the chunks overlapping each block, summed, per row of the blocks.

    This is the read amplification of a reader that fetches each chunk of a block once.
    """
    lo = first // chunk_rows
    hi = (first + rows - 1) // chunk_rows + 1
    fetched = np.minimum(hi * chunk_rows, n_rows) - lo * chunk_rows
    return float(fetched.sum() / max(int(rows.sum()), 1))


def plan_chunk_rows(
    windows: range,
    chunk_steps: int,
    row_bytes: int,
    *,
    target_bytes: int = TARGET_CHUNK_BYTES,
    min_bytes: int = MIN_CHUNK_BYTES,
    world_sizes: Iterable[int] = PLAN_WORLD_SIZES,
    max_amplification: float = DESIGN_AMPLIFICATION,
) -> int:
    """Chunk rows for ``windows`` read through shard plans of a store chunked ``chunk_steps``.

    The largest number of rows (between ``min_bytes`` and ``target_bytes`` of float32 labels)
    for which the chunks overlapping every plan block hold at most ``max_amplification`` times
    the block's rows, for each world size in ``world_sizes``; when no size reaches that (tiny
    splits), the size with the least amplification. Sizes that divide the store chunks' block
    boundaries (no chunk straddles two such blocks) are among the candidates.
    """
    n = len(windows)
    cap = max(1, min(n, target_bytes // max(row_bytes, 1)))
    floor = max(1, min(cap, -(-min_bytes // max(row_bytes, 1))))
    layouts = [_block_rows(windows, chunk_steps, w) for w in world_sizes if n >= w]
    if not layouts:
        return cap
    # the boundaries every plan shares: the store chunks' (sub-blocks add their own)
    starts = np.unique(np.concatenate([f for f, _ in layouts]))
    g = int(np.gcd.reduce(starts[starts > 0])) if (starts > 0).any() else 0
    candidates = {cap, floor}
    if g:
        candidates.update(d for d in _divisors(g) if floor <= d <= cap)
    r = float(cap)
    while r >= floor:  # a geometric ladder down from the cap: few candidates, none far from best
        candidates.add(int(r))
        r *= 0.95
    worst = {
        rows: max(chunk_amplification(f, c, rows, n) for f, c in layouts)
        for rows in candidates
        if rows >= floor
    }
    fits = [rows for rows, amp in worst.items() if amp <= max_amplification]
    if fits:
        return max(fits)
    return min(worst, key=lambda rows: (worst[rows], -rows))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _range_attr(r: range, chunk_rows: int, block_rows: int) -> dict[str, int]:
    return {
        "start": r.start,
        "stop": r.stop,
        "step": r.step,
        "windows": len(r),
        "chunk_rows": chunk_rows,
        "block_rows": block_rows,
    }


# -- object-store listings ---------------------------------------------------------------------
def _fresh(loc: UPath) -> UPath:
    """``loc`` with fsspec's cached listing of it and its folder dropped.

    fsspec caches listings of object stores per process; markers and fragments are written by
    other processes, so every look for them must ask the store again.
    """
    if loc_.is_remote(loc):
        loc.fs.invalidate_cache(loc.path)
    return loc


def _listdir(loc: UPath) -> list[UPath]:
    """The entries of folder ``loc``, asking the store again; empty when it does not exist."""
    # look first: location.listdir retries a missing folder as a transient error when its path
    # happens to contain "500"…"504" (random temporary names do), sleeping seconds each time
    if not _exists(loc):
        return []
    return loc_.listdir(loc)


def _exists(loc: UPath) -> bool:
    _fresh(loc.parent)
    return loc_.exists(_fresh(loc))


def _writer_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- per-split state ---------------------------------------------------------------------------
@dataclass
class _Partial:
    """Rows of one incomplete chunk known to this process (own writes and others' fragments)."""

    mask: np.ndarray  # [chunk rows] bool
    prediction: np.ndarray  # [chunk rows, H, N, C] stored dtype
    spread: np.ndarray | None
    seen: set[str] = field(default_factory=set)  # fragment names already merged

    def put(self, local: np.ndarray, pred: np.ndarray, spread: np.ndarray | None) -> None:
        self.prediction[local] = pred
        if self.spread is not None and spread is not None:
            self.spread[local] = spread
        self.mask[local] = True


@dataclass
class _Split:
    """One split: its windows, chunking, arrays and what of it is present."""

    name: str
    windows: range
    chunk_rows: int
    block_rows: int
    arrays: dict[str, zarr.Array]
    done: np.ndarray  # [chunks] bool: marker seen
    filled: np.ndarray  # [windows] bool: row present (done chunk or fragment)
    checked: np.ndarray  # [chunks] float: monotonic time of the last look for the marker
    partial: dict[int, _Partial] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.windows)

    @property
    def n_chunks(self) -> int:
        return len(self.done)

    def chunk_slice(self, c: int) -> slice:
        lo = c * self.chunk_rows
        return slice(lo, min(lo + self.chunk_rows, self.n))

    def chunk_len(self, c: int) -> int:
        s = self.chunk_slice(c)
        return s.stop - s.start

    def positions(self, indices: np.ndarray) -> np.ndarray:
        """Rows of windows ``indices``; -1 where a window is not in the split."""
        r = self.windows
        if len(r) == 0:
            return np.full(indices.shape, -1, dtype=np.int64)
        off = indices - r.start
        pos = off // r.step
        ok = (off >= 0) & (off % r.step == 0) & (pos < len(r))
        return np.where(ok, pos, -1)


class LabelCache:
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
        self.label_device = str(attrs.get("label_device", "cpu"))
        # the teacher's validation MAE (None for caches written before it was recorded)
        self.val_mae: float | None = attrs.get("val_mae")
        self.writer_id = _writer_id()
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

    # -- what is present -----------------------------------------------------------------------
    def _scan(self, s: _Split) -> None:
        """Read the split's markers and fragments from the store."""
        done = np.zeros(s.n_chunks, dtype=bool)
        for entry in _listdir(self.path / META_DIR / "done" / s.name):
            if entry.name.isdigit() and int(entry.name) < s.n_chunks:
                done[int(entry.name)] = True
        for c in np.flatnonzero(done & ~s.done):
            self._adopt_done(s, int(c))
        for entry in _listdir(self.path / META_DIR / "rows" / s.name):
            if not entry.name.isdigit() or int(entry.name) >= s.n_chunks:
                continue
            c = int(entry.name)
            if s.done[c]:
                if self.writable:  # fragments of a complete chunk are left over: tidy up
                    loc_.remove(entry)
                continue
            self._merge_fragments(s, c)

    def _mark_done(self, s: _Split, c: int) -> None:
        """Chunk ``c``'s marker exists (call with ``_lock`` held)."""
        s.done[c] = True
        s.filled[s.chunk_slice(c)] = True
        s.partial.pop(c, None)
        s.checked[c] = time.monotonic()

    def _marker(self, s: _Split, c: int) -> UPath:
        return self.path / META_DIR / "done" / s.name / str(c)

    def _fragments(self, s: _Split, c: int) -> UPath:
        return self.path / META_DIR / "rows" / s.name / str(c)

    def _check_marker(self, s: _Split, c: int) -> bool:
        """Whether chunk ``c`` is complete, asking the store when not known (another writer)."""
        if s.done[c]:
            return True
        if not _exists(self._marker(s, c)):
            s.checked[c] = time.monotonic()
            return False
        self._adopt_done(s, c)
        return True

    def _adopt_done(self, s: _Split, c: int) -> None:
        """Take chunk ``c`` for complete (its marker exists), copying it into memory if held."""
        with self._write_lock:  # ordered with the resident copy being read (see _resident)
            data = self._read_chunk_for_memory(s, c)
            with self._lock:
                self._mark_done(s, c)
                self._put_memory(s, s.chunk_slice(c), data)

    def _refresh_missing(self, s: _Split, rows: np.ndarray) -> None:
        """Look for markers of the chunks of missing ``rows`` not looked for in a while."""
        missing = rows[~s.filled[rows]]
        if missing.size == 0:
            return
        now = time.monotonic()
        for c in np.unique(missing // s.chunk_rows):
            if not s.done[c] and now - s.checked[c] >= REFRESH_S:
                self._check_marker(s, int(c))

    def refresh(self) -> None:
        """Read again which chunks and rows other writers have completed."""
        for s in self._splits.values():
            self._scan(s)

    def _merge_fragments(self, s: _Split, c: int) -> _Partial | None:
        """Merge the fragments of chunk ``c`` not merged yet; None when the chunk is complete."""
        part = s.partial.get(c) or self._new_partial(s, c)
        full = False
        for entry in _listdir(self._fragments(s, c)):
            if entry.name in part.seen or not entry.name.endswith(".npz"):
                continue
            try:
                blob = loc_.read_bytes(entry)
            except FileNotFoundError:
                # a writer completed the chunk and deleted its fragments after its marker
                if self._check_marker(s, c):
                    return None
                continue
            with np.load(io.BytesIO(blob)) as f:
                local = f["rows"].astype(np.int64)
                pred = f["prediction"]
                spread = f["spread"] if "spread" in f.files else None
            with self._lock:
                new = ~part.mask[local]
                part.put(local[new], pred[new], None if spread is None else spread[new])
                part.seen.add(entry.name)
                if new.any():
                    rows = local[new] + s.chunk_slice(c).start
                    s.filled[rows] = True
                    s.partial[c] = part
                    self._put_memory(s, rows, self._decode_pair(pred[new], spread, new))
                full = bool(part.mask.all())
        if full and self.writable:
            # writers that wrote the last rows at the same moment each saw the chunk incomplete
            # and left a fragment: whoever sees them all first writes the whole chunk
            with self._write_lock:
                if not s.done[c]:
                    self._complete_chunk(s, c, part.prediction, part.spread)
            return None
        return part

    def _new_partial(self, s: _Split, c: int) -> _Partial:
        n = s.chunk_len(c)
        dtype = _stored_dtype(self.label_dtype)
        fill = _fill_value(self.label_dtype)
        return _Partial(
            mask=np.zeros(n, dtype=bool),
            prediction=np.full((n, *self.window_shape), fill, dtype=dtype),
            spread=np.full((n, *self.window_shape), fill, dtype=dtype) if self.has_spread else None,
        )

    def _decode_pair(
        self, pred: np.ndarray, spread: np.ndarray | None, sel: np.ndarray | None = None
    ) -> Labels:
        p = decode_labels(pred, self.label_dtype)
        if spread is None:
            return p, None
        sp = spread if sel is None else spread[sel]
        return p, decode_labels(sp, self.label_dtype)

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
    ) -> LabelCache:
        """Create an empty cache for teacher ``meta`` holding ``splits`` (replaces ``path``).

        Args:
            codec: the compressor of the label chunks (one of :data:`CODECS`).
            label_dtype: how labels are stored (one of :data:`LABEL_DTYPES`).
            chunk_steps: the time-chunk length of the teacher's store; chunks then follow its
                shard plans (:func:`plan_chunk_rows`). None chunks by size alone.
            label_device: where the labels are computed (recorded: a GPU's labels are not
                bitwise a CPU server's).

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
                    "label_device": label_device,
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

    # -- reads ---------------------------------------------------------------------------------
    def lookup(
        self, split: str, indices: np.ndarray, *, with_spread: bool = True
    ) -> tuple[np.ndarray, Labels | None]:
        """Labels of the cached windows among ``indices``.

        Returns ``(hit, labels)``: ``hit`` ``[n]`` bool marks the windows found, ``labels`` holds
        ``(prediction, spread)`` float32 of those windows in order (None when there is no hit;
        spread None unless the teacher has one and ``with_spread``, which skips reading it).
        """
        idx = np.asarray(indices, dtype=np.int64)
        s = self._splits.get(split)
        if s is None:
            return np.zeros(idx.shape, dtype=bool), None
        pos = s.positions(idx)
        hit = pos >= 0
        if not hit.any():
            return hit, None
        self._refresh_missing(s, pos[hit])
        resident = self._resident(s)
        spread_wanted = with_spread and self.has_spread
        with self._lock:
            hit[hit] = s.filled[pos[hit]]
            if not hit.any():
                return hit, None
            rows = pos[hit]
            if resident is not None:
                # present rows are never rewritten (writers only add missing rows), so a view
                # into the resident arrays stays valid while it is being sent
                sp = _take(resident[1], rows) if spread_wanted and resident[1] is not None else None
                return hit, (_take(resident[0], rows), sp)
            chunk_of = rows // s.chunk_rows
            chunks = np.unique(chunk_of)
            # partial chunks' buffers only ever gain rows: reading them after the lock is safe
            sources = {int(c): (bool(s.done[c]), s.partial.get(int(c))) for c in chunks}
        pred = np.empty((len(rows), *self.window_shape), dtype=np.float32)
        spread = np.empty_like(pred) if spread_wanted else None
        for c in chunks:
            m = chunk_of == c
            local = rows[m] - int(c) * s.chunk_rows
            done, part = sources[int(c)]
            for name, out in (("prediction", pred), ("spread", spread)):
                if out is None:
                    continue
                if done:
                    data = self._chunk(s, name, int(c))
                else:
                    assert part is not None, "a present row is in a done chunk or a partial one"
                    data = part.prediction if name == "prediction" else part.spread
                    assert data is not None
                out[m] = decode_labels(data[local], self.label_dtype)
        return hit, (pred, spread)

    def read_split(self, split: str, *, with_spread: bool = True) -> Labels:
        """All labels of ``split`` as float32 ``[windows, H, N, C]`` (NaN where not present)."""
        s = self._splits[split]
        names = [n for n in self._names if n == "prediction" or with_spread]
        out = {n: decode_labels(np.asarray(s.arrays[n][...]), self.label_dtype) for n in names}
        with self._lock:
            parts = list(s.partial.items())
            missing = ~s.filled
        for c, part in parts:
            sl = s.chunk_slice(c)
            for n, arr in out.items():
                data = part.prediction if n == "prediction" else part.spread
                assert data is not None
                rows = np.flatnonzero(part.mask)
                arr[sl][rows] = decode_labels(data[rows], self.label_dtype)
        for arr in out.values():
            arr[missing] = np.nan  # rows of unfinished chunks are not labels yet
        return out["prediction"], out.get("spread")

    def _chunk(self, s: _Split, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of array ``name`` as stored, from the LRU or fetched whole."""
        key = (s.name, name, c)
        with self._lock:
            data = self._lru.get(key)
            if data is not None:
                self._lru.move_to_end(key)
                return data
        # fetched outside the lock: other lookups go on meanwhile (two threads may fetch the same
        # chunk at once; both get the same bytes)
        data = np.asarray(s.arrays[name][s.chunk_slice(c)])
        with self._lock:
            if key not in self._lru:
                self._lru[key] = data
                self._lru_bytes += data.nbytes
            while self._lru_bytes > self.chunk_cache_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes
        return data

    def _resident(self, s: _Split) -> Labels | None:
        """The labels of ``s`` in memory (read on first use), or None when too large."""
        held = self._memory.get(s.name)
        if held is not None or s.name in self._on_disk:
            return held
        size = s.n * int(np.prod(self.window_shape)) * 4 * len(self._names)
        # the write lock keeps this process's writes and marker discoveries out while the split
        # is read and published, so no row becomes present in between and is missed
        with self._write_lock:
            with self._lock:
                if s.name in self._memory or s.name in self._on_disk:
                    return self._memory.get(s.name)
                used = sum(
                    p.nbytes + (0 if sp is None else sp.nbytes) for p, sp in self._memory.values()
                )
                if used + size > self.memory_bytes:
                    self._on_disk.add(s.name)
                    log.info(
                        "label cache %s: split %s (%d bytes) read from the store",
                        self.path, s.name, size,
                    )  # fmt: skip
                    return None
            labels = self.read_split(s.name)
            with self._lock:
                self._memory[s.name] = labels
        return labels

    def _read_chunk_for_memory(self, s: _Split, c: int) -> Labels | None:
        """Chunk ``c`` decoded, when the split is held in memory (to copy it in), else None."""
        if s.name not in self._memory:
            return None
        data = {n: np.asarray(a[s.chunk_slice(c)]) for n, a in s.arrays.items()}
        return self._decode_pair(data["prediction"], data.get("spread"))

    def _put_memory(self, s: _Split, rows: np.ndarray | slice, labels: Labels | None) -> None:
        """Copy present rows into the resident arrays (call with ``_lock`` held)."""
        held = self._memory.get(s.name)
        if held is None or labels is None:
            return
        held[0][rows] = labels[0]
        if held[1] is not None and labels[1] is not None:
            held[1][rows] = labels[1]

    # -- writes --------------------------------------------------------------------------------
    def write(self, indices: np.ndarray, prediction: np.ndarray, spread: np.ndarray | None) -> int:
        """Store the labels of windows ``indices`` (any split); returns the rows newly stored.

        Windows of splits the cache does not hold, and windows already present, are skipped.
        A chunk that these rows complete (with the rows of earlier writes and of other writers'
        fragments) is written whole, then marked done; other rows go to a new fragment object.
        """
        if not self.writable:
            raise StoreError("the label cache is opened read-only", where=str(self.path))
        idx = np.asarray(indices, dtype=np.int64)
        written = 0
        with self._write_lock, loc_.storage_errors(self.path):
            for s in self._splits.values():
                pos = s.positions(idx)
                sel = np.flatnonzero(pos >= 0)
                if sel.size == 0:
                    continue
                rows, first = np.unique(pos[sel], return_index=True)
                sel = sel[first]
                pred = encode_labels(prediction[sel], self.label_dtype)
                if self.has_spread:
                    assert spread is not None, "a teacher with spread returns it"
                    sp: np.ndarray | None = encode_labels(spread[sel], self.label_dtype)
                else:
                    sp = None
                chunk_of = rows // s.chunk_rows
                for c in np.unique(chunk_of):
                    m = chunk_of == c
                    written += self._write_rows(
                        s, int(c), rows[m] - int(c) * s.chunk_rows, pred[m],
                        None if sp is None else sp[m],
                    )  # fmt: skip
        return written

    def _write_rows(
        self, s: _Split, c: int, local: np.ndarray, pred: np.ndarray, spread: np.ndarray | None
    ) -> int:
        """Add rows ``local`` (stored dtype) of chunk ``c``; returns how many were new."""
        if self._check_marker(s, c):
            return 0
        # other writers' rows of this chunk first: together they may complete it
        part = self._merge_fragments(s, c)
        if part is None:
            return 0
        with self._lock:
            new = ~part.mask[local]
            complete = int(part.mask.sum()) + int(new.sum()) == s.chunk_len(c)
        if not new.any():
            return 0
        local, pred = local[new], pred[new]
        spread = None if spread is None else spread[new]
        if complete:
            full_pred = part.prediction.copy()
            full_pred[local] = pred
            full_spread = None
            if part.spread is not None and spread is not None:
                full_spread = part.spread.copy()
                full_spread[local] = spread
            self._complete_chunk(s, c, full_pred, full_spread)
        else:
            name = self._write_fragment(s, c, local, pred, spread)
            with self._lock:
                part.put(local, pred, spread)
                part.seen.add(name)
                rows = local + s.chunk_slice(c).start
                s.filled[rows] = True
                s.partial[c] = part
                self._put_memory(s, rows, self._decode_pair(pred, spread))
        return int(local.size)

    def _complete_chunk(
        self, s: _Split, c: int, pred: np.ndarray, spread: np.ndarray | None
    ) -> None:
        """Write chunk ``c`` whole and its marker, then drop its fragments."""
        self._store_chunk(s, c, pred, spread)
        # the marker exists now: the fragments are redundant (readers that listed them and find
        # them gone look for the marker)
        loc_.remove(self._fragments(s, c))
        with self._lock:
            self._mark_done(s, c)
            self._put_memory(s, s.chunk_slice(c), self._decode_pair(pred, spread))

    def _write_fragment(
        self, s: _Split, c: int, local: np.ndarray, pred: np.ndarray, spread: np.ndarray | None
    ) -> str:
        """One new object holding rows ``local`` of chunk ``c``; returns its name."""
        self._fragment_seq += 1
        name = f"{self.writer_id}-{self._fragment_seq:08d}.npz"
        buf = io.BytesIO()
        arrays = {"rows": local.astype(np.int32), "prediction": pred}
        if spread is not None:
            arrays["spread"] = spread
        np.savez(buf, **arrays)
        loc_.write_bytes_atomic(self._fragments(s, c) / name, buf.getvalue())
        return name

    def write_chunk(
        self, split: str, chunk: int, prediction: np.ndarray, spread: np.ndarray | None
    ) -> None:
        """Store every row of chunk ``chunk`` of ``split`` (float32 labels) and mark it done.

        The fill (:func:`~stkd_dist.serving.precompute.precompute_labels`) gives each chunk to
        exactly one worker, which writes it with this.
        """
        s = self._splits[split]
        n = s.chunk_len(chunk)
        if len(prediction) != n or (spread is not None and len(spread) != n):
            raise ValueError(f"chunk {chunk} of {split} has {n} rows, got {len(prediction)}")
        pred = encode_labels(prediction, self.label_dtype)
        sp = encode_labels(spread, self.label_dtype) if spread is not None else None
        if self.has_spread and sp is None:
            raise ValueError("a teacher with spread returns it")
        with self._write_lock, loc_.storage_errors(self.path):
            self._store_chunk(s, chunk, pred, sp)
            with self._lock:
                self._mark_done(s, chunk)
                self._put_memory(s, s.chunk_slice(chunk), self._decode_pair(pred, sp))

    def _store_chunk(self, s: _Split, c: int, pred: np.ndarray, spread: np.ndarray | None) -> None:
        """Write chunk ``c`` whole (stored dtype), then its marker.

        Each array write covers exactly one whole chunk, so Zarr encodes it and stores it as
        one object without reading the old one (one PUT, or a rename on a local disk): a reader
        sees the old object or the new, and two writers of the same chunk never mix.
        """
        sl = s.chunk_slice(c)
        s.arrays["prediction"][sl] = pred
        if self.has_spread:
            assert spread is not None
            s.arrays["spread"][sl] = spread
        # the marker after the data: a crash in between leaves a chunk nobody counts
        loc_.write_json_atomic(self._marker(s, c), {"rows": sl.stop - sl.start})


def _create_split(
    group: zarr.Group,
    window_shape: tuple[int, ...],
    has_spread: bool,
    split: str,
    windows: range,
    codec: str,
    label_dtype: str,
    chunk_steps: int | None,
) -> None:
    """The empty arrays of ``split`` and its entry in the group's attributes."""
    n = len(windows)
    if n == 0:
        return
    row_bytes = int(np.prod(window_shape)) * 4
    if chunk_steps:
        rows = plan_chunk_rows(windows, int(chunk_steps), row_bytes)
        block = max(int(_block_rows(windows, int(chunk_steps), 1)[1].max()), rows)
    else:
        rows = rows_per_chunk(window_shape, n)
        block = rows
    names = ("prediction", "spread") if has_spread else ("prediction",)
    sub = group.require_group(split)
    for name in names:
        sub.create_array(
            name,
            shape=(n, *window_shape),
            chunks=(rows, *window_shape),
            dtype=_stored_dtype(label_dtype),
            fill_value=_fill_value(label_dtype),
            compressors=_compressors(codec),
            dimension_names=("window", "horizon", "node", "channel"),
            # a chunk equal to the fill value must still be stored: its marker vouches for it
            config={"write_empty_chunks": True},
        )
    splits = dict(group.attrs.get("splits", {}))
    splits[split] = _range_attr(windows, rows, block)
    group.attrs["splits"] = splits


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``: a view when the rows are contiguous and ascending, else a copy."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
        return array[lo:hi]
    return array[rows]


def open_cache(
    path: PathLike,
    meta: TeacherMeta,
    writable: bool = False,
    memory_bytes: int = 0,
    *,
    chunk_steps: int | None = None,
) -> LabelCache:
    """Open the cache at ``path`` for teacher ``meta`` (checked to match).

    With ``writable`` (write-through) a missing cache is created with every split (chunked for
    the shard plans of a store chunked ``chunk_steps`` when given), and splits a cache lacks are
    added; otherwise a missing cache raises :class:`StoreError`. Replicas starting at once may
    both find the cache missing: each builds it under a temporary name, and only the first
    moves into place (the others open it).
    ``memory_bytes``: see :class:`LabelCache`.
    """
    loc = location(path)
    if not _exists(loc):
        if not writable:
            raise StoreError(
                "no label cache here; create one with `stkd precompute-labels` or serve with "
                "--write-through",
                where=str(loc),
            )
        _create_shared(loc, meta, chunk_steps)
    cache = LabelCache(loc, mode="r+" if writable else "r", memory_bytes=memory_bytes)
    cache.check_matches(meta)
    if writable:
        for split, windows in meta.splits.items():
            if split not in cache.ranges and len(windows):
                cache.add_split(split, windows)
    return cache


def _create_shared(loc: UPath, meta: TeacherMeta, chunk_steps: int | None) -> None:
    """Create an empty cache at ``loc`` unless another process does so first."""
    tmp = loc_.temporary_sibling(loc)
    try:
        LabelCache.create(
            tmp, meta, [s for s in meta.splits if len(meta.splits[s])], chunk_steps=chunk_steps
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
