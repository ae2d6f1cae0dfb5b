"""Content fingerprint and missing-value counts of a store, computed with Dask.

The fingerprint is a sha256 over the data in canonical blocks of ``FINGERPRINT_BLOCK`` steps (so it
does not depend on how the store is chunked), followed by the time axis, node ids, channel names and
the adjacency. Two stores with equal content have equal fingerprints; any change of a reading, a mask
bit, a timestamp, an id or an edge weight changes it.

The block digests and per-block missing counts are kept in the store's ``fingerprint`` group, so
that appending steps (:mod:`.append`) hashes only the blocks it changed: the old last (partial)
block and the new ones, never the whole store again.
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
from stkd_dist.storage.layout import FINGERPRINT_GROUP, GRAPH_GROUP
from stkd_dist.storage.lazy import dask_array

FINGERPRINT_BLOCK = 1024


def _block_digest(values: np.ndarray, mask: np.ndarray) -> tuple[bytes, np.ndarray]:
    # values: [block, node, channel] float32; mask: same shape, bool
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(values, dtype="<f4").tobytes())
    h.update(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes())
    missing = (~mask).sum(axis=(0, 1)).astype(np.int64)  # [channel]
    return h.digest(), missing


def block_parts(path: PathInput | Location, first_block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(digests [k, 32] uint8, missing [k, channel] int64)`` of blocks ``first_block`` on."""
    steps, nodes, channels = dask_array(path, "values").shape
    lo = first_block * FINGERPRINT_BLOCK
    if lo >= steps:
        return np.zeros((0, 32), np.uint8), np.zeros((0, channels), np.int64)
    # blocks of FINGERPRINT_BLOCK steps from step 0 (the last one shorter), whatever the chunks
    block = (FINGERPRINT_BLOCK, nodes, channels)
    v = dask_array(path, "values")[lo:].rechunk(block).to_delayed().ravel()
    m = dask_array(path, "mask")[lo:].rechunk(block).to_delayed().ravel()
    parts = compute(*[dask.delayed(_block_digest)(vb, mb) for vb, mb in zip(v, m, strict=True)])
    digests = np.stack([np.frombuffer(d, dtype=np.uint8) for d, _ in parts])
    return digests, np.stack([miss for _, miss in parts]).astype(np.int64)


def stored_blocks(path: PathInput | Location) -> tuple[np.ndarray, np.ndarray] | None:
    """The block digests and missing counts kept in the store, or None (a store without them)."""
    root = zarr.open_group(zarr_store(location(path)), mode="r", zarr_format=3)
    where = url(path)
    group = member_group(root, FINGERPRINT_GROUP, where)
    if group is None or "blocks" not in group or "missing" not in group:
        return None
    blocks = read_array(member_array(group, "blocks", where), where=where)
    missing = read_array(member_array(group, "missing", where), where=where)
    return np.asarray(blocks, np.uint8), np.asarray(missing, np.int64)


def fingerprint_store(
    path: PathInput | Location, known: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Any]:
    """Compute ``fingerprint``, ``missing`` (per channel) and ``missing_fraction`` of a store,
    and keep the block digests in its ``fingerprint`` group (the store must be writable).

    Args:
        path: the store.
        known: digests and missing counts of the first blocks, still valid (steps appended
            after them): only the blocks after them are read.
    """
    root = zarr.open_group(zarr_store(location(path), read_only=False), mode="r+", zarr_format=3)
    where = url(path)

    def read(arr: zarr.Array) -> np.ndarray:  # a chunk that cannot be decoded is named
        return read_array(arr, where=where)

    steps, nodes, channels = member_array(root, "values", where).shape
    first = 0 if known is None else len(known[0])
    digests, missing_blocks = block_parts(path, first)
    if known is not None:
        digests = np.concatenate([known[0], digests])
        missing_blocks = np.concatenate([known[1], missing_blocks])
    _keep_blocks(root, digests, missing_blocks)

    h = hashlib.sha256()
    for digest in digests:
        h.update(digest.tobytes())
    missing = missing_blocks.sum(axis=0).astype(np.int64)  # [channel]
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


def _keep_blocks(root: zarr.Group, digests: np.ndarray, missing: np.ndarray) -> None:
    # digests: [block, 32] uint8; missing: [block, channel] int64 (small: one row per 1024 steps)
    group = root.require_group(FINGERPRINT_GROUP)
    for name, arr in (("blocks", digests), ("missing", missing)):
        z = group.create_array(
            name,
            shape=arr.shape,
            dtype=arr.dtype,
            chunks=(max(len(arr), 1), arr.shape[1]),
            overwrite=True,
        )
        z[...] = arr
