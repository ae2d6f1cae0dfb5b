"""``stkd stop``: stop a job on a Ray cluster."""

from __future__ import annotations

import argparse

from rich.console import Console

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands.submit import add_address_argument
from stkd_dist.ops.jobs import JobsClient

EPILOG = """\
examples:
  stkd stop raysubmit_XyZ123
  stkd stop nightly-7 --address http://head:8265 --no-wait

Ray sends the job's driver SIGTERM, then SIGKILL after a grace period; its tasks and actors end
with it. Stopping a job that already ended changes nothing and says so.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stop`` parser."""
    p = subparsers.add_parser(
        "stop",
        help=SUMMARIES["stop"],
        description="Ask a Ray cluster to stop a job and wait until it has stopped.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job_id", metavar="ID", help="job (submission) id, as `stkd jobs` lists it")
    add_address_argument(p)
    p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the job to end (default 60)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stop the job; 0 when it ended (or had already ended), 1 when it is still running."""
    console = Console(stderr=True, highlight=False)
    client = JobsClient(args.address)
    was_running = client.stop(args.job_id)
    if not was_running:
        job = client.info(args.job_id)
        console.print(f"job {args.job_id} had already ended: {job.status}")
        return 0
    if args.no_wait:
        console.print(f"stop requested for job {args.job_id}")
        return 0
    with console.status(f"stopping job {args.job_id}"):
        job = client.wait(args.job_id, timeout=args.timeout)
    console.print(f"job {args.job_id} {job.status}")
    return 0 if job.terminal else 1
