"""Teacher training throughput (samples/s) with 1 and 2 DDP workers on Ray Train, one run.

The real code path of ``stkd train-teacher`` (``train_teacher``) trains the ``demo`` preset's
teacher on a random store, once with 1 worker and once with 2 workers, one torch thread per
worker, on one local Ray cluster. The rate of an epoch is what the workers report: training
windows of all ranks / wall time of the epoch's training phase (reading, forward, backward, DDP
all-reduce, optimiser; validation and checkpointing excluded). The first epoch (warm-up) is left
out and the median of the others is taken. The table goes to ``bench/RESULTS.md`` under
``## Teacher training throughput`` (only that section is replaced).

Usage::

    .venv/bin/python -m bench.train_throughput                 # defaults, ~3-5 minutes on 2 cores
    .venv/bin/python -m bench.train_throughput --epochs 2 --steps 1000 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEADING = "## Teacher training throughput"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def make_store(path: Path, steps: int, nodes: int, seed: int = 0) -> Path:
    """A smooth random series with a daily cycle, 2 channels, 2 % missing, a random graph."""
    import dask.array as da
    import numpy as np
    import pandas as pd

    from stkd_dist.storage import StoreMeta, choose_chunks, write_store

    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None, None]
    phase = rng.uniform(0, 6, size=(1, nodes, 2))
    values = 50 + 10 * np.sin(2 * np.pi * t / 288 + phase) + rng.normal(0, 1, (steps, nodes, 2))
    mask = rng.random((steps, nodes, 2)) > 0.02
    adj = (rng.random((nodes, nodes)) < 0.1).astype(np.float32)
    np.fill_diagonal(adj, 1.0)
    chunks = choose_chunks(steps, nodes, 2)
    meta = StoreMeta(
        name=path.stem,
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=["flow", "speed"],
        freq="5min",
        adjacency=adj,
        provenance="random benchmark data",
    )
    return write_store(
        path,
        da.from_array(values.astype(np.float32), chunks=chunks),
        da.from_array(mask, chunks=chunks),
        meta,
        chunks=chunks,
    )


def measure(store: Path, storage: Path, workers: int, epochs: int) -> dict[str, Any]:
    """Train the demo teacher with ``workers`` workers; per-epoch rates from the run history."""
    from stkd_dist.config import load_config
    from stkd_dist.train.ray_session import read_history
    from stkd_dist.train.teacher import train_teacher

    cfg = load_config(
        "demo",
        [
            f"data.dataset={json.dumps(str(store))}",
            f"run.name=throughput-w{workers}",
            f"teacher.schedule.epochs={epochs}",
            f"cluster.num_workers={workers}",
            "cluster.torch_threads=1",
            "cluster.max_failures=0",
        ],
    )
    t0 = time.perf_counter()
    out = train_teacher(cfg, storage=storage, echo=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    history = read_history(out.experiment)
    rates = [h["samples_per_s"] for h in history]
    per_cpu = [h["samples_per_cpu_s"] for h in history]
    return {
        "workers": workers,
        "rates": rates,
        "median": statistics.median(rates[1:] or rates),
        "per_cpu": statistics.median(per_cpu[1:] or per_cpu),
        "samples": history[-1]["samples"],
        "wall_s": wall,
        "val_mae": out.best.val_mae,
    }


def render(results: list[dict[str, Any]], args: argparse.Namespace, load: tuple) -> str:
    base = results[0]["median"]
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}); the cores are shared with "
        f"other jobs (load average {load[0]:.1f} before, {load[1]:.1f} after), so absolute rates "
        "are indicative.",
        "",
        "```bash",
        " ".join([".venv/bin/python -m bench.train_throughput", *sys.argv[1:]]).strip(),
        "```",
        "",
        f"`demo` preset teacher (Graph WaveNet, 16/16/64/128 channels, 3 blocks), store of "
        f"{args.steps} steps x {args.nodes} nodes x 2 channels, L=12, H=12, batch 32 per worker, "
        f"{args.epochs} epochs, one torch thread per worker, gloo DDP through Ray Train. "
        "samples/s = training windows of all ranks / wall time of the training phase of an epoch "
        "(median over epochs 2..N).",
        "",
        "| workers | windows / epoch | samples/s (median) | per epoch | speed-up vs 1 worker "
        "| samples per CPU-second | efficiency per CPU-second |",
        "|---:|---:|---:|:---|---:|---:|---:|",
    ]
    base_cpu = results[0]["per_cpu"]
    for r in results:
        per_epoch = ", ".join(f"{v:.0f}" for v in r["rates"])
        lines.append(
            f"| {r['workers']} | {r['samples']} | {r['median']:.0f} | {per_epoch} | "
            f"{r['median'] / base:.2f} | {r['per_cpu']:.0f} | {r['per_cpu'] / base_cpu:.2f} |"
        )
    lines.append("")
    if len(results) > 1:
        last = results[-1]
        ratio = last["median"] / base
        projected = last["workers"] * last["per_cpu"] / base_cpu
        lines += [
            f"Wall-clock ratio {last['workers']} workers / 1 worker: **{ratio:.2f}**. "
            "Wall time depends on how much of the 2 cores other jobs took during each run, so "
            "the rate per CPU-second of the worker processes (all threads, training phase) is "
            "the steadier number: with it, "
            f"{last['workers']} workers on {last['workers']} free cores would run "
            f"**{projected:.2f}x** as fast as 1 worker (ideal {last['workers']}.0; each step adds "
            "a gradient all-reduce and a loss-weight all-reduce over gloo).",
            "",
        ]
    return "\n".join(lines)


def write_section(text: str, heading: str = HEADING, path: Path = RESULTS) -> None:
    """Replace section ``heading`` of ``path`` (up to the next ``## ``) or append it."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip("\n") + "\n\n"
    new = (
        pattern.sub(lambda _: block, old)
        if pattern.search(old)
        else old.rstrip("\n") + "\n\n" + block
    )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4032)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    import ray
    import torch

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stkd-bench-") as tmp:
        store = make_store(Path(tmp) / "bench.zarr", args.steps, args.nodes)
        ray.init(num_cpus=max(max(counts), os.cpu_count() or 1), include_dashboard=False)
        try:
            results = [measure(store, Path(tmp) / "storage", w, args.epochs) for w in counts]
        finally:
            ray.shutdown()
    text = render(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
