"""Reading a soft-label cache: rows from the resident copy, or whole chunks through an LRU.

A split whose labels fit in the cache's ``memory_bytes`` is read into memory on its first lookup
and kept current as rows become present (:mod:`stkd_dist.serving.cache_markers`); other splits
are read chunk by chunk. A reader keeps the chunks it fetched in a small LRU, so a shuffled epoch
(batches shuffled only within a plan block, see :mod:`stkd_dist.serving.cache_layout`) fetches
each chunk of a block once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from stkd_dist.errors import StoreError
from stkd_dist.serving.cache_layout import decode_labels, output_shape
from stkd_dist.serving.cache_markers import _ChunkPresence, _Split
from stkd_dist.serving.label_arrays import LabelArrays, NumpyLabels, label_bytes

log = logging.getLogger(__name__)

# labels `stkd serve` holds in memory per cache by default (see LabelCache, --cache-memory-mb)
SERVE_MEMORY_BYTES = 2 * 2**30
# decoded chunks a reader keeps (bytes, at least two of the largest blocks; see LabelCache)
CHUNK_CACHE_BYTES = 64 * 2**20


class _ChunkReader(_ChunkPresence):
    """Lookups and whole-split reads of an opened cache (the base of ``LabelCache``)."""

    memory_bytes: int
    chunk_cache_bytes: int
    _names: tuple[str, ...]
    _on_disk: set[str]  # splits too large to hold
    _lru: OrderedDict[tuple[str, str, int], np.ndarray]
    _lru_bytes: int

    def lookup(
        self,
        split: str,
        indices: np.ndarray,
        *,
        with_spread: bool = True,
        with_hidden: bool = False,
    ) -> tuple[np.ndarray, NumpyLabels | None]:
        """Labels of the cached windows among ``indices``.

        Returns ``(hit, labels)``: ``hit`` ``[n]`` bool marks the windows found, ``labels`` holds
        the labels float32 of those windows in order (None when there is no hit): spread unless
        the teacher has none or ``with_spread`` is False (which skips reading it), hidden states
        ``[n, N, F]`` with ``with_hidden``.

        Raises:
            StoreError: ``with_hidden`` on a cache made without hidden states.
        """
        names = self._wanted(with_spread, with_hidden)
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
        with self._lock:
            hit[hit] = s.filled[pos[hit]]
            if not hit.any():
                return hit, None
            rows = pos[hit]
            if resident is not None:
                # present rows are never rewritten (writers only add missing rows), so a view
                # into the resident arrays stays valid while it is being sent
                held = resident.named()
                return hit, LabelArrays.from_named({n: _take(held[n], rows) for n in names})
            chunk_of = rows // s.chunk_rows
            chunks = np.unique(chunk_of)
            # partial chunks' buffers only ever gain rows: reading them after the lock is safe
            sources = {int(c): (bool(s.done[c]), s.partial.get(int(c))) for c in chunks}
        out = {
            n: np.empty(
                (len(rows), *output_shape(n, self.window_shape, self.hidden_dim)), np.float32
            )
            for n in names
        }
        for c in chunks:
            m = chunk_of == c
            local = rows[m] - int(c) * s.chunk_rows
            done, part = sources[int(c)]
            for name, dest in out.items():
                if done:
                    data = self._chunk(s, name, int(c))
                else:
                    assert part is not None, "a present row is in a done chunk or a partial one"
                    data = part.arrays[name]
                dest[m] = decode_labels(data[local], self.label_dtype)
        return hit, LabelArrays.from_named(out)

    def _wanted(self, with_spread: bool, with_hidden: bool) -> list[str]:
        """The arrays a read returns; hidden states from a cache without them are an error."""
        if with_hidden and not self.hidden_dim:
            raise StoreError(
                "this label cache holds no hidden states of the teacher (it was made without "
                "them); recompute it with `stkd precompute-labels --hidden`",
                where=str(self.path),
            )
        return [
            n
            for n in self._names
            if n == "prediction"
            or (n == "spread" and with_spread)
            or (n == "hidden" and with_hidden)
        ]

    def read_split(
        self, split: str, *, with_spread: bool = True, with_hidden: bool = False
    ) -> NumpyLabels:
        """All labels of ``split`` as float32 ``[windows, H, N, C]`` (hidden ``[windows, N, F]``
        with ``with_hidden``; NaN where not present)."""
        s = self._splits[split]
        names = self._wanted(with_spread, with_hidden)
        out = {n: decode_labels(np.asarray(s.arrays[n][...]), self.label_dtype) for n in names}
        with self._lock:
            parts = list(s.partial.items())
            missing = ~s.filled
        for c, part in parts:
            sl = s.chunk_slice(c)
            rows = np.flatnonzero(part.mask)
            for n, arr in out.items():
                arr[sl][rows] = decode_labels(part.arrays[n][rows], self.label_dtype)
        for arr in out.values():
            arr[missing] = np.nan  # rows of unfinished chunks are not labels yet
        return LabelArrays.from_named(out)

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

    def _resident(self, s: _Split) -> NumpyLabels | None:
        """The labels of ``s`` in memory (every array, read on first use), or None when too
        large."""
        held = self._memory.get(s.name)
        if held is not None or s.name in self._on_disk:
            return held
        size = s.n * sum(
            int(np.prod(output_shape(n, self.window_shape, self.hidden_dim))) * 4
            for n in self._names
        )
        # the write lock keeps this process's writes and marker discoveries out while the split
        # is read and published, so no row becomes present in between and is missed
        with self._write_lock:
            with self._lock:
                if s.name in self._memory or s.name in self._on_disk:
                    return self._memory.get(s.name)
                used = sum(label_bytes(labels) for labels in self._memory.values())
                if used + size > self.memory_bytes:
                    self._on_disk.add(s.name)
                    log.info(
                        "label cache %s: split %s (%d bytes) read from the store",
                        self.path, s.name, size,
                    )  # fmt: skip
                    return None
            labels = self.read_split(s.name, with_hidden=bool(self.hidden_dim))
            with self._lock:
                self._memory[s.name] = labels
        return labels


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``: a view when the rows are contiguous and ascending, else a copy."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and (len(rows) < 2 or bool((np.diff(rows) == 1).all())):
        return array[lo:hi]
    return array[rows]
