"""``stkd cluster``: a local multi-node Ray cluster, and a probe of any cluster's nodes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stkd_dist.commands import SUMMARIES
from stkd_dist.ops import local_cluster
from stkd_dist.ops.local_cluster import LocalClusterSpec, default_state_dir
from stkd_dist.ops.probe import probe_nodes

EPILOG = """\
examples:
  stkd cluster local start                      # head (0 CPUs) + 2 workers (1 CPU each)
  stkd cluster local start --workers 3 --cpus-per-node 2 --dashboard-port 8266
  stkd cluster local status --json
  stkd submit -- cluster probe --json           # one task on every node, as a job
  stkd cluster local stop

`local` starts a Ray head and worker nodes (separate raylets) on this machine, with the Jobs API on
http://127.0.0.1:8265 and Ray token authentication on, so that multi-node code paths (DDP workers
on different nodes, placement) run for real on one computer. Worker i offers the custom resource
stkd_worker_<i>. State and node logs are kept in $STKD_LOCAL_CLUSTER_DIR (default: a per-user
folder in the system temp dir); `stop` ends exactly the processes `start` recorded there.
cluster/local.sh is the same as `stkd cluster local`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``cluster`` parser and its subcommands."""
    p = subparsers.add_parser(
        "cluster",
        help=SUMMARIES["cluster"],
        description="Manage a local multi-node Ray cluster and check where work runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="{local,probe}", required=True)

    local = sub.add_parser(
        "local",
        help="a Ray head and worker nodes on this machine",
        description="Start, stop or inspect a Ray cluster of several nodes on this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = local.add_subparsers(dest="local_command", metavar="{start,stop,status}")
    actions.required = True

    start = actions.add_parser(
        "start",
        help="start the head and the worker nodes",
        description=(
            "Start a Ray head and worker nodes (separate raylets) on this machine and wait until "
            "every node has registered."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _state_dir_argument(start)
    start.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    start.add_argument(
        "--cpus-per-node", type=int, default=1, help="logical CPUs per worker (default 1)"
    )
    start.add_argument("--head-cpus", type=int, default=0, help="logical CPUs of the head (0)")
    start.add_argument(
        "--dashboard-port", type=int, default=8265, help="dashboard/Jobs API port (default 8265)"
    )
    start.add_argument("--port", type=int, help="GCS port of the head (default: a free port)")
    start.add_argument(
        "--object-store-mb", type=int, default=256, help="object store per node, MiB (256)"
    )
    start.add_argument(
        "--timeout", type=float, default=180.0, help="seconds each node may take (default 180)"
    )
    start.set_defaults(func=run_start)

    stop = actions.add_parser(
        "stop",
        help="stop every node that `start` recorded",
        description=(
            "Stop exactly the node processes `start` recorded (SIGTERM, then SIGKILL after the "
            "grace period) and remove Ray's private temp dir."
        ),
    )
    _state_dir_argument(stop)
    stop.add_argument(
        "--grace", type=float, default=30.0, help="seconds before SIGKILL (default 30)"
    )
    stop.add_argument("--keep-temp", action="store_true", help="keep Ray's temp dir and logs")
    stop.set_defaults(func=run_stop)

    status = actions.add_parser(
        "status",
        help="show the nodes and their processes",
        description=(
            "Show the recorded node processes and the nodes the cluster reports; exit status 0 "
            "when every node process runs, 1 otherwise."
        ),
    )
    _state_dir_argument(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=run_status)

    probe = sub.add_parser(
        "probe",
        help="run one task on every node and report where it ran",
        description=(
            "Pin one zero-CPU Ray task to every alive node of a cluster and print the node id "
            "each task reports. Run it as a job (`stkd submit -- cluster probe`) or give the "
            "cluster's GCS address."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument("--address", help="GCS address HOST:PORT (default $RAY_ADDRESS)")
    probe.add_argument("--json", action="store_true", help="print one JSON line")
    probe.set_defaults(func=run_probe)


def _state_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"state and logs folder (default $STKD_LOCAL_CLUSTER_DIR or {default_state_dir()})",
    )


def run_start(args: argparse.Namespace) -> int:
    """``stkd cluster local start``."""
    spec = LocalClusterSpec(
        workers=args.workers,
        cpus_per_node=args.cpus_per_node,
        head_cpus=args.head_cpus,
        dashboard_port=args.dashboard_port,
        gcs_port=args.port,
        object_store_mb=args.object_store_mb,
        state_dir=args.state_dir or default_state_dir(),
        timeout_s=args.timeout,
    )
    console = Console(stderr=True, highlight=False)
    with console.status("starting the local Ray cluster") as line:
        state = local_cluster.start(spec, progress=lambda msg: line.update(msg))
    console.print(
        f"local Ray cluster up: head + {spec.workers} worker node(s)\n"
        f"  Jobs API / dashboard: {state.dashboard_url}\n"
        f"  cluster (GCS) address: {state.gcs_address}\n"
        f"  submit with: stkd submit --address {state.dashboard_url} -- COMMAND\n"
        f"  stop with:   stkd cluster local stop"
        + (f" --state-dir {args.state_dir}" if args.state_dir else "")
    )
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """``stkd cluster local stop``."""
    console = Console(stderr=True, highlight=False)
    with console.status("stopping the local Ray cluster") as line:
        state = local_cluster.stop(
            args.state_dir,
            grace_s=args.grace,
            keep_temp=args.keep_temp,
            progress=lambda msg: line.update(msg),
        )
    if state is None:
        console.print("no local cluster recorded; nothing to stop")
    else:
        console.print(f"stopped the local Ray cluster ({len(state.nodes)} node(s))")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """``stkd cluster local status``: 0 when running, 1 otherwise."""
    st = local_cluster.status(args.state_dir)
    if args.json:
        print(json.dumps(st.to_json(), indent=2))
        return 0 if st.running else 1
    console = Console()
    if st.state is None:
        console.print("no local cluster running")
        return 1
    console.print(
        f"local cluster {'running' if st.running else '[red]degraded[/]'}: "
        f"Jobs API {st.state.dashboard_url}, GCS {st.state.gcs_address}"
    )
    procs = Table(title="processes", title_justify="left")
    for name in ("role", "pid", "alive", "resource", "log"):
        procs.add_column(name, overflow="fold")
    for n in st.state.nodes:
        alive = st.alive.get(n.pid, False)
        procs.add_row(
            f"{n.role} {n.index}" if n.role == "worker" else n.role,
            str(n.pid),
            "yes" if alive else "[red]no[/]",
            n.resource,
            n.log,
        )
    console.print(procs)
    if st.nodes:
        nodes = Table(title="nodes (as the cluster sees them)", title_justify="left")
        for name in ("node id", "state", "head", "CPU", "custom resources"):
            nodes.add_column(name, overflow="fold")
        for node in st.nodes:
            custom = ", ".join(
                f"{k}={v:g}"
                for k, v in sorted(node.resources.items())
                if k not in ("CPU", "memory", "object_store_memory") and not k.startswith("node:")
            )
            nodes.add_row(
                node.node_id,
                node.state,
                "yes" if node.is_head else "",
                f"{node.resources.get('CPU', 0):g}",
                custom,
            )
        console.print(nodes)
    return 0 if st.running else 1


def run_probe(args: argparse.Namespace) -> int:
    """``stkd cluster probe``."""
    results = probe_nodes(args.address)
    if args.json:
        # one line, so that it can be picked out of interleaved job logs
        print(json.dumps({"probe": [r.to_json() for r in results]}))
        return 0
    table = Table(title="one task per node", title_justify="left")
    for name in ("node id", "task ran on", "head", "host", "custom resources"):
        table.add_column(name, overflow="fold")
    for r in results:
        table.add_row(
            r.node_id,
            "same node" if r.ran_on == r.node_id else f"[red]{r.ran_on}[/]",
            "yes" if r.is_head else "",
            r.hostname,
            ", ".join(f"{k}={v:g}" for k, v in sorted(r.custom_resources.items())),
        )
    Console().print(table)
    return 0 if all(r.ran_on == r.node_id for r in results) else 1
