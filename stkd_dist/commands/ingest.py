"""``stkd ingest``: convert a real dataset into the canonical store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from stkd_dist.commands import SUMMARIES
from stkd_dist.ingest import FORMATS, IngestOptions, IngestProgress, IngestResult, append, ingest
from stkd_dist.storage.append import AppendResult

EPILOG = """\
examples:
  # Los-loop: wide CSV (header = sensor ids) + dense NxN adjacency CSV
  stkd ingest los_speed.csv --adjacency los_adj.csv --name los --freq 5min

  # the same speeds with the METR-LA graph (reordered by sensor id) and sensor locations
  stkd ingest los_speed.csv --adjacency adj_mx.pkl --locations graph_sensor_locations.csv --name los-metr

  # PeMS: [time, node, channel] .npy + from,to,cost distances (Gaussian kernel weights)
  stkd ingest PEMS08.npy --adjacency distance.csv --channels flow,occupancy,speed \\
      --missing-value 0 --start "2016-07-01 00:00" --name pems08

  # METR-LA: pandas HDF5 frame (DatetimeIndex x sensors) + DCRNN adj_mx.pkl
  stkd ingest metr-la.h5 --adjacency adj_mx.pkl --missing-value 0 --name metr-la

  # an xarray Zarr dataset with dims time/node[/channel] in any order
  stkd ingest traffic.zarr --variable speed --out stores/traffic.zarr

  # a new day of PeMS readings, appended to the store (its steps follow the store's last)
  stkd ingest PEMS08-day2.npy --append --name pems08 --missing-value 0

Readings that are NaN/inf/empty, or equal to --missing-value, are masked (not observed).
The store is written under a temporary name and renamed when complete: a failed ingest leaves
nothing at the destination. --append checks the new steps first (overlap, gap, other nodes or
channels are refused) and marks the store while it writes, so a killed append is rolled back by
the next one and readers never see half of it; the previous fingerprints are kept in the store's
fingerprint_history.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ingest`` parser."""
    p = subparsers.add_parser(
        "ingest",
        help=SUMMARIES["ingest"],
        description=(
            "Convert a dataset file into the canonical Zarr store (values, mask, time axis,\n"
            "sensor ids, graph, locations, provenance). The format is detected from the file's\n"
            "extension and first bytes, or given with --format."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="SOURCE", help="data file (or .zarr directory)")
    dest = p.add_argument_group("destination")
    dest.add_argument(
        "--out",
        metavar="STORE",
        help="store path (default <storage>/datasets/NAME.zarr)",
    )
    dest.add_argument("--name", metavar="NAME", help="dataset name (default: the stem of --out)")
    dest.add_argument("--overwrite", action="store_true", help="replace an existing store")
    dest.add_argument(
        "--append",
        action="store_true",
        help="add the source's steps to the end of an existing store (same nodes and channels, "
        "the next time step on; without timestamps they continue the store)",
    )
    src = p.add_argument_group("source")
    src.add_argument("--format", choices=FORMATS, help="source format (default: detected)")
    src.add_argument(
        "--npz-key", metavar="KEY", help="array of an .npz (default: 'data' or the only one)"
    )
    src.add_argument("--hdf-key", metavar="KEY", help="key of an HDF5 file (default: the only one)")
    src.add_argument(
        "--variable", metavar="NAME", help="data variable of a Zarr dataset (default: the only one)"
    )
    src.add_argument(
        "--node-ids", type=Path, metavar="FILE", help="text file, one sensor id per line"
    )
    src.add_argument(
        "--channels",
        metavar="NAMES",
        help="comma-separated channel names, e.g. flow,occupancy,speed",
    )
    src.add_argument(
        "--missing-value",
        type=float,
        metavar="X",
        help="readings equal to X are masked (0 means 'no reading' in PeMS and METR-LA)",
    )
    time = p.add_argument_group("time axis")
    time.add_argument(
        "--freq", metavar="FREQ", help="time step, e.g. 5min (default: from timestamps, else 5min)"
    )
    time.add_argument(
        "--start",
        metavar="TIMESTAMP",
        help="timestamp of step 0; replaces source timestamps (default 2000-01-01 00:00)",
    )
    extra = p.add_argument_group("graph and metadata")
    extra.add_argument(
        "--adjacency",
        type=Path,
        metavar="FILE",
        help="headerless NxN CSV, edge-list CSV from,to,cost, or DCRNN adj_mx.pkl",
    )
    extra.add_argument(
        "--locations", type=Path, metavar="CSV", help="CSV with sensor_id,latitude,longitude"
    )
    extra.add_argument(
        "--provenance", metavar="TEXT", help="licence / provenance text (default: names the files)"
    )
    extra.add_argument(
        "--chunk-steps", type=int, metavar="N", help="time steps per chunk (default: by size)"
    )
    p.set_defaults(func=run)


class _RichProgress(IngestProgress):
    """One rich progress line per step on a terminal; plain step lines otherwise (logs)."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self._progress = progress
        self._console = console
        self._task: TaskID | None = None

    def start(self, description: str, total: int | None = None) -> None:
        if not self._console.is_terminal:
            print(f"stkd ingest: {description}", file=sys.stderr, flush=True)
            return
        if self._task is None:
            self._task = self._progress.add_task(description, total=total)
        else:
            self._progress.reset(self._task, description=description, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)


