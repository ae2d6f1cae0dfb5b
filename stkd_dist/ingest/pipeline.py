"""``ingest``: any supported source → one canonical store, written atomically.

Steps: check the destination, detect the format, read the source lazily, validate names and the
time axis, mask missing readings (non-finite, or equal to ``--missing-value``), load the graph and
locations, hash every source file, then :func:`stkd_dist.storage.write_store` (temporary name +
rename, so a failure at any step leaves nothing at the destination).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from stkd_dist.compute import compute, local_sources
from stkd_dist.errors import InputError, StoreError
from stkd_dist.ingest.adjacency import Adjacency, load_adjacency
from stkd_dist.ingest.arrays import read_npy, read_npz
from stkd_dist.ingest.common import (
    IngestOptions,
    IngestProgress,
    SourceData,
    check_unique,
    read_id_list,
    require_file,
    sha256_path,
)
from stkd_dist.ingest.detect import detect_format
from stkd_dist.ingest.hdf5 import read_hdf5
from stkd_dist.ingest.locations import load_locations
from stkd_dist.ingest.time_axis import build_time_axis
from stkd_dist.ingest.wide_csv import read_wide_csv
from stkd_dist.ingest.xarray_source import read_zarr
from stkd_dist.location import Location, as_path, exists, is_remote, storage_errors, url
from stkd_dist.storage import SourceFile, StoreMeta, choose_chunks, open_store, write_store
from stkd_dist.storage.append import AppendResult, append_steps, rollback

Reader = Callable[[Path, IngestOptions, IngestProgress], SourceData]
READERS: dict[str, Reader] = {
    "csv": read_wide_csv,
    "npy": read_npy,
    "npz": read_npz,
    "hdf5": read_hdf5,
    "zarr": read_zarr,
}


@dataclass(frozen=True)
class IngestResult:
    """What ``ingest`` wrote.

    Attributes:
        path: the store.
        name: dataset name.
        format: the source format.
        shape: ``(steps, nodes, channels)``.
        channels: channel names.
        freq: time step.
        start, end: first and last timestamp.
        missing_fraction: fraction of readings not observed.
        nonfinite_count: NaN/inf (or empty) readings, masked.
        masked_missing_value_count: readings equal to ``--missing-value``, masked.
        fingerprint: content fingerprint of the store.
        adjacency_kind: how the graph was given (None: no graph).
        edges: non-zero adjacency entries (0 without a graph).
        skipped_edges: edge-list rows naming nodes not in the data.
    """

    path: Location
    name: str
    format: str
    shape: tuple[int, int, int]
    channels: list[str]
    freq: str
    start: pd.Timestamp
    end: pd.Timestamp
    missing_fraction: float
    nonfinite_count: int
    masked_missing_value_count: int
    fingerprint: str
    adjacency_kind: str | None
    edges: int
    skipped_edges: int


def _channel_names(options: IngestOptions, data: SourceData, count: int) -> list[str]:
    if options.channels is not None:
        names = [c.strip() for c in options.channels]
        if len(names) != count:
            raise InputError(
                f"{len(names)} names ({','.join(names)}) for {count} channel(s) in the data: "
                "give one name per channel",
                where="--channels",
            )
        return names
    if data.channels is not None:
        check_unique(data.channels, "channel coordinate", "channel names")
        return list(data.channels)
    return [f"c{i}" for i in range(count)] if data.has_channel_axis else ["value"]


def _node_ids(options: IngestOptions, data: SourceData, count: int, where: str) -> list[str]:
    if options.node_ids is not None:
        ids = read_id_list(options.node_ids)
        if len(ids) != count:
            raise InputError(
                f"{len(ids)} ids for {count} nodes in the data: give one id per node",
                where=str(options.node_ids),
            )
        return ids
    if data.node_ids is None:
        return [str(i) for i in range(count)]
    if any(not n for n in data.node_ids):
        raise InputError("a node id is empty", where=where)
    check_unique(data.node_ids, where)
    return list(data.node_ids)


def mask_readings(
    values: da.Array, missing_value: float | None
) -> tuple[da.Array, da.Array, da.Array]:
    """``(mask, nonfinite, equal_to_missing)`` lazily, all ``[time, node, channel]`` bool."""
    finite = da.isfinite(values)
    if missing_value is None:
        equal = da.zeros(values.shape, dtype=bool, chunks=values.chunks)
    else:
        # compare in the source's dtype: 0.1 as float32 is not 0.1 as float64
        sentinel = values.dtype.type(missing_value)
        equal = finite & (values == sentinel)
    return finite & ~equal, ~finite, equal


def _chunks(shape: tuple[int, int, int], chunk_steps: int | None) -> tuple[int, int, int]:
    base = choose_chunks(*shape)
    if chunk_steps is None:
        return base
    return (min(chunk_steps, shape[0]), base[1], base[2])


def _provenance(source: Path, fmt: str, data: SourceData, extra: Sequence[tuple[str, Path]]) -> str:
    parts = [f"ingested with stkd ingest from {source.name} ({fmt}, {data.note})"]
    parts += [f"{what} from {path.name}" for what, path in extra]
    return "; ".join(parts)


def ingest(options: IngestOptions, progress: IngestProgress | None = None) -> IngestResult:
    """Convert ``options.source`` into a canonical store (see the module docstring).

    The source is a file of this machine, so its Dask graphs run on the threaded scheduler even
    in a process connected to a Ray cluster (:func:`stkd_dist.compute.local_sources`).

    Raises:
        StkdError: any problem with the inputs or the destination; nothing is left at the
            destination then.
    """
    with local_sources():
        return _ingest(options, progress)


def append(options: IngestOptions, progress: IngestProgress | None = None) -> AppendResult:
    """Append ``options.source``'s steps to the existing store ``options.destination()``.

    The source is read as :func:`ingest` reads it; without timestamps (or ``start``) its steps
    continue right after the store's last. Graph, locations and chunking are the store's, so
    ``adjacency``, ``locations``, ``node_ids`` files, ``chunk_steps``, ``overwrite`` and
    ``provenance`` are refused. See :mod:`stkd_dist.storage.append` for the rules and why a
    killed append leaves the store as it was.

    Raises:
        StkdError: bad options, a source that does not continue the store, or storage errors;
            the store is unchanged then.
    """
    with local_sources():
        return _append(options, progress or IngestProgress())


def _append(options: IngestOptions, progress: IngestProgress) -> AppendResult:
    for option, given in (
        ("--adjacency", options.adjacency),
        ("--locations", options.locations),
        ("--node-ids", options.node_ids),
        ("--chunk-steps", options.chunk_steps),
        ("--provenance", options.provenance),
    ):
        if given is not None:
            raise InputError(
                "an append keeps the store's graph, locations, ids, chunks and provenance: "
                f"drop {option}",
                where=option,
            )
    if options.overwrite:
        raise InputError("--append adds to a store, --overwrite replaces it: give one", "--append")
    source = Path(options.source).expanduser()
    require_file(source, directory_ok=True)
    where = str(source)
    dest = options.destination()
    progress.start(f"opening {dest.name}")
    with storage_errors(dest):
        if not exists(dest):
            raise StoreError(
                "no such store to append to: ingest the first steps without --append",
                where=url(dest),
            )
        rolled_back = rollback(dest)  # an append killed earlier is undone before anything else
    store = open_store(dest)
    fmt = detect_format(source, options.format)
    options.check_format_options(fmt)
    try:
        data = READERS[fmt](source, options, progress)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror or e}", where=where) from e
    steps, nodes, channels = data.values.shape
    node_ids = _node_ids(options, data, nodes, where)
    channel_names = _channel_names(options, data, channels)
    start = options.start
    if start is None and data.time is None:
        # no timestamps: the steps continue the store
        start = str(store.time[-1] + pd.tseries.frequencies.to_offset(store.freq))
    freq = options.freq or (store.freq if data.time is None else None)
    time, freq = build_time_axis(data.time, steps, freq, start, where)
    progress.start("counting missing readings")
    mask, nonfinite, equal = mask_readings(data.values, options.missing_value)
    nonfinite_count, equal_count = (int(n) for n in compute(nonfinite.sum(), equal.sum()))
    progress.start("hashing the source file")
    digest = sha256_path(source)
    progress.start(f"appending {steps} steps to {dest.name}")
    result = append_steps(
        dest,
        data.values,
        mask,
        time,
        node_ids,
        channel_names,
        freq,
        where,
        source={"name": source.name, "sha256": digest},
        counts={"nonfinite_count": nonfinite_count, "masked_missing_value_count": equal_count},
    )
    return dataclasses.replace(result, rolled_back=rolled_back or result.rolled_back)


def _ingest(options: IngestOptions, progress: IngestProgress | None) -> IngestResult:
    progress = progress or IngestProgress()
    source = Path(options.source).expanduser()
    require_file(source, directory_ok=True)
    # fail on a mistyped side file before spending time on the data
    for option, side in (
        ("--adjacency", options.adjacency),
        ("--locations", options.locations),
        ("--node-ids", options.node_ids),
    ):
        if side is not None:
            require_file(Path(side).expanduser(), option)
    where = str(source)
    dest = options.destination()
    with storage_errors(dest):
        dest_exists = exists(dest)
    if dest_exists and not options.overwrite:
        raise StoreError("destination exists (pass --overwrite to replace it)", where=url(dest))
    if dest_exists and not is_remote(dest) and as_path(dest).resolve() == source.resolve():
        raise StoreError("the destination is the source itself; choose another --out", url(dest))
    fmt = detect_format(source, options.format)
    options.check_format_options(fmt)

    if source.is_dir() != (fmt == "zarr"):
        raise InputError(
            f"{'a directory' if source.is_dir() else 'a file'} cannot be read as {fmt}", where
        )
    try:
        data = READERS[fmt](source, options, progress)
    except OSError as e:  # unreadable (permissions, I/O error): a problem the user can fix
        raise InputError(f"cannot read: {e.strerror or e}", where=where) from e
    steps, nodes, channels = data.values.shape
    if steps < 2:
        raise InputError(f"the series has {steps} time step(s); at least 2 are needed", where)
    node_ids = _node_ids(options, data, nodes, where)
    channel_names = _channel_names(options, data, channels)
    time, freq = build_time_axis(data.time, steps, options.freq, options.start, where)

    extra: list[tuple[str, Path]] = []
    adjacency: Adjacency | None = None
    if options.adjacency is not None:
        progress.start(f"loading graph {Path(options.adjacency).name}")
        adjacency = load_adjacency(Path(options.adjacency).expanduser(), node_ids)
        extra.append(("adjacency", Path(options.adjacency)))
    locations = None
    if options.locations is not None:
        locations = load_locations(Path(options.locations).expanduser(), node_ids)
        extra.append(("locations", Path(options.locations)))
    if options.node_ids is not None:
        extra.append(("node ids", Path(options.node_ids)))

    progress.start("counting missing readings")
    mask, nonfinite, equal = mask_readings(data.values, options.missing_value)
    nonfinite_count, equal_count = (int(n) for n in compute(nonfinite.sum(), equal.sum()))

    progress.start("hashing source files")
    sources = tuple(
        SourceFile(name=p.name, sha256=sha256_path(p.expanduser()))
        for p in [source, *(p for _, p in extra)]
    )
    meta = StoreMeta(
        name=options.dataset_name(),
        time=time,
        node_ids=node_ids,
        channels=channel_names,
        freq=freq,
        adjacency=None if adjacency is None else adjacency.matrix,
        sources=sources,
        provenance=options.provenance or _provenance(source, fmt, data, extra),
        locations=locations,
        extra_attrs={
            "nonfinite_count": nonfinite_count,
            "masked_missing_value_count": equal_count,
            "missing_value": options.missing_value,
            "source_format": fmt,
            "adjacency_kind": None if adjacency is None else adjacency.kind,
            "adjacency_skipped_edges": 0 if adjacency is None else adjacency.skipped_edges,
        },
    )
    progress.start(f"writing {dest.name}")
    write_store(
        dest,
        data.values,
        mask,
        meta,
        overwrite=options.overwrite,
        chunks=_chunks((steps, nodes, channels), options.chunk_steps),
    )
    store = open_store(dest)
    return IngestResult(
        path=dest,
        name=meta.name,
        format=fmt,
        shape=store.shape,
        channels=channel_names,
        freq=freq,
        start=time[0],
        end=time[-1],
        missing_fraction=float(store.attrs["missing_fraction"]),
        nonfinite_count=nonfinite_count,
        masked_missing_value_count=equal_count,
        fingerprint=store.fingerprint,
        adjacency_kind=None if adjacency is None else adjacency.kind,
        edges=0 if adjacency is None else int(np.count_nonzero(adjacency.matrix)),
        skipped_edges=0 if adjacency is None else adjacency.skipped_edges,
    )
