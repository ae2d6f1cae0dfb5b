"""Read side of the canonical store: open, validate, and give typed access."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
import zarr.abc.store
import zarr.errors

from stkd_dist.errors import StoreError
from stkd_dist.paths import resolve_dataset
from stkd_dist.storage.layout import (
    COORD_ARRAYS,
    DATA_ARRAYS,
    DIMS,
    GRAPH_GROUP,
    SCHEMA_ATTR,
    SCHEMA_VERSION,
    consolidate,
)
from stkd_dist.storage.lazy import dask_array


class DatasetStore:
    """An opened, validated canonical store.

    Opening checks the schema version, that every required array exists with the right dims and
    shape, and that no chunk of ``values``/``mask`` is missing on disk. Reading a corrupted chunk
    later raises :class:`StoreError` through :meth:`read`.

    Args:
        path: the ``.zarr`` directory.
        mode: ``"r"`` (default) or ``"r+"`` to update attributes (statistics).
        zarr_store: read the arrays through this zarr store object instead of opening ``path``
            directly (e.g. a wrapper that records which chunks are read); ``path`` must still
            be the store's directory.
    """

    def __init__(
        self, path: str | Path, mode: str = "r", *, zarr_store: zarr.abc.store.Store | None = None
    ) -> None:
        self.path = Path(path)
        where = str(self.path)
        if not self.path.exists():
            raise StoreError("no such store", where=where)
        try:
            source = self.path if zarr_store is None else zarr_store
            self.group = zarr.open_group(source, mode=mode, zarr_format=3)
        except (
            zarr.errors.GroupNotFoundError,
            FileNotFoundError,
            ValueError,
            json.JSONDecodeError,
        ) as e:
            raise StoreError(f"not a Zarr v3 group ({e})", where=where) from e
        version = self.group.attrs.get(SCHEMA_ATTR)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store schema version is {version!r}, this stkd-dist reads version "
                f"{SCHEMA_VERSION}: re-ingest the dataset with this version",
                where=where,
            )
        for name in (*DATA_ARRAYS, *COORD_ARRAYS):
            if name not in self.group:
                raise StoreError(f"required array {name!r} is missing", where=where)
        self.values: zarr.Array = self.group["values"]
        self.mask: zarr.Array = self.group["mask"]
        if self.values.shape != self.mask.shape or len(self.values.shape) != 3:
            raise StoreError(
                f"values {self.values.shape} and mask {self.mask.shape} must both be "
                "[time, node, channel]",
                where=where,
            )
        dims = tuple(self.values.metadata.dimension_names or ())
        if dims != DIMS:
            raise StoreError(f"values has dims {dims}, expected {DIMS}", where=where)
        for name in DATA_ARRAYS:
            arr = self.group[name]
            if arr.nchunks_initialized != arr.nchunks:
                raise StoreError(
                    f"array {name!r} has {arr.nchunks - arr.nchunks_initialized} of "
                    f"{arr.nchunks} chunks missing on disk: the store is damaged, re-ingest it",
                    where=where,
                )

    # -- shape and names ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(steps, nodes, channels)``."""
        return tuple(self.values.shape)  # type: ignore[return-value]

    @property
    def steps(self) -> int:
        return self.shape[0]

    @property
    def nodes(self) -> int:
        return self.shape[1]

    @property
    def chunks(self) -> tuple[int, int, int]:
        """Chunk shape of ``values`` (``time``, ``node``, ``channel``)."""
        return tuple(self.values.chunks)  # type: ignore[return-value]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def name(self) -> str:
        return str(self.group.attrs.get("name", self.path.stem))

    @property
    def freq(self) -> str:
        return str(self.group.attrs["freq"])

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs["fingerprint"])

    @cached_property
    def channels(self) -> list[str]:
        return [str(c) for c in self.group["channel"][...]]

    @cached_property
    def node_ids(self) -> list[str]:
        return [str(n) for n in self.group["node"][...]]

    @cached_property
    def time(self) -> pd.DatetimeIndex:
        """The decoded time axis (one timestamp per step)."""
        return pd.DatetimeIndex(self.xarray()["time"].values)

    def channel_index(self, names: list[str] | tuple[str, ...]) -> list[int]:
        """Indices of channels by name; raises naming the unknown channel and the known ones."""
        out = []
        for n in names:
            if n not in self.channels:
                raise StoreError(
                    f"unknown channel {n!r}; this store has {', '.join(self.channels)}",
                    where=str(self.path),
                )
            out.append(self.channels.index(n))
        return out

    # -- graph -------------------------------------------------------------------------------
    @property
    def has_adjacency(self) -> bool:
        graph = self.group.get(GRAPH_GROUP)
        return graph is not None and "adjacency" in graph

    def adjacency(self) -> np.ndarray:
        """Dense ``[node, node]`` float32 adjacency; identity when the store has no graph."""
        if not self.has_adjacency:
            return np.eye(self.nodes, dtype=np.float32)
        return np.asarray(self.group[GRAPH_GROUP]["adjacency"][...], dtype=np.float32)

    def locations(self) -> np.ndarray | None:
        """``[node, 2]`` latitude/longitude, or None when the store has no locations."""
        if "latitude" not in self.group:
            return None
        return np.stack([self.group["latitude"][...], self.group["longitude"][...]], axis=1)

    # -- data --------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Read steps ``[start, stop)``: ``values`` float32 and ``mask`` bool ``[t, node, channel]``.

        Only the chunks overlapping the range are read.
        """
        if not 0 <= start <= stop <= self.steps:
            raise StoreError(
                f"step range [{start}, {stop}) outside [0, {self.steps})", where=str(self.path)
            )
        try:
            values = np.asarray(self.values[start:stop])
            mask = np.asarray(self.mask[start:stop])
        except Exception as e:  # a codec error means bytes on disk are damaged
            raise StoreError(
                f"cannot read steps [{start}, {stop}): a chunk is corrupted ({type(e).__name__}: {e}); "
                "re-ingest the dataset",
                where=str(self.path),
            ) from e
        return values, mask

    def dask(self, name: str) -> da.Array:
        """``values`` or ``mask`` as a Dask array that every Dask scheduler (Ray's too) can run."""
        return dask_array(self.path, name)

    def xarray(self) -> xr.Dataset:
        """The root group as a lazy xarray Dataset (dims ``time``, ``node``, ``channel``)."""
        return xr.open_zarr(self.path)

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (store must be opened with ``mode="r+"``)."""
        self.group.attrs.update(attrs)
        # keep the consolidated metadata (what xarray reads first) in step with the attributes
        consolidate(self.path)

    def __repr__(self) -> str:
        s, n, c = self.shape
        return f"DatasetStore({str(self.path)!r}, steps={s}, nodes={n}, channels={c})"


def open_store(ref: str | Path, storage: str | Path | None = None, mode: str = "r") -> DatasetStore:
    """Open a store given as a path or as a dataset name under the storage root."""
    return DatasetStore(resolve_dataset(ref, storage), mode=mode)
