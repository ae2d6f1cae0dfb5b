"""A multi-node Ray cluster on one machine: a head and N worker raylets, as separate processes.

Each node is one ``ray start --block`` process that stkd starts in its own session and records
(pid, log) in ``<state dir>/cluster.json``; stopping sends SIGTERM to exactly those processes
(``ray start --block`` then shuts its raylet, GCS, dashboard and workers down) and never runs
``ray stop``, which would also kill unrelated Ray instances on the machine.

Several raylets can share a host when they do not compete for fixed ports or socket names:

* every node gets its own dashboard-agent port (the 52365 default would collide) and random
  worker ports; the head's GCS, dashboard and Ray-client ports are chosen here;
* nodes join one after another: a raylet picks its socket name (``raylet``, ``raylet.1``, ...)
  by looking at the shared session directory, so two starting at once take the same name;
* all nodes use one short private ``--temp-dir`` (Unix socket paths are limited to 107 bytes),
  which also keeps ``ray.init()`` of other programs from finding and joining this cluster.

Worker ``i`` carries the custom resource ``stkd_worker_<i>`` (1 unit) so that tests and
placement checks can pin work to a given node; the head has ``--num-cpus 0`` by default so that
work lands on the workers. Token authentication is on (see :mod:`stkd_dist.ops.ray_auth`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stkd_dist.errors import ConfigError, StkdError
from stkd_dist.ops.nodes import NodeInfo, list_nodes
from stkd_dist.ops.processes import (
    free_port,
    is_ours,
    log_tail,
    pid_alive,
    port_free,
    processes_naming,
    terminate,
)
from stkd_dist.ops.ray_auth import cluster_env, ensure_token

STATE_DIR_ENV = "STKD_LOCAL_CLUSTER_DIR"
STATE_FILE = "cluster.json"
HEAD_RESOURCE = "stkd_head"
# Unix socket paths under <temp dir>/session_<date>_<pid>/sockets/ must stay below 107 bytes
_MAX_TEMP_DIR_LEN = 40

Progress = Callable[[str], object]


class LocalClusterError(StkdError):
    """The local cluster could not be started, found or stopped."""


def worker_resource(index: int) -> str:
    """Name of the custom resource that only worker node ``index`` has."""
    return f"stkd_worker_{index}"


def default_state_dir() -> Path:
    """``$STKD_LOCAL_CLUSTER_DIR``, else ``<system temp>/stkd-local-cluster-<uid>``."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"stkd-local-cluster-{uid}"


