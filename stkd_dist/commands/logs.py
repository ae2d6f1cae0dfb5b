"""``stkd logs``: print (or follow) the output of a job on a Ray cluster."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands.submit import add_address_argument
from stkd_dist.ops.jobs import JobsClient

EPILOG = """\
examples:
  stkd logs raysubmit_XyZ123                 # everything the job printed so far
  stkd logs nightly-7 --follow               # stream until it ends; exit with its status
  stkd logs nightly-7 --address http://head:8265
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``logs`` parser."""
    p = subparsers.add_parser(
        "logs",
        help=SUMMARIES["logs"],
        description="Print the output of a job on a Ray cluster, or follow it until it ends.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_id", metavar="ID", help="job (submission) id, as `stkd jobs` lists it")
    add_address_argument(p)
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream new output until the job ends, then exit with its status",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the logs; with ``--follow`` return the job's exit status."""
    client = JobsClient(args.address)
    if not args.follow:
        sys.stdout.write(client.logs(args.job_id))
        sys.stdout.flush()
        return 0
    try:
        job = client.follow(args.job_id, _write)
    except KeyboardInterrupt:
        return 130
    Console(stderr=True, highlight=False).print(f"job {job.job_id} {job.status}")
    return job.exit_status()


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()
