"""Shard plan at scale: planning time and peak memory from 10^3 to 10^7 windows, and lazy ranks.

1. **Planning.** ``make_plan`` of ``n`` windows (stride 1, time chunks of ``--chunk-steps``) over
   ``--world-size`` ranks (64), for ``n`` = 10^3 ... 10^7. Each size runs in a fresh child process
   that imports the plan module, notes its resident memory, plans ``--repeat`` times and reports
   the best time and its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so one size's
   peak never shows in another's. With ``--before REV`` the plan module of git revision ``REV``
   is measured the same way, side by side.
2. **One rank's windows.** In another fresh child, rank 0 of the same plan derives its windows
   block by block (``RankWindows.iter_blocks``, what the loader does) and then only the last 1 %
   of them (``RankShard.window_array(start)``, what a resumed epoch needs); the peak RSS added by
   iterating stays at about one block however many windows the rank has. The last row is one
   rank holding all 10^7 windows.

The table and the command line are written to ``bench/RESULTS.md`` under ``## Shard plan at
scale`` (only that section is replaced).

Usage::

    .venv/bin/python -m bench.plan_scale                    # ~10 s
    .venv/bin/python -m bench.plan_scale --before 097f3ca   # also the plan of that revision
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import results

HEADING = "## Shard plan at scale"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]
SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)


# -- measurements (run in child processes) -----------------------------------------------------
def _peak_mib() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _load(module_file: str | None) -> ModuleType:
    """The plan module: this tree's, or the one in ``module_file`` (an older revision)."""
    if module_file is None:
        from stkd_dist.data import plan

        return plan
    spec = importlib.util.spec_from_file_location("plan_before", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_before"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def child_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Plan ``args.n`` windows ``args.repeat`` times in this process; best time and peak RSS."""
    import numpy.random  # noqa: F401  (numpy imports it lazily: keep that out of the timings)

    plan_mod = _load(args.module_file)
    baseline = _peak_mib()  # after importing numpy, numpy.random and the plan module
    times = []
    plan = None
    for _ in range(args.repeat):
        plan = None  # the previous plan is released before the next one is made
        t0 = time.perf_counter()
        plan = plan_mod.make_plan(range(args.n), args.chunk_steps, args.world_size, seed=1, epoch=3)
        times.append(time.perf_counter() - t0)
    assert plan is not None
    padding = sum(r.padding for r in plan.ranks)
    return {
        "n": args.n,
        "world_size": args.world_size,
        "best_s": min(times),
        "first_s": times[0],
        "blocks": sum(len(r.blocks) for r in plan.ranks),
        "padding": padding,
        "padding_frac": padding / (args.n + padding),
        "baseline_mib": baseline,
        "peak_mib": _peak_mib(),
    }


def child_iterate(args: argparse.Namespace) -> dict[str, Any]:
    """Plan, then derive rank 0's windows block by block, then only their last 1 %."""
    from stkd_dist.data.plan import make_plan

    plan = make_plan(range(args.n), args.chunk_steps, args.world_size, seed=1, epoch=3)
    shard = plan.ranks[0]
    before = _peak_mib()
    t0 = time.perf_counter()
    seen = checksum = 0
    largest = 0
    for _, ws in shard.windows.iter_blocks():  # type: ignore[attr-defined]
        seen += ws.size
        checksum += int(ws.sum())
        largest = max(largest, ws.size)
    iterate_s = time.perf_counter() - t0
    assert seen == shard.count
    # each of the rank's windows exactly once: per block, the sum of an arithmetic series
    assert checksum == sum((b.start + b.last) * len(b) // 2 for b in shard.blocks)
    t0 = time.perf_counter()
    tail = shard.window_array(shard.count - max(1, shard.count // 100))
    suffix_s = time.perf_counter() - t0
    return {
        "n": args.n,
        "world_size": args.world_size,
        "rank_windows": shard.count,
        "rank_blocks": len(shard.blocks),
        "largest_block": largest,
        "iterate_s": iterate_s,
        "suffix_windows": int(tail.size),
        "suffix_s": suffix_s,
        "added_mib": _peak_mib() - before,
        "materialised_mib": shard.count * 8 / 2**20,  # the rank's windows as one int64 array
    }


# -- driver ------------------------------------------------------------------------------------
def _run_child(kind: str, n: int, world_size: int, args: argparse.Namespace, **extra: Any) -> dict:
    cmd = [sys.executable, "-m", "bench.plan_scale", f"--child={kind}", f"--n={n}"]
    cmd += [f"--world-size={world_size}", f"--chunk-steps={args.chunk_steps}"]
    cmd += [f"--repeat={args.repeat}"]
    if extra.get("module_file"):
        cmd.append(f"--module-file={extra['module_file']}")
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _module_at(rev: str, workdir: Path) -> Path:
    """``stkd_dist/data/plan.py`` as of git revision ``rev``, written to ``workdir``."""
    text = subprocess.run(
        ["git", "show", f"{rev}:stkd_dist/data/plan.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / "plan_before.py"
    path.write_text(text)
    return path


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def section(args: argparse.Namespace, data: dict[str, Any], command: str) -> str:
    """The markdown section for RESULTS.md."""
    before = data.get("before")
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, {platform.python_implementation()} {platform.python_version()}); "
        f"1-minute load average {data['load'][0]:.1f} at the start, {data['load'][1]:.1f} at the "
        "end (other jobs may share the cores, so times are indicative).",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Planning**: `make_plan` of n windows (stride 1, time chunks of {args.chunk_steps} "
        f"steps) over W = {args.world_size} ranks, each size in a fresh process: best of "
        f"{args.repeat} plans (first plan: the first of them, with the process's one-off "
        "warm-up); peak = `ru_maxrss` of that process, added = peak minus the RSS after importing "
        "numpy, `numpy.random` and the plan module. Padding = padding entries per epoch (share of "
        "all entries) that keep the ranks in lockstep.",
        "",
    ]
    head = (
        "| windows | chunks | blocks | plan (ms) | first plan (ms) | peak RSS (MiB) "
        "| added (MiB) | padding |"
    )
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"
    if before:
        head += f" before {args.before}: plan (ms) | added (MiB) | padding |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for i, r in enumerate(data["plan"]):
        chunks = -(-r["n"] // args.chunk_steps)
        row = (
            f"| {r['n']:,} | {chunks:,} | {r['blocks']:,} | {_ms(r['best_s'])} | "
            f"{_ms(r['first_s'])} | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['baseline_mib']:.1f} | "
            f"{r['padding']:,} ({r['padding_frac']:.2%}) |"
        )
        if before:
            b = before[i]
            row += (
                f" {_ms(b['best_s'])} | {b['peak_mib'] - b['baseline_mib']:.1f} | "
                f"{b['padding']:,} ({b['padding_frac']:.2%}) |"
            )
        lines.append(row)
    big, small = data["plan"][-1], data["plan"][0]
    lines += [
        "",
        f"10^7 / 10^3 windows: plan time x{big['best_s'] / small['best_s']:.1f} "
        f"({_ms(big['best_s'])} ms), peak RSS x{big['peak_mib'] / small['peak_mib']:.2f}. "
        "Blocks grow with the chunks (O(chunks + W)), never with the windows; padding is at most "
        f"W - 1 = {args.world_size - 1} entries.",
        "",
        "**One rank's windows**: in a fresh process, rank 0 of the plan derives its windows block "
        "by block (`RankWindows.iter_blocks`, as the loader does), then only its last 1 % "
        "(`RankShard.window_array(start)`, as a resumed epoch does). Added = peak RSS growth while "
        "deriving; materialised = the rank's windows as one int64 array, which is never built.",
        "",
        "| windows | W | rank windows | rank blocks | largest block | iterate (ms) | "
        "last 1 % (ms) | added (MiB) | materialised (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["iterate"]:
        lines.append(
            f"| {r['n']:,} | {r['world_size']} | {r['rank_windows']:,} | {r['rank_blocks']:,} | "
            f"{r['largest_block']:,} | {_ms(r['iterate_s'])} | {_ms(r['suffix_s'])} | "
            f"{r['added_mib']:.1f} | {r['materialised_mib']:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of ``bench/RESULTS.md``."""
    results.write_section(HEADING, text, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.plan_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--world-size", type=int, default=64, metavar="W")
    p.add_argument("--chunk-steps", type=int, default=1024, help="time-chunk length (steps)")
    p.add_argument("--repeat", type=int, default=5, help="plans per size (best is reported)")
    p.add_argument(
        "--max-windows", type=int, default=SIZES[-1], help="largest size (default: 10^7)"
    )
    p.add_argument("--before", metavar="REV", help="also measure the plan module of git REV")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--child", choices=("plan", "iterate"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--module-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[bench.plan_scale] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "plan":
        print(json.dumps(child_plan(args)))
        return 0
    if args.child == "iterate":
        print(json.dumps(child_iterate(args)))
        return 0

    load0 = os.getloadavg()[0]
    sizes = [n for n in SIZES if n <= args.max_windows]
    data: dict[str, Any] = {"plan": [], "iterate": []}
    with tempfile.TemporaryDirectory(prefix="stkd-plan-bench-") as tmp:
        before_file = _module_at(args.before, Path(tmp)) if args.before else None
        for n in sizes:
            _say(f"plan {n:,} windows over {args.world_size} ranks")
            data["plan"].append(_run_child("plan", n, args.world_size, args))
            if before_file is not None:
                _say(f"plan {n:,} windows with the plan of {args.before}")
                data.setdefault("before", []).append(
                    _run_child("plan", n, args.world_size, args, module_file=str(before_file))
                )
    for n, w in [(n, args.world_size) for n in sizes] + [(sizes[-1], 1)]:
        _say(f"iterate rank 0 of {n:,} windows over {w} rank(s)")
        data["iterate"].append(_run_child("iterate", n, w, args))
    data["load"] = (load0, os.getloadavg()[0])

    defaults = parse_args([])
    command = [".venv/bin/python -m bench.plan_scale"]
    for name in ("world_size", "chunk_steps", "repeat", "max_windows"):
        if getattr(args, name) != getattr(defaults, name):
            command.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    if args.before:
        command.append(f"--before {shlex.quote(args.before)}")
    text = section(args, data, " ".join(command))
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
