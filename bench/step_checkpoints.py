"""What mid-epoch checkpoints cost, and what they save when a worker dies, one run.

The real code path of ``stkd train-teacher`` (``train_teacher``, 2 gloo DDP workers on one local
Ray cluster) trains the ``demo`` preset's teacher on a random store five times:

1. epoch checkpoints only, uninterrupted;
2. with ``checkpoint.every_steps``, uninterrupted: the throughput cost of step checkpoints
   (uploaded in the background, ``checkpoint.upload: async``, the default);
3. the same with ``checkpoint.upload: sync`` (every rank waits for each upload);
4. epoch checkpoints only, rank 1 SIGKILLed halfway through epoch 2;
5. with ``checkpoint.every_steps``, rank 1 SIGKILLed at the same point.

A discarded one-epoch run goes first (the first run on a fresh Ray cluster is slower).
samples/s is the median over epochs 2..N (a killed run: its epochs but the killed one) of
training windows / wall time of the training phase (which includes the step checkpoints' writes
and uploads). The time lost per failure is the
killed run's wall time minus the uninterrupted run's with the same settings: Ray's restart of the
worker group plus the training redone since the checkpoint it resumed from. The table goes to
``bench/RESULTS.md`` under ``## Step checkpoints`` (only that section is replaced).

Usage::

    .venv/bin/python -m bench.step_checkpoints            # defaults, ~6 minutes on 2 cores
    .venv/bin/python -m bench.step_checkpoints --steps 1500 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.results import write_section
from bench.train_throughput import make_store

HEADING = "## Step checkpoints"


def measure(
    store: Path,
    storage: Path,
    name: str,
    epochs: int,
    every_steps: int,
    kill: bool,
    upload: str = "async",
) -> dict[str, Any]:
    """One training run; with ``kill``, rank 1 dies halfway through the second epoch."""
    from stkd_dist.config import load_config
    from stkd_dist.testing import kill_rank_when, last_weights
    from stkd_dist.train.ray_session import read_history
    from stkd_dist.train.teacher import train_teacher

    cfg = load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            f"run.name={name}",
            f"teacher.schedule.epochs={epochs}",
            "cluster.num_workers=2",
            "cluster.torch_threads=1",
            "cluster.max_failures=3",
            f"checkpoint.every_steps={every_steps}",
            f"checkpoint.upload={upload}",
        ],
    )
    experiment = storage / "runs" / name / "teacher"
    killed: list[int] = []
    thread = None
    if kill:
        marks: list[float] = []

        def halfway() -> bool:
            # epoch 1 is halfway through half an epoch's time after epoch 0's record appeared
            history = read_history(experiment)
            if not history:
                return False
            if not marks:
                marks.append(time.monotonic() + 0.5 * history[0]["epoch_time_s"])
            return time.monotonic() >= marks[0]

        killed, thread = kill_rank_when(experiment, 1, time.time(), halfway, timeout=900)
    t0 = time.perf_counter()
    out = train_teacher(cfg, storage=storage, echo=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    if thread is not None:
        thread.join(5)
        assert killed, "no worker was killed"
    history = read_history(experiment)
    last = {h["epoch"]: h for h in history}  # a redone epoch: its last record
    # a resumed epoch's rate counts the windows before the kill but not their time: left out
    rates = [last[e]["samples_per_s"] for e in sorted(last) if not (kill and e == 1)]
    status = json.loads((experiment / "workers" / "rank-1.json").read_text())
    return {
        "name": name,
        "every_steps": every_steps,
        "upload": upload,
        "kill": kill,
        "wall_s": wall,
        "rate": statistics.median(rates[1:] or rates),
        "attempts": out.attempts,
        "resumed_at_step": status["resumed_at_step"] if kill else None,
        "steps_per_epoch": -(-last[0]["samples"] // (2 * cfg.data.batch_size)),
        "weights": last_weights(experiment),
    }


def render(runs: list[dict[str, Any]], args: argparse.Namespace, load: tuple) -> str:
    import torch

    plain, stepped, stepped_sync, plain_kill, step_kill = runs
    same = all(
        torch.equal(a, b)
        for a, b in zip(stepped["weights"].values(), step_kill["weights"].values(), strict=True)
    )
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}); the cores are shared with "
        f"other jobs (load average {load[0]:.1f} before, {load[1]:.1f} after).",
        "",
        "```bash",
        " ".join([".venv/bin/python -m bench.step_checkpoints", *sys.argv[1:]]).strip(),
        "```",
        "",
        f"`demo` preset teacher (Graph WaveNet), store of {args.steps} steps x {args.nodes} nodes, "
        f"batch 32 per worker, 2 gloo DDP workers through Ray Train, {args.epochs} epochs of "
        f"{plain['steps_per_epoch']} steps; checkpoints to a local storage root. A kill is a "
        "SIGKILL of rank 1 halfway through epoch 2; Ray restarts the worker group "
        "(`cluster.max_failures: 3`) from the latest checkpoint it registered.",
        "",
        "| run | step checkpoints | samples/s (median) | wall s | time lost to the kill s "
        "| resumed at |",
        "|:---|:---|---:|---:|---:|:---|",
    ]
    rows = ((plain, None), (stepped, None), (stepped_sync, None), (plain_kill, plain))
    for r, base in (*rows, (step_kill, stepped)):
        every = f"every {r['every_steps']} steps" if r["every_steps"] else "none (epoch ends)"
        if r["every_steps"]:
            every += f", {r['upload']} upload"
        lost = f"{r['wall_s'] - base['wall_s']:.1f}" if base else ""
        at = ""
        if r["kill"]:
            at = f"step {r['resumed_at_step']} of epoch 2" if r["resumed_at_step"] else "epoch 2"
        label = "killed" if r["kill"] else "uninterrupted"
        lines.append(f"| {label} | {every} | {r['rate']:.0f} | {r['wall_s']:.1f} | {lost} | {at} |")
    cost = stepped["rate"] / plain["rate"]
    cost_sync = stepped_sync["rate"] / plain["rate"]
    lines += [
        "",
        f"Throughput with step checkpoints / without: **{cost:.2f}** with the default "
        "asynchronous upload (training waits while rank 0 writes the checkpoint to a local "
        f"temp folder; Ray uploads it in the background), **{cost_sync:.2f}** with "
        "`checkpoint.upload: sync` (every rank waits for the upload too; to a local root the "
        "upload is a local copy, so the two differ little here: an object store widens the "
        "gap). The runs go one after another on shared cores, so differences of 10-20 % "
        "between them are noise, as ratios above 1 show. Time lost per failure: "
        f"**{plain_kill['wall_s'] - plain['wall_s']:.1f} s** with epoch checkpoints only, "
        f"**{step_kill['wall_s'] - stepped['wall_s']:.1f} s** with step checkpoints. The "
        "killed run with step checkpoints ended with the uninterrupted one's weights "
        f"(`torch.equal` on every tensor): **{same}**. Here an epoch ({args.epochs} of them) "
        "lasts about as long as Ray's restart of the worker group, which dominates the time "
        "lost; step checkpoints save the redone part of the epoch (at most "
        "`checkpoint.every_steps` steps instead of up to a whole epoch), which counts once "
        "epochs last minutes to hours.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4032, help="time steps of the store")
    parser.add_argument("--nodes", type=int, default=50, help="nodes of the store")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--every-steps", type=int, default=10, help="checkpoint.every_steps")
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stkd-bench-ckpt-") as tmp:
        store = make_store(Path(tmp) / "bench.zarr", args.steps, args.nodes)
        storage = Path(tmp) / "storage"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            # a first run is slower (Ray starts its worker processes, imports warm up): one
            # discarded epoch first, so that the first measured run is not the odd one out
            measure(store, storage, "warmup", 1, 0, False)
            runs = [
                measure(store, storage, name, args.epochs, every, kill, upload)
                for name, every, kill, upload in (
                    ("plain", 0, False, "async"),
                    ("stepped", args.every_steps, False, "async"),
                    ("stepped-sync", args.every_steps, False, "sync"),
                    ("plain-killed", 0, True, "async"),
                    ("stepped-killed", args.every_steps, True, "async"),
                )
            ]
        finally:
            ray.shutdown()
    text = render(runs, args, (load0, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
