"""``stkd jobs``: list the jobs of a Ray cluster."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from rich.console import Console
from rich.table import Table

from stkd_dist.commands import SUMMARIES
from stkd_dist.commands.submit import add_address_argument
from stkd_dist.ops.jobs import JobsClient, JobSummary

EPILOG = """\
examples:
  stkd jobs                                  # the local cluster (http://127.0.0.1:8265)
  stkd jobs --address http://head:8265 --json

Jobs are listed oldest first with their submission id (what `stkd logs` and `stkd stop` take),
status, entrypoint and start/end times (local time).
"""

_STYLES = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``jobs`` parser."""
    p = subparsers.add_parser(
        "jobs",
        help=SUMMARIES["jobs"],
        description="List every job a Ray cluster knows (running and finished).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_address_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the jobs as a table (or JSON)."""
    client = JobsClient(args.address)
    jobs = client.list_jobs()
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=2))
        return 0
    console = Console()
    if not jobs:
        console.print(f"no jobs on {client.address}")
        return 0
    console.print(jobs_table(jobs, client.address))
    return 0


def jobs_table(jobs: list[JobSummary], address: str) -> Table:
    """A rich table of ``jobs``."""
    table = Table(title=f"jobs on {address}", title_justify="left")
    for name in ("id", "status", "entrypoint", "start", "end"):
        table.add_column(name, overflow="fold")
    for job in jobs:
        style = _STYLES.get(job.status, "")
        table.add_row(
            job.job_id,
            f"[{style}]{job.status}[/]" if style else job.status,
            job.entrypoint,
            _time(job.start_time),
            _time(job.end_time),
        )
    return table


def _time(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
