"""``stkd plan``: which windows each data-parallel rank reads, in which order."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from stkd_dist.commands import SUMMARIES
from stkd_dist.data.plan import ShardPlan, make_plan
from stkd_dist.data.windows import SPLITS, SplitSpec, WindowSpec, split_windows
from stkd_dist.errors import InputError
from stkd_dist.storage import open_store

EPILOG = """\
examples:
  stkd plan demo --split train --world-size 2            # per-rank summary table
  stkd plan demo --world-size 4 --epoch 3 --json | jq '.ranks[].count'
  stkd plan demo --world-size 4 --epoch 3 --json --windows | jq '.ranks[0].windows[:10]'
  stkd plan los --split test --world-size 2 --batch-size 64 --input-steps 12 --horizon 3

Blocks are runs of windows starting in one storage time chunk, put in an order shuffled per
(seed, epoch) and cut into one consecutive run per rank: every rank gets floor(n/W) or ceil(n/W)
of the n windows (a block is split where a run ends), and every window is seen exactly once per
epoch. Every rank gets the same number of batches: a rank one window short repeats its last
window once, flagged invalid so it does not count in losses or metrics (at most W-1 padding
entries per epoch). The plan is the one `stkd train-teacher` workers compute; it holds blocks
only, and each rank derives its window order from (seed, epoch, rank) as it reads.
"""

# option names for the fields library errors point at
_FLAG = {
    "input_steps": "--input-steps",
    "horizon": "--horizon",
    "stride": "--stride",
    "world_size": "--world-size",
    "batch_size": "--batch-size",
    "epoch": "--epoch",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` parser."""
    p = subparsers.add_parser(
        "plan",
        help=SUMMARIES["plan"],
        description=(
            "Print the deterministic shard plan of one epoch of a split: for every rank its "
            "blocks (chunk-aligned runs of windows), its window count (with --windows: its "
            "windows in the order it sees them), its padding and the storage chunks it reads "
            "(its blocks' chunks plus the L+H-1 halo)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store path or dataset name")
    p.add_argument("--split", default="train", choices=SPLITS, help="split (default: %(default)s)")
    p.add_argument("--world-size", type=int, default=1, metavar="W", help="ranks (default: 1)")
    p.add_argument("--epoch", type=int, default=0, metavar="E", help="epoch (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="default: 32")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="shuffle seed (default: 0)")
    p.add_argument("--input-steps", type=int, default=12, metavar="L", help="default: 12")
    p.add_argument("--horizon", type=int, default=12, metavar="H", help="default: 12")
    p.add_argument("--stride", type=int, default=1, help="steps between windows (default: 1)")
    p.add_argument(
        "--fractions",
        default="0.7,0.1,0.2",
        metavar="TRAIN,VAL,TEST",
        help="split fractions along time (default: %(default)s)",
    )
    p.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shuffle blocks and windows (default: only for the train split)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument(
        "--windows",
        action="store_true",
        help="with --json: also list every rank's windows in order (default: blocks and counts)",
    )
    p.set_defaults(func=run)


def parse_fractions(text: str) -> SplitSpec:
    """``"0.7,0.1,0.2"`` -> :class:`SplitSpec`."""
    parts = text.split(",")
    try:
        train, val, test = (float(v) for v in parts)
    except ValueError as e:
        raise InputError(
            f"expected three numbers TRAIN,VAL,TEST such as 0.7,0.1,0.2, got {text!r}",
            where="--fractions",
        ) from e
    try:
        return SplitSpec(train, val, test)
    except InputError as e:
        raise InputError(e.message, where="--fractions") from e


def _with_flag(e: InputError) -> InputError:
    return InputError(e.message, where=_FLAG.get(e.where or "", e.where))


def build_plan(args: argparse.Namespace) -> tuple[Any, WindowSpec, ShardPlan]:
    """Open the store and make the plan the arguments describe."""
    store = open_store(args.store)
    splits = parse_fractions(args.fractions)
    try:
        window = WindowSpec(args.input_steps, args.horizon, args.stride)
        plan = make_plan(
            split_windows(store.steps, window, splits, args.split),
            store.chunks[0],
            args.world_size,
            epoch=args.epoch,
            seed=args.seed,
            batch_size=args.batch_size,
            shuffle=args.split == "train" if args.shuffle is None else args.shuffle,
            split=args.split,
        )
    except InputError as e:
        raise _with_flag(e) from e
    return store, window, plan


def run(args: argparse.Namespace) -> int:
    """Run ``stkd plan``."""
    if args.windows and not args.json:
        raise InputError("lists windows in the JSON output: add --json", where="--windows")
    store, window, plan = build_plan(args)
    chunks = [r.chunks(plan.chunk_steps, window.length) for r in plan.ranks]
    if args.json:
        out = {
            "dataset": store.name,
            "fingerprint": store.fingerprint,
            "window": {
                "input_steps": window.input_steps,
                "horizon": window.horizon,
                "stride": window.stride,
            },
            **plan.to_json(windows=args.windows),
            "chunks_read": chunks,
        }
        print(json.dumps(out))
        return 0
    console = Console()
    console.print(
        f"[bold]{store.name}[/] split [bold]{plan.split}[/]: {plan.total_windows} windows "
        f"(L={window.input_steps}, H={window.horizon}, stride={window.stride}) over "
        f"{plan.world_size} rank(s); epoch {plan.epoch}, seed {plan.seed}, "
        f"{'shuffled' if plan.shuffle else 'time order'}; {plan.num_batches} batches of "
        f"{plan.batch_size} per rank; time chunks of {plan.chunk_steps} steps; "
        f"{plan.num_blocks} blocks, {plan.total_padding} padding entries"
    )
    table = Table("rank", "blocks", "windows", "padding", "chunks read", "first windows")
    for r, (shard, cs) in enumerate(zip(plan.ranks, chunks, strict=True)):
        head = ", ".join(str(w) for w in shard.windows[:6])  # derives the first block(s) only
        more = ", ..." if shard.count > 6 else ""
        table.add_row(
            str(r),
            str(len(shard.blocks)),
            str(shard.count),
            str(shard.padding),
            str(len(cs)),
            head + more,
        )
    console.print(table)
    return 0
