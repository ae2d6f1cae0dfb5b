"""Completeness markers, fragments and the protocol by which concurrent writers fill a cache.

Nothing in a label cache is taken for complete unless the object saying so exists, and every
such object is written after the data it vouches for (the objects:
:mod:`stkd_dist.serving.cache_layout`):

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
leaves at most objects no reader takes for complete.
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from upath import UPath

from stkd_dist import location as loc_
from stkd_dist.errors import StoreError
from stkd_dist.serving.cache_layout import (
    META_DIR,
    _fill_value,
    _stored_dtype,
    decode_labels,
    encode_labels,
    output_shape,
)
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels

#: serialises the .npz fragment reads of every cache in the process (see _merge_fragments)
_NPZ_LOCK = threading.Lock()

# how often a read-only reader looks again for what others stored of a chunk it misses; a
# writable cache (write-through replicas) looks on every miss, so that no replica computes a
# window another one has stored (see LabelCache)
REFRESH_S = 10.0


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
# a chunk's rows of each array of the cache, by output name, in the stored dtype
_Rows = dict[str, np.ndarray]


@dataclass
class _Partial:
    """Rows of one incomplete chunk known to this process (own writes and others' fragments)."""

    mask: np.ndarray  # [chunk rows] bool
    # every array of the cache: prediction, spread [chunk rows, H, N, C], hidden [chunk rows, N, F]
    arrays: _Rows
    seen: set[str] = field(default_factory=set)  # fragment names already merged

    def put(self, local: np.ndarray, rows: _Rows) -> None:
        for name, out in self.arrays.items():
            out[local] = rows[name]
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


class _ChunkPresence:
    """Which rows of an opened cache are present, and how this process adds rows to it.

    The base of :class:`~stkd_dist.serving.cache.LabelCache`, which sets the attributes below
    when it opens the cache.
    """

    path: UPath
    writable: bool
    window_shape: tuple[int, ...]
    has_spread: bool
    hidden_dim: int
    label_dtype: str
    writer_id: str
    # _lock guards the in-memory state and is never held across storage I/O; _write_lock orders
    # this instance's writes (see LabelCache.__init__)
    _lock: threading.Lock
    _write_lock: threading.RLock
    _splits: dict[str, _Split]
    _names: tuple[str, ...]  # the arrays of each split (cache_layout.output_names)
    _memory: dict[str, NumpyLabels]  # split -> every array of it, float32, in RAM
    _fragment_seq: int
    refresh_s: float  # how long a missed chunk is not looked at again

    # -- what is present -----------------------------------------------------------------------
    def _scan(self, s: _Split) -> None:
        """Read the split's markers and fragments from the store."""
        done = np.zeros(s.n_chunks, dtype=bool)
        for entry in _listdir(self.path / META_DIR / "done" / s.name):
            if entry.name.isdigit() and int(entry.name) < s.n_chunks:
                done[int(entry.name)] = True
        for adopted in np.flatnonzero(done & ~s.done):
            self._adopt_done(s, int(adopted))
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
        with self._write_lock:  # ordered with the resident copy's read (_ChunkReader._resident)
            data = self._read_chunk_for_memory(s, c)
            with self._lock:
                self._mark_done(s, c)
                self._put_memory(s, s.chunk_slice(c), data)

    def _refresh_missing(self, s: _Split, rows: np.ndarray) -> None:
        """Look again for what other writers stored of the chunks of missing ``rows``: the
        chunk's done marker, else its fragments (for chunks not looked at in ``refresh_s``)."""
        missing = rows[~s.filled[rows]]
        if missing.size == 0:
            return
        now = time.monotonic()
        for c in np.unique(missing // s.chunk_rows):
            due = not s.done[c] and now - s.checked[c] >= self.refresh_s
            # rows another replica computed are read, not computed again: they may sit in its
            # fragments of a chunk not complete yet
            if due and not self._check_marker(s, int(c)):
                self._merge_fragments(s, int(c))

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
            # one thread at a time: numpy parses each member's .npy header with
            # ast.literal_eval, and CPython before 3.11.8 corrupts its parser state when two
            # threads build ASTs at once (SystemError "AST constructor recursion depth
            # mismatch"); a server's stream threads and its write-behind thread all merge here
            with _NPZ_LOCK, np.load(io.BytesIO(blob), allow_pickle=False) as f:
                local = f["rows"].astype(np.int64)
                # every array of the cache: each fragment holds the rows of all of them
                got = {name: f[name] for name in self._names}
            with self._lock:
                new = ~part.mask[local]
                fresh = {name: a[new] for name, a in got.items()}
                part.put(local[new], fresh)
                part.seen.add(entry.name)
                if new.any():
                    rows = local[new] + s.chunk_slice(c).start
                    s.filled[rows] = True
                    s.partial[c] = part
                    self._put_memory(s, rows, self._decode(fresh))
                full = bool(part.mask.all())
        if full and self.writable:
            # writers that wrote the last rows at the same moment each saw the chunk incomplete
            # and left a fragment: whoever sees them all first writes the whole chunk
            with self._write_lock:
                if not s.done[c]:
                    self._complete_chunk(s, c, part.arrays)
            return None
        return part

    def _new_partial(self, s: _Split, c: int) -> _Partial:
        n = s.chunk_len(c)
        dtype = _stored_dtype(self.label_dtype)
        fill = _fill_value(self.label_dtype)
        return _Partial(
            mask=np.zeros(n, dtype=bool),
            arrays={
                name: np.full(
                    (n, *output_shape(name, self.window_shape, self.hidden_dim)), fill, dtype=dtype
                )
                for name in self._names
            },
        )

    def _stored(self, labels: NumpyLabels, where: str) -> _Rows:
        """The arrays of the cache from float32 ``labels``, in the stored dtype.

        Raises:
            StoreError: ``labels`` lack an output the cache stores (``where`` names the caller).
        """
        given = labels.named()
        missing = [name for name in self._names if name not in given]
        if missing:
            raise StoreError(
                f"the cache stores {', '.join(self._names)}; {where} got no {', '.join(missing)}",
                where=str(self.path),
            )
        return {name: encode_labels(given[name], self.label_dtype) for name in self._names}

    # -- the resident copy ---------------------------------------------------------------------
    def _decode(self, rows: _Rows) -> NumpyLabels:
        """Stored rows back to float32 labels."""
        return LabelArrays.from_named(
            {name: decode_labels(a, self.label_dtype) for name, a in rows.items()}
        )

    def _read_chunk_for_memory(self, s: _Split, c: int) -> NumpyLabels | None:
        """Chunk ``c`` decoded, when the split is held in memory (to copy it in), else None."""
        if s.name not in self._memory:
            return None
        return self._decode({n: np.asarray(a[s.chunk_slice(c)]) for n, a in s.arrays.items()})

    def _put_memory(self, s: _Split, rows: np.ndarray | slice, labels: NumpyLabels | None) -> None:
        """Copy present rows into the resident arrays (call with ``_lock`` held)."""
        held = self._memory.get(s.name)
        if held is None or labels is None:
            return
        given = labels.named()
        for name, out in held.named().items():
            out[rows] = given[name]

    # -- writes --------------------------------------------------------------------------------
    def write(self, indices: np.ndarray, labels: NumpyLabels) -> int:
        """Store the labels of windows ``indices`` (any split); returns the rows newly stored.

        ``labels`` must hold every output the cache stores (the hidden states of a cache created
        with them); outputs it does not store are dropped. Windows of splits the cache does not
        hold, and windows already present, are skipped. A chunk that these rows complete (with
        the rows of earlier writes and of other writers' fragments) is written whole, then
        marked done; other rows go to a new fragment object.
        """
        if not self.writable:
            raise StoreError("the label cache is opened read-only", where=str(self.path))
        idx = np.asarray(indices, dtype=np.int64)
        stored = self._stored(labels, "a write")
        written = 0
        with self._write_lock, loc_.storage_errors(self.path):
            for s in self._splits.values():
                pos = s.positions(idx)
                sel = np.flatnonzero(pos >= 0)
                if sel.size == 0:
                    continue
                rows, first = np.unique(pos[sel], return_index=True)
                sel = sel[first]
                chunk_of = rows // s.chunk_rows
                for c in np.unique(chunk_of):
                    m = sel[chunk_of == c]
                    local = rows[chunk_of == c] - int(c) * s.chunk_rows
                    written += self._write_rows(
                        s, int(c), local, {name: a[m] for name, a in stored.items()}
                    )
        return written

    def _write_rows(self, s: _Split, c: int, local: np.ndarray, rows: _Rows) -> int:
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
        local = local[new]
        rows = {name: a[new] for name, a in rows.items()}
        if complete:
            full = {name: part.arrays[name].copy() for name in rows}
            for name, a in rows.items():
                full[name][local] = a
            self._complete_chunk(s, c, full)
        else:
            name = self._write_fragment(s, c, local, rows)
            with self._lock:
                part.put(local, rows)
                part.seen.add(name)
                present = local + s.chunk_slice(c).start
                s.filled[present] = True
                s.partial[c] = part
                self._put_memory(s, present, self._decode(rows))
        return int(local.size)

    def _complete_chunk(self, s: _Split, c: int, rows: _Rows) -> None:
        """Write chunk ``c`` whole and its marker, then drop its fragments."""
        self._store_chunk(s, c, rows)
        # the marker exists now: the fragments are redundant (readers that listed them and find
        # them gone look for the marker)
        loc_.remove(self._fragments(s, c))
        with self._lock:
            self._mark_done(s, c)
            self._put_memory(s, s.chunk_slice(c), self._decode(rows))

    def _write_fragment(self, s: _Split, c: int, local: np.ndarray, rows: _Rows) -> str:
        """One new object holding rows ``local`` of chunk ``c`` (every array); returns its name."""
        self._fragment_seq += 1
        name = f"{self.writer_id}-{self._fragment_seq:08d}.npz"
        buf = io.BytesIO()
        arrays: dict[str, Any] = {"rows": local.astype(np.int32), **rows}
        np.savez(buf, **arrays)
        loc_.write_bytes_atomic(self._fragments(s, c) / name, buf.getvalue())
        return name

    def write_chunk(self, split: str, chunk: int, labels: NumpyLabels) -> None:
        """Store every row of chunk ``chunk`` of ``split`` (float32 labels, every output the
        cache stores) and mark it done.

        The fill (:func:`~stkd_dist.serving.precompute.precompute_labels`) gives each chunk to
        exactly one worker, which writes it with this.
        """
        s = self._splits[split]
        n = s.chunk_len(chunk)
        sizes = {len(a) for a in labels.named().values()}
        if sizes != {n}:
            raise ValueError(f"chunk {chunk} of {split} has {n} rows, got {sorted(sizes)}")
        rows = self._stored(labels, f"chunk {chunk} of {split}")
        with self._write_lock, loc_.storage_errors(self.path):
            self._store_chunk(s, chunk, rows)
            with self._lock:
                self._mark_done(s, chunk)
                self._put_memory(s, s.chunk_slice(chunk), self._decode(rows))

    def _store_chunk(self, s: _Split, c: int, rows: _Rows) -> None:
        """Write chunk ``c`` whole (stored dtype, every array), then its marker.

        Each array write covers exactly one whole chunk, so Zarr encodes it and stores it as
        one object without reading the old one (one PUT, or a rename on a local disk): a reader
        sees the old object or the new, and two writers of the same chunk never mix.
        """
        sl = s.chunk_slice(c)
        for name in self._names:
            s.arrays[name][sl] = rows[name]
        # the marker after the data: a crash in between leaves a chunk nobody counts
        loc_.write_json_atomic(self._marker(s, c), {"rows": sl.stop - sl.start})
