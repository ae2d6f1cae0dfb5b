"""Run a benchmark's commands as their own processes, timed: wall clock and CPU seconds.

Shared by the benchmarks that drive the ``stkd`` CLI end to end (:mod:`bench.quality`,
:mod:`bench.transfer`).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timed:
    """One command: what ran, how long, how much CPU (None where it cannot be measured)."""

    label: str
    argv: list[str]
    wall_s: float
    cpu_s: float | None
    returncode: int


def _tree_cpu(session: int, seen: dict[tuple[str, str], float]) -> None:
    """Add the CPU seconds of every live process of ``session`` to ``seen`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) != session:  # fields[3]: the session id
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        key = (pid, fields[19])  # pid and start time: a reused pid is another process
        seen[key] = max(seen.get(key, 0.0), cpu)


def run_timed(label: str, argv: list[str], log: Path) -> Timed:
    """Run ``argv`` in a new session, its output appended to ``log``; sample the session's CPU.

    Ray's workers are started by the command's own local cluster and stay in its session, so
    their CPU time is counted too (sampled once a second: the last second of a process is lost).
    """
    print(f"$ {shlex.join(argv)}", flush=True)
    linux = Path("/proc/self/stat").exists()
    seen: dict[tuple[str, str], float] = {}
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ {shlex.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            if linux:
                _tree_cpu(proc.pid, seen)
            time.sleep(1.0)
    wall = time.perf_counter() - t0
    cpu = sum(seen.values()) if linux else None
    print(f"  {label}: exit {proc.returncode}, {wall:.0f} s wall, {cpu or 0:.0f} CPU-s", flush=True)
    return Timed(label, argv, wall, cpu, proc.returncode)


def stkd_argv(storage: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "stkd_dist.cli", "--storage", str(storage), *args]


def check(t: Timed) -> None:
    if t.returncode != 0:
        raise SystemExit(f"{t.label} failed (exit {t.returncode}): {shlex.join(t.argv)}")
