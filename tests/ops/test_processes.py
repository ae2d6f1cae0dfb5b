"""Process utilities: liveness, identity by marker, termination by pid only, ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from stkd_dist.ops.processes import (
    free_port,
    is_ours,
    log_tail,
    pid_alive,
    port_free,
    processes_naming,
    terminate,
)
from stkd_dist.testing import wait_until

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")

SLEEPER = "import sys, time; time.sleep(60)"


def ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` has set SIGTERM to ignored (its ``SigIgn`` mask in ``/proc``)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def sleeper(marker: str, *, new_session: bool = True) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, marker], start_new_session=new_session)


def test_identity_needs_the_marker() -> None:
    marker = f"stkd-test-{uuid.uuid4().hex}"
    proc = sleeper(marker)
    try:
        assert pid_alive(proc.pid)
        assert is_ours(proc.pid, marker)
        assert not is_ours(proc.pid, "some-other-marker")  # a recycled pid is not ours
        assert not is_ours(os.getpid(), marker)
        assert processes_naming(marker) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)
    assert processes_naming(marker) == []


def test_a_zombie_is_not_alive() -> None:
    proc = sleeper("zombie-test")
    proc.kill()
    try:
        # until it has exited, leaving it unreaped (WNOWAIT): a zombie
        exited = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert exited is not None and exited.si_status == signal.SIGKILL
        os.kill(proc.pid, 0)  # the pid still answers signals...
        assert not pid_alive(proc.pid)  # ...but the process is gone
    finally:
        proc.wait()


def test_terminate_sigterms_then_kills_stubborn_groups_and_stragglers() -> None:
    marker = f"stkd-test-{uuid.uuid4().hex}"
    polite = sleeper(marker)
    stubborn_code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    )
    stubborn = subprocess.Popen(
        [sys.executable, "-c", stubborn_code, marker], start_new_session=True
    )
    straggler = sleeper(marker)  # not in the list, but names the marker
    bystander = sleeper("unrelated")
    try:
        wait_until(lambda: ignores_sigterm(stubborn.pid), 10, "the stubborn one to ignore SIGTERM")
        terminate([polite.pid, stubborn.pid], marker, grace_s=1.0)
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert straggler.wait(timeout=5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (polite, stubborn, straggler, bystander):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_ports_and_log_tail(tmp_path: Path) -> None:
    port = free_port()
    assert port_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free(port)
    log = tmp_path / "node.log"
    log.write_text("\n".join(f"line {i}" for i in range(30)))
    tail = log_tail(log, lines=3)
    assert tail.splitlines()[:3] == ["line 27", "line 28", "line 29"]
    assert str(log) in tail
    assert "no log at" in log_tail(tmp_path / "missing.log")
