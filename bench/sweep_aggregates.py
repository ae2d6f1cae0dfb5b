"""Sweep aggregation on real data: the greedy weight soup and the top-k ensemble vs the best trial.

Runs ``stkd sweep`` (the CLI, as a user would) with the ``los-loop`` preset's own search space on
the Los-loop dataset, distilling from an already trained Los-loop teacher (by default the one
``bench.quality`` leaves in ``bench/out/quality``), then reads what the sweep wrote: the
leaderboard's trial rows and its ``soup`` and ``ensemble`` rows, and ``summary.json``'s
``aggregates``. The table goes to ``bench/RESULTS.md`` under ``## Sweep aggregation on Los-loop``.

Usage::

    .venv/bin/python -m bench.quality --datasets los-loop      # first, for the data and teacher
    .venv/bin/python -m bench.sweep_aggregates                 # 6 trials of up to 6 epochs
    .venv/bin/python -m bench.sweep_aggregates --samples 16 --max-epochs 20   # the preset's budget
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.results import write_section

HEADING = "## Sweep aggregation on Los-loop"
HERE = Path(__file__).resolve().parent
STKD = [sys.executable, "-m", "stkd_dist.cli"]


def run_sweep(args: argparse.Namespace) -> tuple[list[str], float]:
    """The ``stkd sweep`` command and its wall time."""
    cmd = [
        *STKD,
        "--storage",
        str(args.storage),
        "sweep",
        "--config",
        "los-loop",
        "--checkpoint",
        args.teacher,
        "--run-name",
        args.run_name,
        "--samples",
        str(args.samples),
        "--max-epochs",
        str(args.max_epochs),
        "--set",
        f"sweep.grace_period={args.grace_period}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return cmd, time.perf_counter() - t0


def render(cmd: list[str], seconds: float, sweep_dir: Path, load: tuple[float, float]) -> str:
    board = pd.read_csv(sweep_dir / "leaderboard.csv", dtype={"trial": str})
    summary: dict[str, Any] = json.loads((sweep_dir / "summary.json").read_text())
    trials = board[board["kind"] == "trial"]
    aggregates = board[board["kind"] != "trial"].set_index("trial")
    best = trials.iloc[0]
    agg = summary["aggregates"]
    root = HERE.parent
    # the command as run from the repository root (no machine paths in the results)
    shown = [
        os.path.relpath(a, root) if a.startswith(str(root)) else a
        for a in ["stkd", *cmd[len(STKD) :]]
    ]
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}); 1-minute load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after; the sweep took {seconds:.0f} s.",
        "",
        "```bash",
        ".venv/bin/python -m bench.sweep_aggregates   # runs:",
        " ".join(shown),
        "```",
        "",
        f"{len(trials)} trials of the `los-loop` preset's space (`distill.alpha`, "
        "`student.optim.lr`, `student.kwargs.embed_dim`), ASHA; stop reasons: "
        + ", ".join(f"{k} {v}" for k, v in summary["stop_reasons"].items())
        + ". Test split, original units (km/h).",
        "",
        "| row | members | params | val MAE | test MAE | beats the best trial |",
        "|---|---|---:|---:|---:|:---|",
        f"| best trial ({best['trial']}) | 1 | {int(best['params']):,} | {best['val_mae']:.3f} | "
        f"{best['test_mae']:.3f} | – |",
    ]
    for name in ("soup", "ensemble"):
        row = aggregates.loc[name]
        members = str(row["members"]).split()
        verdict = "yes" if agg[name]["beats_best"] else "no"
        lines.append(
            f"| {name} | {len(members)} ({', '.join(members)}) | {int(row['params']):,} | "
            f"{row['val_mae']:.3f} | {row['test_mae']:.3f} | {verdict} |"
        )
    tried = agg["soup"].get("tried", [])
    excluded = agg["soup"].get("excluded", [])
    one = len(str(aggregates.loc["soup", "members"]).split()) == 1
    lines += [
        "",
        "Soup candidates (best first; validation MAE of the soup with each, accepted or not): "
        + "; ".join(
            f"{t['trial']} {t['val_mae']:.3f} {'accepted' if t['accepted'] else 'rejected'}"
            for t in tried
        )
        + f"; {len(excluded)} trial(s) of another architecture (student width) left out.",
        "",
        "Reading: "
        + (
            "the soup beats the best trial; "
            if agg["soup"]["beats_best"]
            else "the soup does not beat the best trial; "
        )
        + (
            "the ensemble beats it."
            if agg["ensemble"]["beats_best"]
            else "the ensemble does not beat it."
        )
        + (
            " A soup of one member is the best trial itself: no other trial's weights improved"
            " its validation MAE when averaged in."
            if one
            else ""
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=HERE / "out" / "quality")
    parser.add_argument("--teacher", default="quality-los-loop", help="teacher run or checkpoint")
    parser.add_argument("--run-name", default="bench-sweep-los-loop")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if not (args.storage / "datasets" / "los-loop.zarr").exists():
        print(
            f"bench.sweep_aggregates: no los-loop dataset in {args.storage}; run "
            "`python -m bench.quality --datasets los-loop` first",
            file=sys.stderr,
        )
        return 2
    load0 = os.getloadavg()[0]
    cmd, seconds = run_sweep(args)
    text = render(
        cmd, seconds, args.storage / "runs" / args.run_name / "sweep", (load0, os.getloadavg()[0])
    )
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
