"""Shared fixtures.

* ``shared_data``: the real datasets in ``../shared/data`` (tests using it skip when it is absent).
* ``storage_root``: a temporary storage root, also exported as ``STKD_STORAGE``.
* ``make_store``: writes a small random canonical store (real Zarr on disk).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stkd_dist.testing import random_store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STKD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real datasets; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not present ({SHARED_DATA} is absent)")
    return SHARED_DATA


@pytest.fixture
def storage_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh storage root for the test, exported as STKD_STORAGE."""
    root = tmp_path / "storage"
    root.mkdir()
    monkeypatch.setenv("STKD_STORAGE", str(root))
    return root


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_store(name="x", steps=..., nodes=..., channels=..., chunk_steps=...)``."""

    def make(name: str = "small", **kwargs: object) -> Path:
        return random_store(tmp_path / f"{name}.zarr", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="module")
def local_ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real multi-node Ray cluster on this machine, shared by the tests of a module.

    A head (0 CPUs, Jobs API on a free port) and 2 worker nodes (separate raylets, 1 CPU each,
    custom resources ``stkd_worker_0`` / ``stkd_worker_1``), started with
    ``stkd cluster local start`` and stopped with ``stkd cluster local stop`` in teardown, even when
    the test fails; teardown then fails if any Ray process of the cluster survived.

    Yields a namespace with ``dashboard_url`` (for ``stkd submit --address``), ``gcs_address`` (for
    ``ray.init(address=...)``), ``state_dir``, ``temp_dir``, ``head_node_id``, ``worker_node_ids``
    (worker index -> node id, to check where DDP workers or tasks ran) and
    ``stkd(*args, timeout=600, env=None)``, which runs the ``stkd`` CLI in a subprocess and returns
    the ``subprocess.CompletedProcess`` (text, stdout and stderr captured).
    """
    import signal
    import socket
    import subprocess
    import sys
    import types

    from stkd_dist.ops import local_cluster
    from stkd_dist.ops.nodes import list_nodes

    state_dir = tmp_path_factory.mktemp("local-ray-cluster")
    base_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    base_env["PYTHONUNBUFFERED"] = "1"

    def stkd(
        *args: object, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stkd_dist.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**base_env, **(env or {})},
        )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp_dir = None
    try:
        started = stkd(
            "cluster", "local", "start", "--workers", 2, "--cpus-per-node", 1,
            "--dashboard-port", port, "--state-dir", state_dir, timeout=400,
        )  # fmt: skip
        state = local_cluster.load_state(state_dir)
        temp_dir = state.temp_dir if state else None
        assert started.returncode == 0, started.stdout + started.stderr
        assert state is not None
        nodes = [n for n in list_nodes(state.dashboard_url) if n.state == "ALIVE"]
        head = [n.node_id for n in nodes if n.is_head]
        workers = {
            i: n.node_id
            for n in nodes
            for i in range(2)
            if n.resources.get(local_cluster.worker_resource(i))
        }
        assert len(head) == 1 and len(workers) == 2, nodes
        yield types.SimpleNamespace(
            dashboard_url=state.dashboard_url,
            gcs_address=state.gcs_address,
            state_dir=state_dir,
            temp_dir=temp_dir,
            head_node_id=head[0],
            worker_node_ids=workers,
            stkd=stkd,
        )
    finally:
        stopped = stkd("cluster", "local", "stop", "--state-dir", state_dir, timeout=180)
        leftovers = local_cluster.leftover_processes(temp_dir) if temp_dir else []
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not leftovers, f"Ray processes of the local cluster survived `stop`: {leftovers}"


# -- object storage ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    """The real S3-compatible server of the session (:class:`stkd_dist.testing.S3Server`):
    ``endpoint``, ``client`` (boto3), ``env()`` (the standard AWS variables for it),
    ``make_bucket()`` and ``objects(bucket, prefix)``."""
    from stkd_dist.testing import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """The S3 server's variables set in this process (and inherited by subprocesses)."""
    for k, v in s3_server.env().items():  # type: ignore[attr-defined]
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import fsspec

    # s3fs caches filesystem instances: drop those made with other credentials
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    return s3_server


@pytest.fixture
def small_store(make_store: Callable[..., Path]) -> Path:
    return make_store("ck", steps=200, nodes=4, channels=1, chunk_steps=50)
