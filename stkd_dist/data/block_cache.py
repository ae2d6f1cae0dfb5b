"""A small LRU of decoded time chunks of a store, for readers that come back to the same chunks.

A teacher server reads the windows of consecutive batches from the same few time chunks: a
stream's windows are contiguous runs of a shard plan's blocks, and several streams read the same
epoch. Without a cache every batch reads and decodes (and checks) each chunk it touches again.
:class:`BlockCache` keeps the last decoded chunks, keyed by chunk index, so a chunk another batch
just decoded is not read again.

Cached arrays are read-only: :meth:`read` returns views of them when a range lies in one chunk,
and the reader's window assembly copies what it modifies (fancy indexing), so sharing is safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from stkd_dist.storage.store import DatasetStore

#: default budget of decoded chunks (values + mask)
BLOCK_CACHE_BYTES = 64 * 2**20


@dataclass
class BlockCacheStats:
    """Counters of a :class:`BlockCache`.

    Attributes:
        chunk_reads: time chunks read (and decoded) from the store.
        chunk_hits: time chunks served from the cache.
        evictions: chunks dropped to stay within the budget.
    """

    chunk_reads: int = 0
    chunk_hits: int = 0
    evictions: int = 0


class BlockCache:
    """Reads step ranges of ``store`` whole time chunk by whole time chunk, through an LRU.

    Args:
        store: the opened store.
        max_bytes: most bytes of decoded chunks kept (at least the two last chunks are kept, so
            a range straddling a chunk boundary never reads a chunk twice).

    Thread-safe: the LRU is guarded by a lock that is never held during a store read (two
    threads missing the same chunk at once may both read it; the second copy is dropped).
    """

    def __init__(self, store: DatasetStore, max_bytes: int = BLOCK_CACHE_BYTES) -> None:
        self.store = store
        self.chunk_steps = int(store.chunks[0])
        self.max_bytes = int(max_bytes)
        self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = BlockCacheStats()

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and mask ``[t, node, channel]`` of time chunk ``c`` (read-only arrays)."""
        with self._lock:
            hit = self._chunks.get(c)
            if hit is not None:
                self._chunks.move_to_end(c)
                self.stats.chunk_hits += 1
                return hit
        lo = c * self.chunk_steps
        values, mask = self.store.read(lo, min(lo + self.chunk_steps, self.store.steps))
        values.flags.writeable = False
        mask.flags.writeable = False
        with self._lock:
            self.stats.chunk_reads += 1
            if c not in self._chunks:
                self._chunks[c] = (values, mask)
                self._bytes += values.nbytes + mask.nbytes
                while self._bytes > self.max_bytes and len(self._chunks) > 2:
                    _, (v, m) = self._chunks.popitem(last=False)
                    self._bytes -= v.nbytes + m.nbytes
                    self.stats.evictions += 1
            return self._chunks.get(c, (values, mask))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Steps ``[start, stop)``: ``values`` float32 and ``mask`` bool ``[t, node, channel]``.

        Read-only views when the range lies in one chunk, else new arrays.
        """
        if start >= stop:
            return self.store.read(start, stop)
        cs = self.chunk_steps
        parts = []
        for c in range(start // cs, (stop - 1) // cs + 1):
            values, mask = self._chunk(c)
            lo, hi = max(start - c * cs, 0), min(stop - c * cs, cs)  # the rows wanted of chunk c
            parts.append((values[lo:hi], mask[lo:hi]))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([v for v, _ in parts]), np.concatenate([m for _, m in parts])

    def clear(self) -> None:
        """Drop every cached chunk."""
        with self._lock:
            self._chunks.clear()
            self._bytes = 0
