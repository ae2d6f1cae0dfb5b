"""``stkd synth``: generate a synthetic traffic-network dataset."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from stkd_dist.commands import SUMMARIES
from stkd_dist.location import PathInput
from stkd_dist.paths import dataset_path
from stkd_dist.storage import open_store
from stkd_dist.synth import SynthSpec, synthesize
from stkd_dist.synth.writer import BlockCallback

EPILOG = """\
examples:
  stkd synth --nodes 50 --steps 8064 --name demo            # 4 weeks at 5 min
  stkd synth --nodes 2000 --steps 500000 --name big --seed 7 # ~4.8 years, 4 GB of flows
  stkd synth --nodes 200 --steps 2016 --channels flow,occupancy,speed --out /tmp/s.zarr

The data: sensors at random in a ~22 km square (near 34.0N, 118.3W) joined into a connected road
graph (mean degree ~5, Gaussian-kernel weights); per-sensor daily and weekly demand (weekday
morning and evening peaks, weaker weekends) with AR(1) noise, diffused along the graph with a
10 min lag, so neighbours' past predicts a sensor's future; incidents that cut flow and spill
back upstream; sensor outages and sporadic missing readings (NaN, masked).
The same --seed gives the same data (and fingerprint) whatever --chunk-steps is.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` parser."""
    p = subparsers.add_parser(
        "synth",
        help=SUMMARIES["synth"],
        description=(
            "Generate a synthetic road-sensor dataset and write it as a store, block by block "
            "(memory stays bounded however many steps are asked for)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, required=True, help="number of sensors")
    p.add_argument("--steps", type=int, required=True, help="number of time steps")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--out", help="store path (default <storage>/datasets/NAME.zarr)")
    dest.add_argument("--name", help="dataset name under the storage root (default: synth)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--freq", default="5min", help="step length, 1min..1h (default 5min)")
    p.add_argument(
        "--start", default="2024-01-01 00:00", help="first timestamp (default 2024-01-01 00:00)"
    )
    p.add_argument(
        "--channels",
        default="flow",
        help="comma-separated channels from flow,occupancy,speed (default flow)",
    )
    p.add_argument("--chunk-steps", type=int, help="time steps per chunk (default: by size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=run)


@contextlib.contextmanager
def block_progress(what: str) -> Iterator[BlockCallback]:
    """A rich progress bar on stderr (plain lines when not a terminal) fed per generated block."""
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
        task = bar.add_task(f"generating {what}", total=None)
        reported = [0]

        def on_block(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if done == total:
                bar.update(task, description="fingerprint and statistics")
            # on a log, about ten lines in all
            if not console.is_terminal and (done == total or done * 10 // total > reported[0]):
                reported[0] = done * 10 // total
                print(f"stkd: generated block {done}/{total}", file=sys.stderr, flush=True)

        yield on_block


def spec_from_args(args: argparse.Namespace) -> SynthSpec:
    """The :class:`SynthSpec` of the command-line options."""
    return SynthSpec(
        nodes=args.nodes,
        steps=args.steps,
        seed=args.seed,
        freq=args.freq,
        start=args.start,
        channels=tuple(c.strip() for c in args.channels.split(",") if c.strip()),
    )


def summary(path: PathInput, seconds: float) -> str:
    """A few lines describing a freshly written synthetic store."""
    store = open_store(path)
    steps, nodes, channels = store.shape
    adj = store.adjacency()
    edges = int((adj != 0).sum() - (adj.diagonal() != 0).sum())
    return "\n".join(
        [
            f"synthesised {store.name!r}: {store.path}",
            f"  shape        {steps} steps x {nodes} nodes x {channels} channels "
            f"({', '.join(store.channels)})",
            f"  time         {store.time[0]} .. {store.time[-1]} every {store.freq}",
            f"  graph        {edges} edges (mean degree {edges / nodes:.1f})",
            f"  missing      {store.attrs['missing_fraction']:.2%}",
            f"  fingerprint  {store.fingerprint}",
            f"  took         {seconds:.1f} s",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """Run ``stkd synth``; user errors propagate as StkdError to the CLI."""
    spec = spec_from_args(args)
    dest = args.out if args.out is not None else dataset_path(args.name or "synth")
    t = time.perf_counter()
    with block_progress(f"{spec.steps} steps x {spec.nodes} nodes") as on_block:
        path = synthesize(
            spec,
            dest,
            name=args.name,
            overwrite=args.overwrite,
            chunk_steps=args.chunk_steps,
            on_block=on_block,
        )
    print(summary(path, time.perf_counter() - t))
    return 0
