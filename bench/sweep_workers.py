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
    """``(trials, seconds from the first trial's start to the last one's end)``, from records."""
    starts, ends = [], []
    for trial in (sweep_dir / "trials").iterdir():
        lines = (trial / "starts.jsonl").read_text().splitlines()
        starts.append(json.loads(lines[0])["time"])
        for name in ("stop.json", "scheduler_stop.json"):
            if (trial / name).is_file():
                ends.append(json.loads((trial / name).read_text())["time"])
    return len(starts), max(ends) - min(starts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage", type=Path, default=HERE / "out" / "sweep-workers")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=2)
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
        wall = stkd(
            storage, "sweep", "--config", "los-loop", "--checkpoint", teacher, "--run-name", run,
            "--samples", str(args.samples), "--max-epochs", str(args.max_epochs),
            "--set", f"sweep.grace_period={args.max_epochs}",
            "--set", f"sweep.trial_workers={workers}",
        )  # fmt: skip
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
        f"--max-epochs {args.max_epochs}",
        "```",
        "",
        f"{args.samples} trials of the `los-loop` preset's space, {args.max_epochs} epochs each "
        "(no trial stopped early), labels from the sweep's cache of a "
        f"{args.teacher_epochs}-epoch teacher; 1 CPU per worker, a local Ray cluster of "
        f"{os.cpu_count()} CPUs. Trial phase: first trial start to last trial end.",
        "",
        "| workers per trial | trials | worker processes per trial | trial phase (s) | "
        "trials/hour | vs 1 worker | sweep wall time (s) | best val MAE |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, trials, phase, wall, pids, best in rows:
        rate = trials / phase
        lines.append(
            f"| {workers} | {trials} | {'/'.join(str(p) for p in sorted(pids))} | {phase:.0f} | "
            f"{rate * 3600:.0f} | {rate / base:.2f}x | {wall:.0f} | {best:.3f} |"
        )
    lines += [
        "",
        "Reading: on a machine whose cores the one-process trials already fill, a trial of two "
        "workers trains each epoch on half the windows per worker but pays DDP's gradient "
        "all-reduce every step and a Ray Train run's start per trial; what it buys is trials "
        "larger than one worker and placement across nodes, not throughput on one small "
        "machine. The ratio above is what this machine measured.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
