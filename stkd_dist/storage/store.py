"""Read side of the canonical store: open, validate, and give typed access."""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
import zarr.abc.store
import zarr.errors

from stkd_dist.errors import StoreError
from stkd_dist.location import (
    Location,
    PathInput,
    exists,
    is_remote,
    location,
    retrying,
    storage_error,
    url,
    zarr_store,
)
from stkd_dist.paths import resolve_dataset
from stkd_dist.storage.chunks import (
    ZarrMode,
    chunk_errors,
    dimension_names,
    member_array,
    member_group,
    read_array,
)
from stkd_dist.storage.layout import (
    APPEND_ATTR,
    COORD_ARRAYS,
    DATA_ARRAYS,
    DIMS,
    GRAPH_GROUP,
    SCHEMA_ATTR,
    SCHEMA_VERSION,
    consolidate,
)
from stkd_dist.storage.lazy import dask_array

NO_STORE = "no such store"


class DatasetStore:
    """An opened, validated canonical store.

    Opening reads only the consolidated metadata (one object on an object store; the chunks are
    never listed), checks the schema version (the commit marker: a writer sets it last, so a store
    whose writer was killed is refused as incomplete) and that every required array exists with the
    right dims and shape. Reading checks what a missing or damaged chunk breaks: a codec error, or a
    ``values``/``mask`` pair that disagrees (a valid store holds NaN exactly where the mask is
    False, and a missing chunk reads as all NaN or all False); either raises :class:`StoreError`
    naming the store and the steps. :meth:`verify_chunks` lists every chunk, for a full check.

    Args:
        path: the ``.zarr`` store: a local path or an object-store URL.
        mode: ``"r"`` (default) or ``"r+"`` to update attributes (statistics).
        zarr_store: read the arrays through this zarr store object instead of opening ``path``
            directly (e.g. a wrapper that records which chunks are read); ``path`` must still
            name the store.
    """

    def __init__(
        self,
        path: PathInput | Location,
        mode: ZarrMode = "r",
        *,
        zarr_store: zarr.abc.store.Store | None = None,
    ) -> None:
        self.path = location(path)
        where = url(self.path)
        self.where = where
        self.remote = is_remote(self.path)
        self._pool: ThreadPoolExecutor | None = None
        source = _zarr_source(self.path, mode) if zarr_store is None else zarr_store
        try:
            self.group = retrying(lambda: _open_group(source, mode, where), where)
        except StoreError as e:
            # objects without the root metadata: a writer was killed while moving the store
            # into place (the root zarr.json is always written last)
            if e.message == NO_STORE and exists(self.path):
                raise StoreError(
                    "incomplete store: objects are there but not its root zarr.json, which is "
                    "written last (a writer was interrupted); re-ingest with --overwrite",
                    where=where,
                ) from e
            raise
        version = self.group.attrs.get(SCHEMA_ATTR)
        if version is None:
            raise StoreError(
                "incomplete store: it has no commit marker (`stkd_schema_version`), so its writer "
                "did not finish (an ingest or synth was interrupted); re-ingest with --overwrite",
                where=where,
            )
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"store schema version is {version!r}, this stkd-dist reads version "
                f"{SCHEMA_VERSION}: re-ingest the dataset with this version",
                where=where,
            )
        if APPEND_ATTR in self.group.attrs:
            marker: Any = self.group.attrs[APPEND_ATTR]
            steps = marker.get("steps") if isinstance(marker, dict) else "?"
            raise StoreError(
                f"an append to this store was interrupted (it had {steps} steps before): run "
                "`stkd ingest --append` again, which rolls the interrupted append back first",
                where=where,
            )
        for name in (*DATA_ARRAYS, *COORD_ARRAYS):
            if name not in self.group:
                raise StoreError(f"required array {name!r} is missing", where=where)
        self.values = member_array(self.group, "values", where)
        self.mask = member_array(self.group, "mask", where)
        if self.values.shape != self.mask.shape or len(self.values.shape) != 3:
            raise StoreError(
                f"values {self.values.shape} and mask {self.mask.shape} must both be "
                "[time, node, channel]",
                where=where,
            )
        dims = dimension_names(self.values)
        if dims != DIMS:
            raise StoreError(f"values has dims {dims}, expected {DIMS}", where=where)

    def verify_chunks(self) -> None:
        """List the chunks of ``values`` and ``mask`` (O(chunks) requests: not done on open)
        and raise :class:`StoreError` when any is missing."""
        for name in DATA_ARRAYS:
            arr = member_array(self.group, name, self.where)
            have = retrying(functools.partial(getattr, arr, "nchunks_initialized"), self.where)
            if have != arr.nchunks:
                raise StoreError(
                    f"array {name!r} has {arr.nchunks - have} of {arr.nchunks} chunks missing: "
                    "the store is damaged, re-ingest it",
                    where=self.where,
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
        return str(self.group.attrs.get("name", self.path.name.removesuffix(".zarr")))

    @property
    def freq(self) -> str:
        return str(self.group.attrs["freq"])

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs["fingerprint"])

    @cached_property
    def channels(self) -> list[str]:
        return [str(c) for c in self._read(member_array(self.group, "channel", self.where))]

    @cached_property
    def node_ids(self) -> list[str]:
        return [str(n) for n in self._read(member_array(self.group, "node", self.where))]

    @cached_property
    def time(self) -> pd.DatetimeIndex:
        """The decoded time axis (one timestamp per step)."""
        with chunk_errors(
            member_array(self.group, "time", self.where), self.where
        ):  # xarray reads and decodes it
            return pd.DatetimeIndex(self.xarray()["time"].values)

    def channel_index(self, names: list[str] | tuple[str, ...]) -> list[int]:
        """Indices of channels by name; raises naming the unknown channel and the known ones."""
        out = []
        for n in names:
            if n not in self.channels:
                raise StoreError(
                    f"unknown channel {n!r}; this store has {', '.join(self.channels)}",
                    where=self.where,
                )
            out.append(self.channels.index(n))
        return out

    # -- graph -------------------------------------------------------------------------------
    @property
    def has_adjacency(self) -> bool:
        graph = member_group(self.group, GRAPH_GROUP, self.where)
        return graph is not None and "adjacency" in graph

    def adjacency(self) -> np.ndarray:
        """Dense ``[node, node]`` float32 adjacency; identity when the store has no graph."""
        if not self.has_adjacency:
            return np.eye(self.nodes, dtype=np.float32)
        graph = member_group(self.group, GRAPH_GROUP, self.where)
        assert graph is not None  # has_adjacency
        return np.asarray(
            self._read(member_array(graph, "adjacency", self.where)), dtype=np.float32
        )

    def locations(self) -> np.ndarray | None:
        """``[node, 2]`` latitude/longitude, or None when the store has no locations."""
        if "latitude" not in self.group:
            return None
        return np.stack(
            [
                self._read(member_array(self.group, "latitude", self.where)),
                self._read(member_array(self.group, "longitude", self.where)),
            ],
            axis=1,
        )

    # -- data --------------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Read steps ``[start, stop)``: ``values`` float32 and ``mask`` bool ``[t, node, channel]``.

        Only the chunks overlapping the range are read.
        """
        if not 0 <= start <= stop <= self.steps:
            raise StoreError(
                f"step range [{start}, {stop}) outside [0, {self.steps})", where=self.where
            )
        what = f"steps [{start}, {stop})"
        # transient errors (timeouts, 5xx, throttling) are retried, never called corruption; a
        # chunk that cannot be decoded raises StoreError naming it (stkd_dist.storage.chunks)
        values, mask = self._fetch(start, stop, what)
        # values: [t, node, channel] float32, NaN exactly where mask is False
        if not np.array_equal(np.isnan(values), ~mask):
            bad = int(np.flatnonzero((np.isnan(values) != ~mask).any(axis=(1, 2)))[0]) + start
            chunk = bad // self.chunks[0]
            raise StoreError(
                f"cannot read {what}: time chunk {chunk} (step {bad}) of 'values' or 'mask' is "
                "missing or damaged (values and mask disagree); re-ingest the dataset",
                where=self.where,
            )
        return values, mask

    def _fetch(self, start: int, stop: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        def get(arr: zarr.Array) -> np.ndarray:
            return read_array(arr, slice(start, stop), where=self.where, what=what)

        if not self.remote:
            return get(self.values), get(self.mask)
        # on an object store each array's chunks are requests: fetch both arrays at once, so a
        # block costs one round of latency rather than two
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(2, thread_name_prefix="stkd-store")
        mask = pool.submit(get, self.mask)
        values = get(self.values)
        return values, mask.result()

    def _read(self, arr: zarr.Array) -> np.ndarray:
        """All of a (small) coordinate or graph array."""
        return read_array(arr, where=self.where)

    def dask(self, name: str) -> da.Array:
        """``values`` or ``mask`` as a Dask array that every Dask scheduler (Ray's too) can run."""
        return dask_array(self.path, name)

    def xarray(self) -> xr.Dataset:
        """The root group as a lazy xarray Dataset (dims ``time``, ``node``, ``channel``)."""
        return xr.open_zarr(_zarr_source(self.path, "r"))

    def set_attrs(self, **attrs: Any) -> None:
        """Update root attributes (store must be opened with ``mode="r+"``)."""
        self.group.attrs.update(attrs)
        # keep the consolidated metadata (what xarray reads first) in step with the attributes
        consolidate(self.path)

    def __repr__(self) -> str:
        s, n, c = self.shape
        return f"DatasetStore({self.where!r}, steps={s}, nodes={n}, channels={c})"


def _zarr_source(path: Location, mode: ZarrMode) -> Any:
    return zarr_store(path, read_only=mode == "r")


def _open_group(source: Any, mode: ZarrMode, where: str) -> zarr.Group:
    try:
        # the consolidated metadata in the root zarr.json: one read, no listing of any prefix
        return zarr.open_group(source, mode=mode, zarr_format=3)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError) as e:
        known = storage_error(e, where)
        if known is not None:
            raise known from e
        raise StoreError(NO_STORE, where=where) from e
    except (ValueError, json.JSONDecodeError) as e:
        raise StoreError(f"not a Zarr v3 group ({e})", where=where) from e


def open_store(
    ref: PathInput, storage: PathInput | None = None, mode: ZarrMode = "r"
) -> DatasetStore:
    """Open a store given as a path or as a dataset name under the storage root."""
    return DatasetStore(resolve_dataset(ref, storage), mode=mode)
