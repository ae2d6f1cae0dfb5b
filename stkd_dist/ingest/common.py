"""Options, the reader contract and small utilities shared by every ingest format.

A reader turns one source file into a :class:`SourceData`: a lazy ``[time, node, channel]`` Dask
array of raw readings plus whatever names the source carries (sensor ids, timestamps, channel
names). Everything format-independent (missing values, time axis, graph, locations, hashing, the
atomic write) happens once in :mod:`stkd_dist.ingest.pipeline`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import pandas as pd
from pandas.tseries.frequencies import to_offset

from stkd_dist.errors import ConfigError, InputError
from stkd_dist.location import Location, PathInput, location
from stkd_dist.paths import check_name, dataset_path

FORMATS = ("csv", "npy", "npz", "hdf5", "zarr")
DEFAULT_FREQ = "5min"
DEFAULT_START = "2000-01-01 00:00"


@dataclass(frozen=True)
class IngestOptions:
    """What to ingest and how (the options of ``stkd ingest``).

    Attributes:
        source: the data file (or ``.zarr`` directory).
        out: destination store; default ``<storage root>/datasets/<name>.zarr``.
        name: dataset name; default the stem of ``out``.
        format: one of :data:`FORMATS`; default detected from the file.
        overwrite: replace an existing store at the destination.
        freq: time step (pandas frequency); default inferred from source timestamps, else 5min.
        start: timestamp of step 0; when given it replaces the source's timestamps.
        channels: channel names (count must match the data).
        missing_value: readings equal to it are masked (0 in PeMS / METR-LA means "no reading").
        adjacency: dense NxN CSV, edge-list CSV ``from,to,cost`` or DCRNN ``adj_mx.pkl``.
        locations: CSV with ``sensor_id,latitude,longitude`` columns.
        node_ids: text file with one sensor id per line (replaces the source's ids).
        npz_key: array to read from an ``.npz``.
        hdf_key: frame to read from an HDF5 file.
        variable: data variable to read from a Zarr dataset.
        provenance: licence / provenance text; default a line naming the source files.
        chunk_steps: time steps per chunk of the store; default chosen by size.
        storage: storage root override (default ``$STKD_STORAGE`` or ``./storage``).
    """

    source: Path
    out: PathInput | None = None
    name: str | None = None
    format: str | None = None
    overwrite: bool = False
    freq: str | None = None
    start: str | None = None
    channels: tuple[str, ...] | None = None
    missing_value: float | None = None
    adjacency: Path | None = None
    locations: Path | None = None
    node_ids: Path | None = None
    npz_key: str | None = None
    hdf_key: str | None = None
    variable: str | None = None
    provenance: str | None = None
    chunk_steps: int | None = None
    storage: Path | None = None

    def __post_init__(self) -> None:
        if self.out is None and self.name is None:
            raise ConfigError("give the destination as --out STORE or --name NAME", where="--name")
        if self.name is not None:
            check_name(self.name)
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(
                f"unknown format {self.format!r}; known: {', '.join(FORMATS)}", where="--format"
            )
        if self.freq is not None:
            parse_freq(self.freq)
        if self.start is not None:
            parse_timestamp(self.start, "--start")
        if self.channels is not None:
            names = [c.strip() for c in self.channels]
            if not names or any(not c for c in names):
                raise ConfigError("channel names must be non-empty", where="--channels")
            check_unique(names, "--channels", "channel names")
        if self.chunk_steps is not None and self.chunk_steps < 1:
            raise ConfigError(f"must be >= 1, got {self.chunk_steps}", where="--chunk-steps")
        if self.format is not None:
            self.check_format_options(self.format)

    def check_format_options(self, fmt: str) -> None:
        """Raise when an option of another format is given (it would silently do nothing)."""
        for option, value, owner in (
            ("--npz-key", self.npz_key, "npz"),
            ("--hdf-key", self.hdf_key, "hdf5"),
            ("--variable", self.variable, "zarr"),
        ):
            if value is not None and fmt != owner:
                raise ConfigError(f"only applies to {owner} sources, not {fmt}", where=option)

    def destination(self) -> Location:
        """The store to create: ``out``, else ``<storage root>/datasets/<name>.zarr``."""
        if self.out is not None:
            return location(self.out)
        assert self.name is not None  # checked in __post_init__
        return dataset_path(self.name, self.storage)

    def dataset_name(self) -> str:
        """``name``, else the stem of ``out``."""
        if self.name is not None:
            return self.name
        return self.destination().name.removesuffix(".zarr")


@dataclass(frozen=True)
class SourceData:
    """What a reader found in a source.

    Attributes:
        values: ``[time, node, channel]`` raw readings (any real dtype; NaN/inf allowed).
        node_ids: one id per node, or None when the source has no names.
        time: one timestamp per step, or None when the source has no time axis.
        channels: channel names from the source, or None.
        has_channel_axis: the source itself is 3-D (default names ``c0..``, else ``value``).
        note: what was read, for the provenance line (e.g. ``"key /df"``).
    """

    values: da.Array
    node_ids: list[str] | None = None
    time: pd.DatetimeIndex | None = None
    channels: list[str] | None = None
    has_channel_axis: bool = False
    note: str = ""


class IngestProgress:
    """Progress of the ingest steps; this base class shows nothing.

    ``start`` begins a step (``total`` in the step's units, None when unknown), ``advance`` moves it.
    """

    def start(self, description: str, total: int | None = None) -> None:
        """Begin a step."""

    def advance(self, amount: int) -> None:
        """Move the current step forward by ``amount`` units."""


def require_file(path: Path, option: str | None = None, directory_ok: bool = False) -> Path:
    """Check that ``path`` exists (a file, or also a directory when ``directory_ok``)."""
    given = f" (given as {option})" if option else ""
    if not path.exists():
        raise InputError(f"no such file{given}", where=str(path))
    if path.is_dir() and not directory_ok:
        raise InputError(f"is a directory, expected a file{given}", where=str(path))
    return path


def check_unique(ids: Sequence[str], where: str, what: str = "sensor ids") -> None:
    """Raise naming the duplicated ids when ``ids`` has repeats."""
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:10])
        more = f" and {len(dupes) - 10} more" if len(dupes) > 10 else ""
        raise InputError(f"duplicate {what}: {shown}{more}; each must be unique", where=where)


def format_missing(ids: Sequence[str], limit: int = 10) -> str:
    """``'a', 'b', ... and N more`` for error messages listing ids."""
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def parse_freq(freq: str) -> str:
    """Normalise a pandas frequency string (``"5min"``, ``"h"``); raise ConfigError if invalid."""
    try:
        return to_offset(freq).freqstr
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{freq!r} is not a pandas frequency (e.g. 5min, 15min, h, D): {e}", where="--freq"
        ) from e


def parse_timestamp(text: str, where: str) -> pd.Timestamp:
    """Parse a timestamp option; raise ConfigError naming the option if invalid."""
    try:
        ts = pd.Timestamp(text)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{text!r} is not a timestamp (e.g. 2012-03-01 00:00)", where=where
        ) from e
    if ts is pd.NaT:
        raise ConfigError(f"{text!r} is not a timestamp", where=where)
    return ts


def read_id_list(path: Path) -> list[str]:
    """Ids from a text file, one per line (blank lines ignored); duplicates raise."""
    require_file(path, "--node-ids")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason})", where=str(path)) from e
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise InputError("no ids in the file (expected one sensor id per line)", where=str(path))
    check_unique(ids, str(path))
    return ids


def sha256_path(path: Path) -> str:
    """sha256 of a file (read in blocks), or of a directory tree (relative paths and contents).

    A directory (a Zarr source) hashes each file's relative path and digest in sorted order, so
    the result does not depend on the order the filesystem lists them in.
    """
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode())
            h.update(b"\0")
            h.update(sha256_path(f).encode())
        return h.hexdigest()
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
