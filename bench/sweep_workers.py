"""Sweep throughput: trials per hour with 1 vs 2 data-parallel workers per trial, in one run.

On the Los-loop dataset, from one briefly trained Los-loop teacher, two ``stkd sweep`` commands
(the CLI, as a user would) with the ``los-loop`` preset's space and the same budget differ only
in ``sweep.trial_workers`` (1, then 2). ASHA's grace period is the whole budget, so every trial
runs every epoch and the two sweeps do the same work. Each sweep's trial phase is timed from
the trials' own records (first start to last end) and from the command's wall time. The table
goes to ``bench/RESULTS.md`` under ``## Sweep trials per hour: 1 vs 2 workers per trial``.

Usage::

    .venv/bin/python -m bench.sweep_workers                        # 4 trials of 3 epochs each
    .venv/bin/python -m bench.sweep_workers --samples 8 --max-epochs 5
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

from bench.quality import DATASETS
from bench.results import write_section

HEADING = "## Sweep trials per hour: 1 vs 2 workers per trial"
HERE = Path(__file__).resolve().parent
STKD = [sys.executable, "-m", "stkd_dist.cli"]


def stkd(storage: Path, *argv: str) -> float:
    """Run one ``stkd`` command; its wall time."""
    t0 = time.perf_counter()
    subprocess.run([*STKD, "--storage", str(storage), *argv], check=True)
    return time.perf_counter() - t0


def trial_phase(sweep_dir: Path) -> tuple[int, float]:
    """``(trials, seconds from the first trial's start to the last trial's last result)``.

    From Tune's own results: a trial started ``time_total_s`` of its first result before that
    result (for a data-parallel trial that includes waiting for room for its workers and
    starting its Ray Train run).
    """
    starts, ends = [], []
    for trial in (sweep_dir / "tune").glob("trial_*"):
        results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        starts.append(results[0]["timestamp"] - results[0]["time_total_s"])
        ends.append(results[-1]["timestamp"])
    return len(starts), max(ends) - min(starts)


def _sweep(storage: Path, args: argparse.Namespace, teacher: str, run: str, workers: int) -> float:
    """One sweep (or, with ``--reuse``, the one already there: wall time NaN)."""
    if args.reuse and (storage / "runs" / run / "sweep" / "summary.json").is_file():
        return float("nan")
    return stkd(
        storage, "sweep", "--config", "los-loop", "--checkpoint", teacher, "--run-name", run,
        "--samples", str(args.samples), "--max-epochs", str(args.max_epochs),
        "--set", f"sweep.grace_period={args.max_epochs}",
        "--set", f"sweep.trial_workers={workers}",
        "--set", f"sweep.labels={args.labels}",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=HERE / "out" / "sweep-workers")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument(
        "--labels",
        choices=("cache", "stream"),
        default="cache",
        help="sweep.labels of both sweeps (cache: the trials' cost alone, no replicas)",
    )
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="read sweeps already run, if any")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)
    if not (args.data / "los-loop").is_dir():
        print(f"bench.sweep_workers: no los-loop data in {args.data}", file=sys.stderr)
        return 2
    storage = args.storage
    ds = DATASETS["los-loop"]
    if not (storage / "datasets" / "los-loop.zarr").exists():
        stkd(storage, "ingest", *(a.format(data=args.data) for a in ds.ingest), "--name", ds.name)
    teacher = "sweep-workers-teacher"
    if not (storage / "runs" / teacher / "teacher").exists():
        stkd(storage, "train-teacher", "--config", "los-loop", "--epochs",
             str(args.teacher_epochs), "--run-name", teacher)  # fmt: skip
    load0 = os.getloadavg()[0]
    rows = []
    for workers in (1, 2):
        run = f"sweep-workers-{workers}"
        wall = _sweep(storage, args, teacher, run, workers)
        sweep_dir = storage / "runs" / run / "sweep"
        summary = json.loads((sweep_dir / "summary.json").read_text())
        trials, phase = trial_phase(sweep_dir)
        pids = {len(r["workers"]) for r in summary["trial_records"]}
        rows.append((workers, trials, phase, wall, pids, summary["best"]["val_mae"]))
    load1 = os.getloadavg()[0]
    base = rows[0][1] / rows[0][2]
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}); 1-minute load average "
        f"{load0:.1f} before, {load1:.1f} after.",
        "",
        "```bash",
        f".venv/bin/python -m bench.sweep_workers --samples {args.samples} "
        f"--max-epochs {args.max_epochs} --labels {args.labels}",
        "```",
        "",
        f"{args.samples} trials of the `los-loop` preset's space, {args.max_epochs} epochs each "
        "(no trial stopped early), labels "
        + ("from the sweep's cache" if args.labels == "cache" else "streamed from a replica")
        + f" of a {args.teacher_epochs}-epoch teacher; 1 CPU per worker, a local Ray cluster of "
        f"{os.cpu_count()} CPUs. Trial phase: from the first trial's start to the last trial's "
        "last result, by Tune's own clocks (a data-parallel trial's includes waiting for room "
        "for its workers and starting its Ray Train run). Sweep wall time also holds the "
        "label cache and the final evaluation.",
        "",
        "| workers per trial | trials | worker processes per trial | trial phase (s) | "
        "trials/hour | vs 1 worker | sweep wall time (s) | best val MAE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, trials, phase, wall, pids, best in rows:
        rate = trials / phase
        lines.append(
            f"| {workers} | {trials} | {'/'.join(str(p) for p in sorted(pids))} | {phase:.0f} | "
            f"{rate * 3600:.0f} | {rate / base:.2f}x | {wall:.0f} | {best:.3f} |".replace(
                "| nan |", "| – |"
            )
        )
    ratio = (rows[1][1] / rows[1][2]) / base
    lines += [
        "",
        f"Reading: two workers per trial ran {ratio:.2f}x the trials per hour of one worker "
        f"here. On {os.cpu_count()} cores the one-process trials already fill the machine, so "
        "a trial of two workers gains no cores: it trains each epoch on half the windows per "
        "worker but pays DDP's gradient all-reduce every step and a Ray Train run's start "
        "(controller, worker group, process group) for every trial, which dominates the "
        "seconds these small students need. Data-parallel trials are for students too large "
        "for one worker, or for nodes with more cores than one trial uses; not for throughput "
        "on one small machine.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