@dataclass(frozen=True)
class LocalClusterSpec:
    """What to start.

    Args:
        workers: number of worker nodes (raylets) besides the head.
        cpus_per_node: logical CPUs each worker node offers to Ray.
        head_cpus: logical CPUs of the head (0: no tasks or actors run there).
        dashboard_port: dashboard / Jobs API port on 127.0.0.1.
        gcs_port: GCS port of the head (``None``: a free port).
        object_store_mb: object store size of each node in MiB.
        state_dir: where the state file and the node logs go.
        timeout_s: how long each node may take to start and register.
    """

    workers: int = 2
    cpus_per_node: int = 1
    head_cpus: int = 0
    dashboard_port: int = 8265
    gcs_port: int | None = None
    object_store_mb: int = 256
    state_dir: Path = field(default_factory=default_state_dir)
    timeout_s: float = 180.0

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError("must be 0 or more", where="--workers")
        if self.cpus_per_node < 1:
            raise ConfigError("must be at least 1", where="--cpus-per-node")
        if self.head_cpus < 0:
            raise ConfigError("must be 0 or more", where="--head-cpus")
        for name, port in (("--dashboard-port", self.dashboard_port), ("--port", self.gcs_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{port} is not a TCP port (1-65535)", where=name)
        if self.object_store_mb < 80:
            raise ConfigError(
                "Ray needs at least 80 MiB of object store", where="--object-store-mb"
            )
        if self.timeout_s <= 0:
            raise ConfigError("must be positive", where="--timeout")


@dataclass(frozen=True)
class NodeProcess:
    """One ``ray start --block`` process of the cluster."""

    role: str  # "head" or "worker"
    index: int  # 0 for the head, 0..workers-1 for workers
    pid: int
    log: str
    resource: str  # the custom resource only this node has


@dataclass(frozen=True)
class ClusterState:
    """What ``start`` recorded: addresses, the private temp dir and the node processes."""

    dashboard_url: str
    gcs_address: str
    temp_dir: str
    state_dir: str
    nodes: tuple[NodeProcess, ...]
    started_at: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (inverse of :meth:`from_json`)."""
        data = asdict(self)
        data["nodes"] = [asdict(n) for n in self.nodes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterState:
        """Rebuild from :meth:`to_json` output."""
        fields = dict(data)
        fields["nodes"] = tuple(NodeProcess(**n) for n in data["nodes"])
        return cls(**fields)


@dataclass(frozen=True)
class ClusterStatus:
    """The recorded processes, which of them live, and the nodes the cluster reports."""

    state: ClusterState | None
    alive: dict[int, bool]
    nodes: list[NodeInfo]

    @property
    def running(self) -> bool:
        """Whether every recorded node process is alive."""
        return self.state is not None and all(self.alive.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict for ``stkd cluster local status --json``."""
        return {
            "running": self.running,
            "dashboard_url": self.state.dashboard_url if self.state else None,
            "gcs_address": self.state.gcs_address if self.state else None,
            "processes": [
                {**asdict(n), "alive": self.alive.get(n.pid, False)}
                for n in (self.state.nodes if self.state else ())
            ],
            "nodes": [asdict(n) for n in self.nodes],
        }


def state_path(state_dir: Path) -> Path:
    """The state file of the cluster whose state lives in ``state_dir``."""
    return Path(state_dir) / STATE_FILE


def load_state(state_dir: Path) -> ClusterState | None:
    """The recorded cluster, or ``None`` when none was started from ``state_dir``."""
    path = state_path(state_dir)
    if not path.exists():
        return None
    try:
        return ClusterState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise LocalClusterError(
            f"unreadable cluster state ({e}); stop leftover processes and delete the file",
            where=str(path),
        ) from e


def start(spec: LocalClusterSpec, progress: Progress | None = None) -> ClusterState:
    """Start a head and ``spec.workers`` worker nodes; return once all are registered.

    Raises:
        LocalClusterError: a cluster from this state dir still runs, a port is taken, or a node
            failed to start (its log tail is in the message). Nodes already started are stopped.
    """
    say = progress or (lambda _msg: None)
    state_dir = Path(spec.state_dir).expanduser().resolve()
    existing = load_state(state_dir)
    if existing is not None:
        if any(is_ours(n.pid, existing.temp_dir) for n in existing.nodes):
            raise LocalClusterError(
                f"a local cluster is already running (dashboard {existing.dashboard_url}); "
                "stop it with `stkd cluster local stop`",
                where=str(state_dir),
            )
        # a stale record (its processes are gone): forget it and its temp dir
        state_path(state_dir).unlink()
        shutil.rmtree(existing.temp_dir, ignore_errors=True)
    if not port_free(spec.dashboard_port):
        raise LocalClusterError(
            "the dashboard port is in use (another Ray cluster?); choose --dashboard-port",
            where=f"127.0.0.1:{spec.dashboard_port}",
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="stkd-ray-")
    if len(temp_dir) > _MAX_TEMP_DIR_LEN:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise LocalClusterError(
            f"the temporary directory path is too long for Ray's Unix sockets "
            f"(more than {_MAX_TEMP_DIR_LEN} characters); set TMPDIR to a short path",
            where=temp_dir,
        )

    ray = _ray_executable()
    env = cluster_env()
    env.pop("RAY_ADDRESS", None)  # nodes join the address given on their command line only
    ensure_token(ray, env)
    gcs_port = spec.gcs_port or free_port()
    gcs_address = f"127.0.0.1:{gcs_port}"
    dashboard_url = f"http://127.0.0.1:{spec.dashboard_port}"
    # every node: blocks (so SIGTERM to it stops the node), loopback, the shared private temp dir
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--object-store-memory={spec.object_store_mb * 1024 * 1024}",
    ]
    nodes: list[NodeProcess] = []
    state = ClusterState(dashboard_url, gcs_address, temp_dir, str(state_dir), (), time.time())
    try:
        say("starting the head node")
        head_cmd = _head_command(ray, spec, gcs_port, common)
        nodes.append(_spawn(head_cmd, "head", 0, HEAD_RESOURCE, state_dir, env))
        state = _save(state, nodes)
        _wait_for(lambda: _jobs_api_up(dashboard_url), nodes[0], spec.timeout_s, "head node")

        for i in range(spec.workers):
            # one at a time: a raylet picks its socket name from what exists in the session dir
            say(f"starting worker node {i + 1}/{spec.workers}")
            resource = worker_resource(i)
            worker_cmd = _worker_command(ray, spec, gcs_address, resource, common)
            nodes.append(_spawn(worker_cmd, "worker", i, resource, state_dir, env))
            state = _save(state, nodes)
            want = len(nodes)
            _wait_for(
                functools.partial(_has_alive_nodes, dashboard_url, want),
                nodes[-1],
                spec.timeout_s,
                f"worker node {i}",
            )
    except BaseException:
        _terminate(nodes, temp_dir, grace_s=20.0)
        state_path(state_dir).unlink(missing_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    say(f"cluster up: head + {spec.workers} workers, Jobs API at {dashboard_url}")
    return state


def stop(
    state_dir: Path | None = None,
    grace_s: float = 30.0,
    keep_temp: bool = False,
    progress: Progress | None = None,
) -> ClusterState | None:
    """Stop the cluster recorded in ``state_dir``; ``None`` when there was none.

    Sends SIGTERM to the recorded ``ray start`` processes (workers first), SIGKILL to their
    process groups after ``grace_s``, then removes the state file and (unless ``keep_temp``) the
    private Ray temp dir with its logs.
    """
    say = progress or (lambda _msg: None)
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = load_state(state_dir)
    if state is None:
        return None
    say(f"stopping {len(state.nodes)} node(s)")
    _terminate(list(state.nodes), state.temp_dir, grace_s)
    state_path(state_dir).unlink(missing_ok=True)
    if not keep_temp:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    return state


def status(state_dir: Path | None = None) -> ClusterStatus:
    """The recorded cluster, which processes live, and the nodes its GCS reports."""
    state_dir = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = load_state(state_dir)
    if state is None:
        return ClusterStatus(None, {}, [])
    alive = {n.pid: is_ours(n.pid, state.temp_dir) for n in state.nodes}
    nodes: list[NodeInfo] = []
    if alive.get(state.nodes[0].pid):
        with contextlib.suppress(Exception):
            nodes = list_nodes(state.dashboard_url)
    return ClusterStatus(state, alive, nodes)


def leftover_processes(temp_dir: str) -> list[int]:
    """Live processes of a cluster whose private temp dir is ``temp_dir`` (Linux only)."""
    return processes_naming(temp_dir)


# --------------------------------------------------------------------------- internals


def _ray_executable() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise LocalClusterError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def _head_command(ray: str, spec: LocalClusterSpec, gcs_port: int, common: list[str]) -> list[str]:
    """``ray start --head``: GCS, dashboard + Jobs API on 127.0.0.1, free auxiliary ports."""
    return [
        ray,
        "start",
        "--head",
        f"--port={gcs_port}",
        f"--num-cpus={spec.head_cpus}",
        f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={spec.dashboard_port}",
        # fixed defaults (10001, 52365) would collide with other Ray instances on the host
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        *common,
    ]


def _worker_command(
    ray: str, spec: LocalClusterSpec, gcs_address: str, resource: str, common: list[str]
) -> list[str]:
    """``ray start --address``: one worker raylet with its own resource and agent port."""
    return [
        ray,
        "start",
        f"--address={gcs_address}",
        f"--num-cpus={spec.cpus_per_node}",
        f"--resources={json.dumps({resource: 1})}",
        f"--dashboard-agent-listen-port={free_port()}",
        *common,
    ]


def _spawn(
    cmd: list[str], role: str, index: int, resource: str, state_dir: Path, env: dict[str, str]
) -> NodeProcess:
    log = state_dir / f"{role}-{index}.log" if role == "worker" else state_dir / "head.log"
    with open(log, "wb") as out:
        # own session: the node outlives this command, and SIGKILL can reach its process group
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    return NodeProcess(role=role, index=index, pid=proc.pid, log=str(log), resource=resource)


def _save(state: ClusterState, nodes: list[NodeProcess]) -> ClusterState:
    """Record the processes started so far (atomically: tmp + rename)."""
    state = ClusterState(**{**asdict(state), "nodes": tuple(nodes)})
    path = state_path(Path(state.state_dir))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2))
    tmp.replace(path)
    return state


def _wait_for(ready: Callable[[], bool], node: NodeProcess, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(node.pid):
            raise LocalClusterError(f"the {what} exited while starting:\n{log_tail(node.log)}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.5)
    raise LocalClusterError(
        f"the {what} did not register within {timeout_s:.0f} s:\n{log_tail(node.log)}"
    )


def _jobs_api_up(dashboard_url: str) -> bool:
    from stkd_dist.ops.jobs import JobsClient

    JobsClient(dashboard_url)
    return True


def _has_alive_nodes(dashboard_url: str, want: int) -> bool:
    return _alive_node_count(dashboard_url) >= want


def _alive_node_count(dashboard_url: str) -> int:
    return sum(1 for n in list_nodes(dashboard_url) if n.state == "ALIVE")


def _terminate(nodes: list[NodeProcess], temp_dir: str, grace_s: float) -> None:
    """Stop the node processes, workers first; the private temp dir marks them as ours."""
    ordered = sorted(nodes, key=lambda n: n.role == "head")
    terminate([n.pid for n in ordered], marker=temp_dir, grace_s=grace_s)
