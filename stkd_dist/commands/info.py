"""``stkd info``: what is in a dataset store."""

from __future__ import annotations

import argparse
import contextlib
import json

from rich.console import Console

from stkd_dist.commands import SUMMARIES
from stkd_dist.info import dataset_info, render_info
from stkd_dist.storage import open_store

EPILOG = """\
examples:
  stkd info demo                       # a dataset name under the storage root
  stkd info storage/datasets/los.zarr  # or a store path
  stkd info los --json | jq .missing   # one JSON object, for scripts

Reads every chunk once (with Dask) for the per-channel statistics; the training statistics are
the cached ones of the default 70/10/20 split.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` parser."""
    p = subparsers.add_parser(
        "info",
        help=SUMMARIES["info"],
        description=(
            "Describe a dataset store: shape and chunks, frequency and time range, missing "
            "fraction and statistics per channel (observed readings, plus the cached training "
            "statistics), graph size, fingerprint, provenance and source files."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store path or dataset name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``stkd info``; user errors propagate as StkdError to the CLI."""
    store = open_store(args.store)
    err = Console(stderr=True)
    # the status line goes to stderr so that `--json` output stays one clean object
    with (
        err.status(f"scanning {store.path.name} ...")
        if err.is_terminal
        else contextlib.nullcontext()
    ):
        info = dataset_info(store)
    if args.json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        Console().print(render_info(info))
    return 0
