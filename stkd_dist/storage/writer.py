"""Atomic writer of canonical stores.

A store is first written under a hidden temporary name next to its destination (a sibling folder,
or a sibling prefix in the same bucket), completed (arrays, graph, attributes with the commit
marker ``stkd_schema_version``, consolidated metadata), and only then moved into place: a rename on
a local disk; on an object store a server-side copy that writes the root ``zarr.json`` (the only
object a reader opens first) after every other object. An ingest that fails or is killed leaves
nothing a reader takes for a store at the destination.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from stkd_dist.compute import dask_scheduler
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    exists,
    is_remote,
    location,
    makedirs,
    remove,
    rename_or_copy,
    storage_errors,
    temporary_sibling,
    url,
    zarr_store,
)
from stkd_dist.storage.fingerprint import fingerprint_store
from stkd_dist.storage.layout import (
    DIMS,
    GRAPH_GROUP,
    SCHEMA_ATTR,
    SCHEMA_VERSION,
    choose_chunks,
    consolidate,
)


@dataclass(frozen=True)
class SourceFile:
    """A file a store was made from, by name and content hash."""

    name: str
    sha256: str


@dataclass(frozen=True)
class StoreMeta:
    """Everything about a dataset except its big arrays.

    Attributes:
        name: dataset name.
        time: one timestamp per step (regular, ``freq`` apart).
        node_ids: sensor ids, one per node, as in the source.
        channels: channel names.
        freq: pandas frequency string of the time axis, e.g. ``"5min"``.
        adjacency: ``[node, node]`` weighted adjacency (row = from), or None for no graph.
        sources: source files with their sha256.
        provenance: licence / provenance text.
        locations: optional ``[node, 2]`` latitude, longitude.
        extra_attrs: more JSON-serialisable root attributes (e.g. ingest counts).
    """

    name: str
    time: pd.DatetimeIndex
    node_ids: Sequence[str]
    channels: Sequence[str]
    freq: str
    adjacency: np.ndarray | None = None
    sources: tuple[SourceFile, ...] = ()
    provenance: str = ""
    locations: np.ndarray | None = None
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    def validate(self, shape: tuple[int, int, int]) -> None:
        """Check the metadata against the ``values`` shape ``[time, node, channel]``."""
        steps, nodes, channels = shape
        if len(self.time) != steps:
            raise InputError(f"time axis has {len(self.time)} steps but values have {steps}")
        if len(self.node_ids) != nodes:
            raise InputError(f"{len(self.node_ids)} node ids for {nodes} nodes")
        if len(set(self.node_ids)) != nodes:
            raise InputError("node ids must be unique")
        if len(self.channels) != channels:
            raise InputError(
                f"{len(self.channels)} channel names ({','.join(self.channels)}) for {channels} "
                "channels in the data",
                where="--channels",
            )
        if self.adjacency is not None and self.adjacency.shape != (nodes, nodes):
            raise InputError(
                f"adjacency is {self.adjacency.shape[0]}x{self.adjacency.shape[1]} but the data "
                f"has {nodes} nodes: it must be {nodes}x{nodes}",
                where="--adjacency",
            )
        if self.locations is not None and self.locations.shape != (nodes, 2):
            raise InputError(f"locations must be [node, 2] (lat, lon), got {self.locations.shape}")


ROOT_METADATA = "zarr.json"


def write_store(
    dest: PathInput | Location,
    values: da.Array,
    mask: da.Array,
    meta: StoreMeta,
    *,
    overwrite: bool = False,
    chunks: tuple[int, int, int] | None = None,
) -> Location:
    """Write a canonical store atomically and return its path.

    Args:
        dest: the ``.zarr`` store to create (a local path or an object-store URL).
        values: ``[time, node, channel]`` readings; entries where ``mask`` is False are stored as NaN.
        mask: ``[time, node, channel]`` bool, True where observed.
        meta: names, time axis, graph and provenance.
        overwrite: replace an existing store at ``dest`` (only after the new one is complete).
        chunks: chunk shape; default :func:`choose_chunks`.
    """
    dest = location(dest)
    if values.ndim != 3 or values.shape != mask.shape:
        raise InputError(
            f"values {values.shape} and mask {mask.shape} must both be [time, node, channel]"
        )
    meta.validate(values.shape)
    with storage_errors(dest):
        if not overwrite and exists(dest):
            raise StoreError("destination exists (pass --overwrite to replace it)", where=url(dest))
        makedirs(dest.parent)
        chunks = chunks or choose_chunks(*values.shape)
        tmp = temporary_sibling(dest)
        try:
            _write_arrays(tmp, values, mask, meta, chunks)
            _write_graph(tmp, meta.adjacency)
            _finish_attrs(tmp, meta)
            _replace(tmp, dest)
        except StoreError as e:
            _discard(tmp)
            if e.where and url(tmp) in e.where:
                # users know the destination, not the hidden name it is written under
                raise StoreError(e.message, where=url(dest)) from e
            raise
        except BaseException:
            _discard(tmp)
            raise
    return dest


def _discard(tmp: Location) -> None:
    # best effort: the error that got us here (a missing bucket, say) is the one to report
    with contextlib.suppress(Exception):
        remove(tmp)


def _write_arrays(
    tmp: Location, values: da.Array, mask: da.Array, meta: StoreMeta, chunks: tuple[int, int, int]
) -> None:
    mask = mask.astype(bool).rechunk(chunks)
    # Unobserved entries are NaN so that xarray users see them as missing without the mask.
    values = da.where(mask, values.astype(np.float32), np.float32(np.nan)).rechunk(chunks)
    coords: dict[str, Any] = {
        "time": ("time", pd.DatetimeIndex(meta.time).values.astype("datetime64[ns]")),
        "node": ("node", np.asarray([str(n) for n in meta.node_ids], dtype=object)),
        "channel": ("channel", np.asarray([str(c) for c in meta.channels], dtype=object)),
    }
    if meta.locations is not None:
        coords["latitude"] = ("node", np.asarray(meta.locations[:, 0], dtype=np.float64))
        coords["longitude"] = ("node", np.asarray(meta.locations[:, 1], dtype=np.float64))
    ds = xr.Dataset({"values": (DIMS, values), "mask": (DIMS, mask)}, coords=coords)
    encoding = {
        "values": {"chunks": chunks},
        "mask": {"chunks": chunks},
        "time": {
            "units": f"minutes since {pd.Timestamp(meta.time[0]).isoformat()}",
            "dtype": "int64",
        },
    }
    with dask_scheduler():
        # write_empty_chunks: an all-missing chunk must still exist on disk, so that a chunk
        # absent from disk always means a damaged store.
        ds.to_zarr(
            zarr_store(tmp, read_only=False),
            mode="w-",
            zarr_format=3,
            consolidated=False,
            encoding=encoding,
            write_empty_chunks=True,
        )


def _write_graph(tmp: Location, adjacency: np.ndarray | None) -> None:
    root = zarr.open_group(zarr_store(tmp, read_only=False), mode="r+", zarr_format=3)
    graph = root.create_group(GRAPH_GROUP)
    if adjacency is None:
        graph.attrs["has_adjacency"] = False
        return
    adj = np.asarray(adjacency, dtype=np.float32)
    src, dst = np.nonzero(adj)
    graph.attrs["has_adjacency"] = True
    for name, arr in (
        ("adjacency", adj),
        ("edge_src", src.astype(np.int32)),
        ("edge_dst", dst.astype(np.int32)),
        ("edge_weight", adj[src, dst].astype(np.float32)),
    ):
        z = graph.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.shape or (1,))
        z[...] = arr


def _finish_attrs(tmp: Location, meta: StoreMeta) -> None:
    # Imported here: the data plane depends on the storage layer, not the other way round, but
    # every store is born with the statistics of its default training split.
    from stkd_dist.data.stats import compute_and_store_stats

    root = zarr.open_group(zarr_store(tmp, read_only=False), mode="r+", zarr_format=3)
    root.attrs.update(
        {
            # the commit marker: a reader refuses a store without it
            SCHEMA_ATTR: SCHEMA_VERSION,
            "name": meta.name,
            "freq": meta.freq,
            "sources": [{"name": s.name, "sha256": s.sha256} for s in meta.sources],
            "provenance": meta.provenance,
            **meta.extra_attrs,
        }
    )
    counts = fingerprint_store(tmp)
    root.attrs.update(counts)
    compute_and_store_stats(tmp)
    # consolidated metadata lets `xarray.open_zarr(path)` open the store with no extra arguments
    consolidate(tmp)


def _replace(tmp: Location, dest: Location) -> None:
    if is_remote(dest):
        # no rename on object stores: drop the old store, then copy the new one with its root
        # metadata last, so a reader never opens a store whose objects are not all there
        remove(dest)
        rename_or_copy(tmp, dest, last=(ROOT_METADATA,))
        return
    if not exists(dest):
        tmp.rename(dest)
        return
    old = temporary_sibling(dest, "old")
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    remove(old)