def _options(args: argparse.Namespace) -> IngestOptions:
    channels = None
    if args.channels is not None:
        channels = tuple(c.strip() for c in args.channels.split(","))
    return IngestOptions(
        source=args.source,
        out=args.out,
        name=args.name,
        format=args.format,
        overwrite=args.overwrite,
        freq=args.freq,
        start=args.start,
        channels=channels,
        missing_value=args.missing_value,
        adjacency=args.adjacency,
        locations=args.locations,
        node_ids=args.node_ids,
        npz_key=args.npz_key,
        hdf_key=args.hdf_key,
        variable=args.variable,
        provenance=args.provenance,
        chunk_steps=args.chunk_steps,
    )


def _summary(r: IngestResult) -> str:
    steps, nodes, channels = r.shape
    graph = (
        f"{nodes}x{nodes}, {r.edges} non-zero ({r.adjacency_kind}"
        + (f", {r.skipped_edges} edges to unknown nodes skipped" if r.skipped_edges else "")
        + ")"
        if r.adjacency_kind
        else "none"
    )
    return "\n".join(
        [
            f"ingested {r.format} as {r.name!r}: {r.path}",
            f"  shape        {steps} steps x {nodes} nodes x {channels} channel(s) "
            f"({', '.join(r.channels)})",
            f"  time         {r.start} .. {r.end} every {r.freq}",
            f"  missing      {r.missing_fraction:.2%} (non-finite {r.nonfinite_count}, "
            f"equal to --missing-value {r.masked_missing_value_count})",
            f"  graph        {graph}",
            f"  fingerprint  {r.fingerprint}",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """Run ``stkd ingest``; user errors propagate as StkdError to the CLI."""
    options = _options(args)
    console = Console(stderr=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        if args.append:
            appended = append(options, _RichProgress(bar, console))
        else:
            result = ingest(options, _RichProgress(bar, console))
    print(_appended(appended) if args.append else _summary(result))
    return 0


def _appended(r: AppendResult) -> str:
    lines = [
        f"appended {r.steps_added} steps to {r.path}",
        f"  steps        {r.steps_before} -> {r.steps_before + r.steps_added}",
        f"  new time     {r.start} .. {r.end}",
        f"  fingerprint  {r.fingerprint} (was {r.previous_fingerprint}, kept in "
        "fingerprint_history)",
    ]
    if r.rolled_back:
        lines.insert(1, "  an interrupted earlier append was rolled back first")
    return "\n".join(lines)
