"""Processes stkd starts and later stops: liveness, identity, termination by pid, free ports.

stkd never stops processes by name: it records the pids it started and, on Linux, checks that a
pid still belongs to them (its command line names a marker only they carry, such as a private
temp dir) before signalling it, so a recycled pid of an unrelated program is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path

_PROC = Path("/proc")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        # state Z (zombie) or X (dead): the pid still answers signals but the process is gone
        stat = (_PROC / str(pid) / "stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return True


def is_ours(pid: int, marker: str) -> bool:
    """Alive and still ours: where ``/proc`` exists, its command line must contain ``marker``."""
    if not pid_alive(pid):
        return False
    if _PROC.is_dir():
        with contextlib.suppress(OSError):
            return marker in _cmdline(pid)
    return True


def processes_naming(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (Linux ``/proc`` only, else [])."""
    if not _PROC.is_dir():
        return []
    pids = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in _cmdline(int(entry.name), attempts=1) and pid_alive(int(entry.name)):
                    pids.append(int(entry.name))
    return pids


def terminate(pids: Sequence[int], marker: str, grace_s: float) -> None:
    """SIGTERM ``pids`` in order, SIGKILL what is left after ``grace_s``, then sweep stragglers.

    A pid that leads its own process group (started with ``start_new_session``) is killed with
    its group. Finally every process whose command line still names ``marker`` is killed: children
    that outlived the process that started them.
    """
    for pid in pids:
        if is_ours(pid, marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_ours(p, marker) for p in pids):
        time.sleep(0.3)
    for pid in pids:
        if is_ours(pid, marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
    for pid in processes_naming(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP port can be bound on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the OS may hand it out again later: use it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: str | Path, lines: int = 15) -> str:
    """The last ``lines`` of a log file and where the whole log is."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:]) + f"\n(full log: {path})"


def _cmdline(pid: int, attempts: int = 20) -> str:
    # A process that is exec()ing reads as an empty command line for a moment (often right after
    # Popen returns): read again briefly rather than mistake a fresh child for a stranger.
    path = _PROC / str(pid) / "cmdline"
    for _ in range(attempts):
        raw = path.read_bytes()
        if raw:
            break
        time.sleep(0.025)
    return raw.replace(b"\0", b" ").decode(errors="replace")
