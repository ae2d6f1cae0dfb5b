"""Wide CSV sources: one row per time step, one column per sensor, a header of sensor ids.

Two passes over the file, neither holding it twice in memory:

1. a ``csv`` module scan that checks every row has as many fields as the header (pandas silently
   pads short rows with NaN, which would turn a broken file into "missing readings"), and
   remembers the physical line number of each data row for error messages;
2. a chunked ``pandas.read_csv`` that parses numbers (and an optional leading timestamp column)
   block by block into float64 arrays, which become the blocks of a Dask array.
"""

from __future__ import annotations

import bisect
import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd

from stkd_dist.errors import InputError
from stkd_dist.ingest.common import IngestOptions, IngestProgress, SourceData, check_unique

# Header names that mark the first column as the time axis ("" is an unnamed index column).
TIME_HEADERS = frozenset({"", "time", "timestamp", "date", "datetime", "time_stamp"})
# Cells per parsed block: bounds the memory of one pandas chunk (4 MiB of float64 + parser buffers).
BLOCK_CELLS = 2**19
_ENCODING = "utf-8-sig"
_REPORT_CHARS = 2**20


@dataclass
class _Scan:
    header: list[str]
    rows: int = 0
    first_row: list[str] = field(default_factory=list)
    # (data row index, physical line) at each place where line - row changes (blank lines,
    # quoted line breaks); line_of() interpolates between them
    breaks: list[tuple[int, int]] = field(default_factory=list)

    def line_of(self, row: int) -> int:
        """Physical (1-based) line number of data row ``row`` (0-based)."""
        i = bisect.bisect_right(self.breaks, (row, float("inf"))) - 1
        start_row, start_line = self.breaks[i]
        return start_line + (row - start_row)


def _scan(path: Path, progress: IngestProgress) -> _Scan:
    """Check the shape of every row; count rows; remember line numbers."""
    where = str(path)
    progress.start(f"checking rows of {path.name}", total=path.stat().st_size)
    try:
        with path.open(newline="", encoding=_ENCODING) as f:
            reader = csv.reader(_counted(f, progress))
            header: list[str] | None = None
            scan: _Scan | None = None
            for row in reader:
                if not row:  # blank line: pandas skips these too
                    continue
                if header is None:
                    header = row
                    scan = _Scan(header=[h.strip() for h in row])
                    continue
                assert scan is not None
                if len(row) != len(header):
                    raise InputError(
                        f"line {reader.line_num} has {len(row)} fields but the header has "
                        f"{len(header)}: every row needs one value per column (ragged CSV)",
                        where=where,
                    )
                if scan.rows == 0:
                    scan.first_row = row
                line = reader.line_num
                if not scan.breaks or scan.line_of(scan.rows) != line:
                    scan.breaks.append((scan.rows, line))
                scan.rows += 1
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text ({e.reason} at byte {e.start})", where=where) from e
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", where=where) from e
    if scan is None:
        raise InputError("empty file: expected a header of sensor ids", where=where)
    return scan


def _counted(lines: Iterable[str], progress: IngestProgress) -> Iterator[str]:
    # characters ~ bytes for the ASCII of numeric CSVs: good enough for a progress bar, reported
    # in ~1 MiB steps so that a file of millions of short lines does not update it per line
    pending = 0
    for line in lines:
        pending += len(line)
        if pending >= _REPORT_CHARS:
            progress.advance(pending)
            pending = 0
        yield line
    progress.advance(pending)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _has_time_column(scan: _Scan) -> bool:
    name = scan.header[0].lower()
    if name in TIME_HEADERS or name.startswith("unnamed:"):
        return True
    first = scan.first_row[0].strip() if scan.first_row else ""
    if not first or _is_number(first):
        return False
    # a non-numeric first cell under a sensor-like header: a timestamp column if it parses
    try:
        pd.Timestamp(first)
    except (ValueError, TypeError):
        return False
    return True


def _parse_time(col: pd.Series, scan: _Scan, offset: int, where: str) -> pd.DatetimeIndex:
    parsed = pd.to_datetime(col, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"line {scan.line_of(offset + r)}: {col.iloc[r]!r} in the time column "
            f"{scan.header[0]!r} is not a timestamp",
            where=where,
        )
    index = pd.DatetimeIndex(parsed)
    if index.tz is not None:  # the store's time axis is naive UTC
        index = index.tz_convert("UTC").tz_localize(None)
    return index


def _numeric_block(
    chunk: pd.DataFrame, sensors: list[str], scan: _Scan, offset: int, where: str
) -> np.ndarray:
    for j, col in enumerate(chunk.columns):
        series = chunk[col]
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            continue
        coerced = pd.to_numeric(series, errors="coerce")
        bad = (coerced.isna() & series.notna()).to_numpy()
        if not bad.any():
            chunk[col] = coerced
            continue
        r = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"line {scan.line_of(offset + r)}, column {sensors[j]!r}: {series.iloc[r]!r} is not "
            "a number (readings must be numeric; leave the cell empty for a missing reading)",
            where=where,
        )
    return chunk.to_numpy(dtype=np.float64)  # [rows, node]


def read_wide_csv(path: Path, options: IngestOptions, progress: IngestProgress) -> SourceData:
    """Read a wide CSV (header = sensor ids, optional leading timestamp column)."""
    where = str(path)
    scan = _scan(path, progress)
    has_time = _has_time_column(scan)
    sensors = scan.header[1:] if has_time else scan.header
    if not sensors:
        raise InputError("no sensor columns (the header names only the time column)", where=where)
    empty = [j + 1 + has_time for j, s in enumerate(sensors) if not s]
    if empty:
        raise InputError(f"column {empty[0]} has an empty sensor id in the header", where=where)
    check_unique(sensors, where, "sensor ids in the header")
    # internal column names: pandas would rename "" and duplicate-looking headers
    names = (["__time__"] if has_time else []) + [f"c{j}" for j in range(len(sensors))]

    blocks: list[da.Array] = []
    times: list[pd.DatetimeIndex] = []
    rows_per_block = max(64, BLOCK_CELLS // len(names))
    progress.start(f"parsing {path.name}", total=scan.rows)
    offset = 0
    with pd.read_csv(
        path,
        header=0,
        names=names,
        chunksize=rows_per_block,
        encoding=_ENCODING,
        dtype={"__time__": str} if has_time else None,
        skip_blank_lines=True,
    ) as reader:
        for chunk in reader:
            if has_time:
                times.append(_parse_time(chunk.pop("__time__"), scan, offset, where))
            block = _numeric_block(chunk, sensors, scan, offset, where)
            blocks.append(da.from_array(block[:, :, None], chunks=(*block.shape, 1)))
            offset += len(chunk)
            progress.advance(len(chunk))
    # the scan and the parse must agree row for row, else line numbers above were wrong
    assert offset == scan.rows, (offset, scan.rows)
    if not blocks:
        raise InputError("no data rows after the header", where=where)
    values = da.concatenate(blocks, axis=0)  # [time, node, 1]
    time = times[0].append(times[1:]) if has_time else None
    return SourceData(values=values, node_ids=list(sensors), time=time, note="wide CSV")
