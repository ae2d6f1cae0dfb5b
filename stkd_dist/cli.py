"""The ``stkd`` command line.

Every subcommand lives in ``stkd_dist.commands.<name>``. Errors a user can fix are printed as one
line (``stkd: error: ...``) with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from stkd_dist import __version__
from stkd_dist.errors import StkdError

# Order is the order of `stkd --help`: the data plane first, then training, serving, operations.
COMMANDS = (
    "ingest",
    "info",
    "synth",
    "plan",
    "config",
    "train-teacher",
    "train-student",
    "evaluate",
    "precompute-labels",
    "serve",
    "distill",
    "sweep",
    "demo",
    "submit",
    "jobs",
    "logs",
    "stop",
    "cluster",
)

DESCRIPTION = """\
stkd-dist: distributed knowledge distillation for spatiotemporal forecasting.

Typical flow:
  stkd synth --nodes 50 --steps 4032 --name demo       # or: stkd ingest SOURCE --name NAME
  stkd info demo                                       # shape, missing data, graph, fingerprint
  stkd plan demo --split train --world-size 2 --json   # which windows each rank reads

Datasets are given as a store path or as a name under the storage root (default ./storage, moved by
STKD_STORAGE or --storage). Run `stkd COMMAND --help` for each command's options and examples.
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="stkd",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stkd-dist {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--storage",
        default=None,
        help="storage root for datasets, labels, checkpoints and runs (default: $STKD_STORAGE or ./storage)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"stkd_dist.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stkd`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.storage:
        # one place decides the storage root for this process and the Ray workers it starts
        os.environ["STKD_STORAGE"] = args.storage
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except StkdError as e:
        if args.debug:
            raise
        print(f"stkd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("stkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
