"""``stkd submit``: run a stkd command on a Ray cluster through the Jobs API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from stkd_dist.commands import SUMMARIES
from stkd_dist.ops.jobs import JobsClient, build_entrypoint
from stkd_dist.ops.runtime_env import DEFAULT_EXCLUDES, RuntimeEnvOptions, build_runtime_env

EXCLUDED = ", ".join(DEFAULT_EXCLUDES)
EPILOG = f"""\
examples:
  stkd cluster local start                        # a head + 2 workers on this machine
  stkd submit -- distill --config run.yaml        # runs `stkd distill --config run.yaml`
  stkd submit --address http://head:8265 --runtime-env cluster/runtime_env.yaml \\
      -- train-teacher --config los-loop --workers 4
  stkd submit --no-wait --job-id nightly-7 -- sweep --config sweep.yaml
  stkd submit -- "synth --nodes 50 --steps 2016 --name d && stkd info d --json"

The job's entrypoint is `stkd` followed by everything after `--`, exactly what you would type; a
single quoted argument is shell text (for `&&`, pipes). The source of this stkd is shipped with the
job (Ray py_modules) unless --no-ship-source; --working-dir uploads a directory as the job's working
directory; --runtime-env adds any Ray runtime-env field (pip, env_vars, ...). Never uploaded:
{EXCLUDED}. STKD_STORAGE is passed to the job when set: on a
multi-node cluster it must name storage every node sees. Logs stream until the job ends and the
exit status is the job's (0 when it SUCCEEDED). Ctrl-C detaches; the job keeps running
(`stkd logs ID --follow`, `stkd stop ID`).
Token authentication: the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token (`ray get-auth-token` prints a cluster's token on its head node).
"""


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--address`` option shared by submit, jobs, logs and stop."""
    parser.add_argument(
        "--address",
        help="Jobs API (dashboard) address, http://HEAD:8265 "
        "(default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``submit`` parser."""
    p = subparsers.add_parser(
        "submit",
        help=SUMMARIES["submit"],
        description=(
            "Submit `stkd COMMAND...` to a Ray cluster through the Ray Jobs API, stream its logs "
            "until it ends and exit with its status."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_address_argument(p)
    p.add_argument("--runtime-env", type=Path, help="YAML file with a Ray runtime environment")
    p.add_argument("--working-dir", type=Path, help="upload this directory as the job's cwd")
    p.add_argument(
        "--no-ship-source",
        action="store_true",
        help="do not upload this stkd's source (the nodes' installed stkd runs)",
    )
    p.add_argument("--job-id", help="submission id to use (default: chosen by Ray)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the stkd command to run, after `--`",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Submit, then follow the job unless ``--no-wait``; return the job's exit status."""
    entrypoint = build_entrypoint(args.command)
    runtime_env = build_runtime_env(
        RuntimeEnvOptions(
            file=args.runtime_env,
            working_dir=args.working_dir,
            ship_source=not args.no_ship_source,
        )
    )
    err = Console(stderr=True, highlight=False)
    client = JobsClient(args.address)
    with err.status(f"submitting `{entrypoint}` to {client.address}"):
        job_id = client.submit(
            entrypoint, runtime_env, job_id=args.job_id, metadata={"submitted_by": "stkd"}
        )
    err.print(f"job [bold]{job_id}[/] submitted to {client.address}: {entrypoint}")
    if args.no_wait:
        print(job_id)
        err.print(
            f"follow it with `stkd logs {job_id} --follow`, stop it with `stkd stop {job_id}`"
        )
        return 0
    try:
        job = client.follow(job_id, _write)
    except KeyboardInterrupt:
        err.print(
            f"\ndetached; job {job_id} keeps running "
            f"(`stkd logs {job_id} --follow`, `stkd stop {job_id}`)"
        )
        return 130
    style = "green" if job.status == "SUCCEEDED" else "red"
    code = job.exit_status()
    # Ray's message of a failed job repeats the log tail already streamed: keep its first line
    reason = job.message.strip().splitlines()[0] if job.message.strip() else ""
    err.print(f"job {job_id} [{style}]{job.status}[/] (exit status {code}) {reason}".rstrip())
    return code


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()
