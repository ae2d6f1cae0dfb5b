"""``stkd precompute-labels``: run a teacher once over a dataset and store its soft labels."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from stkd_dist.commands import SUMMARIES
from stkd_dist.data.windows import SPLITS, check_split_name
from stkd_dist.errors import InputError, StoreError
from stkd_dist.serving.cache import default_cache_path
from stkd_dist.serving.precompute import precompute_labels
from stkd_dist.serving.teacher import load_teacher

EPILOG = """\
examples:
  # every split, into <storage>/labels/<dataset fingerprint>/<teacher version>.zarr
  stkd precompute-labels --checkpoint my-run --data demo

  # only the training windows, to a chosen path
  stkd precompute-labels --checkpoint runs/my-run/teacher/epoch_0009 --data demo \\
      --splits train --out labels/demo-teacher.zarr

`stkd serve --cache auto` then serves these labels without running the teacher. The cache is
written under a temporary name and renamed when complete.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``precompute-labels`` parser."""
    p = subparsers.add_parser(
        "precompute-labels",
        help=SUMMARIES["precompute-labels"],
        description=(
            "Run the teacher of a checkpoint on every window of the chosen splits of its dataset "
            "and store the outputs in a Zarr label cache keyed by dataset fingerprint and "
            "teacher version, for `stkd serve --cache`."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="teacher checkpoint, run dir or run name")
    p.add_argument("--data", required=True, help="the teacher's dataset (store path or name)")
    p.add_argument(
        "--splits", default=",".join(SPLITS), help="comma-separated splits (default all)"
    )
    p.add_argument("--out", type=Path, help="cache path (default under <storage>/labels)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.set_defaults(func=run)


def _splits(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError("name at least one split", where="--splits")
    for name in names:
        check_split_name(name)
    if len(set(names)) != len(names):
        raise InputError(f"a split is listed twice: {text}", where="--splits")
    return names


def run(args: argparse.Namespace) -> int:
    """Run ``stkd precompute-labels``."""
    splits = _splits(args.splits)
    if args.batch_size < 1:
        raise InputError(f"must be >= 1, got {args.batch_size}", where="--batch-size")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_teacher(args.checkpoint, args.data)
    meta = teacher.meta
    out = args.out or default_cache_path(meta.fingerprint, meta.version)
    if out.exists() and not args.overwrite:
        raise StoreError(
            "a label cache exists there; pass --overwrite to replace it", where=str(out)
        )
    total = sum(len(meta.splits[s]) for s in splits)
    console = Console(stderr=True)
    print(
        f"stkd precompute-labels: teacher {meta.version} on {total} windows "
        f"({', '.join(f'{s} {len(meta.splits[s])}' for s in splits)})",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    columns = (
        TextColumn("labels"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    done = {"windows": 0, "reported": 0}

    def status_line(n: int) -> None:
        # without a terminal (logs, CI) a line every 10 % instead of a bar
        done["windows"] += n
        if done["windows"] * 10 // max(total, 1) > done["reported"]:
            done["reported"] = done["windows"] * 10 // max(total, 1)
            print(f"stkd precompute-labels: {done['windows']}/{total} windows", file=sys.stderr)

    terminal = console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=not terminal) as bar:
        task = bar.add_task("labels", total=total)
        cache = precompute_labels(
            teacher,
            out,
            splits,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=(lambda n: bar.advance(task, n)) if terminal else status_line,
        )
    seconds = time.perf_counter() - started
    print(f"wrote label cache {cache.path}")
    print(f"  teacher        {meta.version} ({meta.model_key})")
    print(f"  dataset        {meta.fingerprint}")
    print(f"  label shape    {list(meta.window_shape)} per window, spread: {meta.has_spread}")
    for s in splits:
        print(f"  {s:<14} {cache.filled_windows(s)} windows")
    print(f"  forward passes {cache.forward_windows} windows in {seconds:.1f} s")
    return 0
