"""Local multi-node cluster: spec validation, state file, and stopping exactly our processes.

Process handling is tested on plain sleeping processes (no Ray); the Ray side is covered by the
integration test in test_cluster_integration.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stkd_dist.errors import ConfigError
from stkd_dist.ops import local_cluster
from stkd_dist.ops.local_cluster import (
    ClusterState,
    LocalClusterError,
    LocalClusterSpec,
    NodeProcess,
    load_state,
    worker_resource,
)


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"workers": -1}, "--workers"),
        ({"cpus_per_node": 0}, "--cpus-per-node"),
        ({"head_cpus": -1}, "--head-cpus"),
        ({"dashboard_port": 70000}, "--dashboard-port"),
        ({"gcs_port": 0}, "--port"),
        ({"object_store_mb": 10}, "--object-store-mb"),
        ({"timeout_s": 0}, "--timeout"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object], where: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        LocalClusterSpec(state_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert err.value.where == where


def test_worker_resources_are_distinct() -> None:
    assert [worker_resource(i) for i in range(3)] == [
        "stkd_worker_0",
        "stkd_worker_1",
        "stkd_worker_2",
    ]


def test_default_state_dir_follows_the_env_var(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STKD_LOCAL_CLUSTER_DIR", str(tmp_path / "c"))
    assert local_cluster.default_state_dir() == tmp_path / "c"
    monkeypatch.delenv("STKD_LOCAL_CLUSTER_DIR")
    assert local_cluster.default_state_dir().parent == Path(tempfile.gettempdir())


def test_state_round_trips_through_json(tmp_path: Path) -> None:
    state = ClusterState(
        dashboard_url="http://127.0.0.1:8265",
        gcs_address="127.0.0.1:6379",
        temp_dir="/tmp/stkd-ray-x",
        state_dir=str(tmp_path),
        nodes=(NodeProcess("head", 0, 11, "h.log", "stkd_head"),),
        started_at=1.0,
    )
    assert ClusterState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_corrupt_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(LocalClusterError, match="unreadable cluster state"):
        load_state(tmp_path)


def test_status_and_stop_without_a_cluster(tmp_path: Path) -> None:
    status = local_cluster.status(tmp_path)
    assert status.state is None and not status.running
    assert status.to_json()["running"] is False
    assert local_cluster.stop(tmp_path) is None


def test_start_refuses_a_dashboard_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(LocalClusterError) as err:
            local_cluster.start(LocalClusterSpec(dashboard_port=port, state_dir=tmp_path))
    assert err.value.where == f"127.0.0.1:{port}"
    assert not (tmp_path / "cluster.json").exists()


@pytest.fixture
def fake_nodes(tmp_path: Path) -> Iterator[tuple[Path, str, list[subprocess.Popen[bytes]]]]:
    """Two sleeping processes recorded as a cluster; their command lines name the temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="stkd-ray-")
    code = "import signal, sys, time; time.sleep(60)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, temp_dir], start_new_session=True)
        for _ in range(2)
    ]
    state = ClusterState(
        dashboard_url="http://127.0.0.1:1",
        gcs_address="127.0.0.1:2",
        temp_dir=temp_dir,
        state_dir=str(tmp_path),
        nodes=(
            NodeProcess("head", 0, procs[0].pid, "head.log", "stkd_head"),
            NodeProcess("worker", 0, procs[1].pid, "worker-0.log", "stkd_worker_0"),
        ),
        started_at=time.time(),
    )
    (tmp_path / "cluster.json").write_text(json.dumps(state.to_json()))
    yield tmp_path, temp_dir, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_running_cluster_blocks_a_second_start(
    fake_nodes: tuple[Path, str, list[subprocess.Popen[bytes]]],
) -> None:
    state_dir, _, _ = fake_nodes
    with pytest.raises(LocalClusterError, match="already running"):
        local_cluster.start(LocalClusterSpec(dashboard_port=1, state_dir=state_dir))


def test_status_reports_which_recorded_processes_live(
    fake_nodes: tuple[Path, str, list[subprocess.Popen[bytes]]],
) -> None:
    state_dir, _, procs = fake_nodes
    procs[1].kill()
    procs[1].wait()
    status = local_cluster.status(state_dir)
    assert status.alive == {procs[0].pid: True, procs[1].pid: False}
    assert not status.running


def test_stop_terminates_exactly_the_recorded_processes(
    fake_nodes: tuple[Path, str, list[subprocess.Popen[bytes]]],
) -> None:
    state_dir, temp_dir, procs = fake_nodes
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stopped = local_cluster.stop(state_dir, grace_s=10)
        assert stopped is not None and len(stopped.nodes) == 2
        for p in procs:
            assert p.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None  # not ours: untouched
        assert not (state_dir / "cluster.json").exists()
        assert not Path(temp_dir).exists()  # the private temp dir is removed
        assert local_cluster.leftover_processes(temp_dir) == []
    finally:
        bystander.kill()
        bystander.wait()
