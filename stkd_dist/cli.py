"""The ``stkd`` command line.

Every subcommand lives in ``stkd_dist.commands.<name>``; only the module of the command being run
is imported (``stkd --help`` lists the others from their one-line summaries), so commands that do
not train, such as ``stkd submit`` or ``stkd config``, start without loading torch. Errors a user
can fix are printed as one line (``stkd: error: ...``) with exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from stkd_dist import __version__
from stkd_dist.commands import SUMMARIES
from stkd_dist.errors import StkdError
from stkd_dist.location import storage_error

QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "urllib3", "gcsfs", "google")

# `stkd --help` lists the commands in this order (see stkd_dist.commands.SUMMARIES).
COMMANDS = tuple(SUMMARIES)

DESCRIPTION = """\
stkd-dist: distributed knowledge distillation for spatiotemporal forecasting.

Typical flow:
  stkd synth --nodes 50 --steps 4032 --name demo       # or: stkd ingest SOURCE --name NAME
  stkd info demo                                       # shape, missing data, graph, fingerprint
  stkd plan demo --split train --world-size 2 --json   # which windows each rank reads

Datasets are given as a store path or as a name under the storage root (default ./storage, moved by
STKD_STORAGE or --storage). Run `stkd COMMAND --help` for each command's options and examples.
"""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    Args:
        only: register just this command's full parser (and import just its module); the other
            commands get a placeholder that shows their one-line summary in ``stkd --help``.
            ``None`` registers every command in full.
    """
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
        if only is None or name == only:
            module = importlib.import_module(f"stkd_dist.commands.{name.replace('-', '_')}")
            module.register(sub)
        else:
            sub.add_parser(name, help=SUMMARIES[name])
    return parser


def requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (after the global options), or None when there is none."""
    args = iter(argv)
    for arg in args:
        if arg == "--storage":
            next(args, None)  # its value
        elif arg in SUMMARIES:
            return arg
        elif not arg.startswith("-"):
            return None  # not a command: argparse reports it
    return None


# where Ray keeps the exception it wraps: a task's or actor's (RayTaskError(X).cause), a Ray Train
# run's (WorkerGroupError.worker_failures by rank, ControllerError.controller_failure) and a Train
# worker's (UserExceptionWithTraceback._base_exc); read by name, so that the CLI does not import Ray
_WRAPPED = ("cause", "controller_failure", "_base_exc")


def carried_user_error(exc: BaseException) -> StkdError | None:
    """The user error that ``exc`` is or carries, as raised where it happened; None when none.

    An error raised in a Ray task, actor or Train worker reaches the driver wrapped: a Dask task
    on Ray's scheduler raises ``RayTaskError(StoreError)``, a StoreError whose message is the
    remote traceback (the original is its ``cause``); ``trainer.fit()`` raises a
    ``WorkerGroupError`` holding each failed worker's exception. The first StkdError that is not
    such a wrapper (of the lowest rank) has the one-line message. A StkdError raised ``from``
    another is the one to show, so the causes of a StkdError are not followed.
    """
    queue: list[BaseException] = [exc]
    seen: set[int] = set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        wrapped = [
            x for x in (getattr(e, n, None) for n in _WRAPPED) if isinstance(x, BaseException)
        ]
        if isinstance(e, StkdError) and not wrapped:
            return e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            wrapped += [f for _, f in sorted(failures.items()) if isinstance(f, BaseException)]
        if e.__cause__ is not None:
            wrapped.append(e.__cause__)
        queue.extend(wrapped)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stkd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=requested_command(argv) or "")
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
    for chatty in QUIET_LOGGERS:  # object-store clients log every credential lookup at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if args.debug:
            raise
        # a StkdError, or one raised in a Ray worker and handed over wrapped; else a missing
        # bucket or denied request raised below any code that names its URL
        known = carried_user_error(e) or storage_error(
            e, where=os.environ.get("STKD_STORAGE") or "storage"
        )
        if known is None:
            raise
        print(f"stkd: error: {known}", file=sys.stderr)
        return known.exit_code
    except KeyboardInterrupt:
        print("stkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
