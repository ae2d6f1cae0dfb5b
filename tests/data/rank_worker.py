"""Runs one rank's loader in a spawned process over a store whose chunk reads are recorded.

Imported by name in the child processes of ``test_loader.py`` (spawn pickles functions by module
name), so it lives in a plain module next to the tests.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import zarr.storage

from stkd_dist.data.loader import make_loader
from stkd_dist.data.reader import WindowReader
from stkd_dist.data.windows import WindowSpec
from stkd_dist.storage.store import DatasetStore


class CountingStore(zarr.storage.WrapperStore):
    """A zarr store that records the key of every ``get`` (chunk reads included)."""

    def __init__(self, store: zarr.storage.LocalStore) -> None:
        super().__init__(store)
        self.keys: list[str] = []
        self._lock = threading.Lock()

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        with self._lock:
            self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def time_chunks(self, array: str) -> set[int]:
        """Time-chunk indices of ``array`` read so far (keys ``ARRAY/c/T/N/C``)."""
        with self._lock:
            return {int(k.split("/")[2]) for k in self.keys if k.startswith(f"{array}/c/")}


def run_rank(job: tuple[str, int, int, int, int, int]) -> dict[str, Any]:
    """Iterate one rank of the training split; return what it read and yielded."""
    path, world_size, rank, input_steps, horizon, batch_size = job
    counting = CountingStore(zarr.storage.LocalStore(Path(path), read_only=True))
    store = DatasetStore(path, zarr_store=counting)
    reader = WindowReader(store, WindowSpec(input_steps=input_steps, horizon=horizon))
    counting.keys.clear()  # count only what the loader reads
    loader = make_loader(reader, "train", world_size, rank, batch_size=batch_size, epoch=1)
    indices: list[int] = []
    valid: list[bool] = []
    sizes: list[int] = []
    for batch in loader:
        indices.extend(batch.index.tolist())
        valid.extend(batch.valid.tolist())
        sizes.append(batch.size)
        assert not batch.mask[~batch.valid].any()
    return {
        "rank": rank,
        "indices": indices,
        "valid": valid,
        "sizes": sizes,
        "num_batches": len(loader),
        "values_chunks": sorted(counting.time_chunks("values")),
        "mask_chunks": sorted(counting.time_chunks("mask")),
    }
