"""Content fingerprint and missing-value counts of a store, computed with Dask.

The fingerprint is a sha256 over the data in canonical blocks of ``FINGERPRINT_BLOCK`` steps (so it
does not depend on how the store is chunked), followed by the time axis, node ids, channel names and
the adjacency. Two stores with equal content have equal fingerprints; any change of a reading, a mask
bit, a timestamp, an id or an edge weight changes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import dask
import numpy as np
import zarr

from stkd_dist.compute import compute
from stkd_dist.location import Location, PathInput, location, url, zarr_store
from stkd_dist.storage.chunks import member_array, member_group, read_array
from stkd_dist.storage.layout import GRAPH_GROUP
from stkd_dist.storage.lazy import dask_array

FINGERPRINT_BLOCK = 1024


def _block_digest(values: np.ndarray, mask: np.ndarray) -> tuple[bytes, np.ndarray]:
    # values: [block, node, channel] float32; mask: same shape, bool
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    h.update(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes())
    missing = (~mask).sum(axis=(0, 1)).astype(np.int64)  # [channel]
    return h.digest(), missing


def fingerprint_store(path: PathInput | Location) -> dict[str, Any]:
    """Compute ``fingerprint``, ``missing`` (per channel) and ``missing_fraction`` of a store."""
    root = zarr.open_group(zarr_store(location(path)), mode="r", zarr_format=3)
    where = url(path)

    def read(arr: zarr.Array) -> np.ndarray:  # a chunk that cannot be decoded is named
        return read_array(arr, where=where)

    steps, nodes, channels = member_array(root, "values", where).shape
    block = (min(FINGERPRINT_BLOCK, steps), nodes, channels)
    v = dask_array(path, "values").rechunk(block).to_delayed().ravel()
    m = dask_array(path, "mask").rechunk(block).to_delayed().ravel()
    parts = compute(*[dask.delayed(_block_digest)(vb, mb) for vb, mb in zip(v, m, strict=True)])

    h = hashlib.sha256()
    missing = np.zeros(channels, dtype=np.int64)
    for digest, miss in parts:
        h.update(digest)
        missing += miss
    h.update(read(member_array(root, "time", where)).astype("<i8").tobytes())
    h.update(str(dict(member_array(root, "time", where).attrs)).encode())
    for name in ("node", "channel"):
        h.update("\x1f".join(str(x) for x in read(member_array(root, name, where))).encode())
    graph = member_group(root, GRAPH_GROUP, where)
    if graph is not None and "adjacency" in graph:
        adjacency = read(member_array(graph, "adjacency", where))
        h.update(np.ascontiguousarray(adjacency, dtype="<f4").tobytes())

    names = [str(c) for c in read(member_array(root, "channel", where))]
    per_channel = steps * nodes
    return {
        "fingerprint": h.hexdigest()[:32],
        "missing": {
            name: {"count": int(n), "fraction": float(n) / per_channel}
            for name, n in zip(names, missing, strict=True)
        },
        "missing_fraction": float(missing.sum()) / (per_channel * channels),
    }
