"""Names, schema version and chunking rules of the canonical store."""

from __future__ import annotations

import warnings

import zarr

from stkd_dist.location import Location, PathInput, location, zarr_store

SCHEMA_VERSION = 1
SCHEMA_ATTR = "stkd_schema_version"
# set while `stkd ingest --append` writes (storage.append): readers refuse such a store
APPEND_ATTR = "stkd_append_in_progress"
DIMS = ("time", "node", "channel")
GRAPH_GROUP = "graph"
FINGERPRINT_GROUP = "fingerprint"  # block digests of the fingerprint (storage.fingerprint)
DATA_ARRAYS = ("values", "mask")
COORD_ARRAYS = ("time", "node", "channel")

# Target size of one chunk of ``values``: big enough that per-chunk overhead (a file open, a
# decompression call) is amortised, small enough that a rank's prefetched block stays small.
TARGET_CHUNK_BYTES = 4 * 2**20
MIN_CHUNK_BYTES = 1 * 2**20
MAX_CHUNK_BYTES = 16 * 2**20
# Below this many time steps per chunk, a chunk holds too little history to be worth a read:
# chunk the node dimension instead.
MIN_STEPS_PER_CHUNK = 256


def choose_chunks(steps: int, nodes: int, channels: int, itemsize: int = 4) -> tuple[int, int, int]:
    """Chunk shape ``(time, node, channel)`` for a ``values`` array of this size.

    Chunks are ~4 MiB (1-16 MiB) where the data is that large. Time is always chunked; the node
    dimension is chunked only when one chunk of ``MIN_STEPS_PER_CHUNK`` steps over all nodes would
    exceed the target. Channels are never split (a window always needs all of them).
    """
    if min(steps, nodes, channels, itemsize) <= 0:
        raise ValueError(f"empty array shape {(steps, nodes, channels)}")
    row_bytes = nodes * channels * itemsize
    if row_bytes * MIN_STEPS_PER_CHUNK <= MAX_CHUNK_BYTES:
        node_chunk = nodes
    else:
        node_chunk = max(1, TARGET_CHUNK_BYTES // (MIN_STEPS_PER_CHUNK * channels * itemsize))
        node_chunk = min(node_chunk, nodes)
    time_chunk = max(1, TARGET_CHUNK_BYTES // (node_chunk * channels * itemsize))
    return (min(time_chunk, steps), node_chunk, channels)


def consolidate(path: PathInput | Location) -> None:
    """Write consolidated metadata, which ``xarray.open_zarr`` reads first.

    Zarr warns that consolidated metadata is not (yet) in the v3 spec; xarray and zarr-python both
    read it, so the warning is silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zarr_store(location(path), read_only=False), zarr_format=3)
