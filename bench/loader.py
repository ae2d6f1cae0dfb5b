"""Data loader benchmark: windows/s from Zarr vs in memory, and peak memory on a large store.

1. **Throughput.** One epoch of the training split is iterated by ``make_loader`` reading blocks
   from a Zarr store, and by the in-memory path: the same plan's batches cut with
   ``WindowReader.batch_from_block`` out of the whole series held as a NumPy array. Each for 1 and
   2 ranks; 2 ranks are 2 processes started together (a barrier), total windows/s = all windows /
   (last end - first start). Target: Zarr >= 0.5 x in memory.
2. **Memory.** One rank iterates a synthetic store ``--mem-factor`` (4) times larger than the
   memory budget (values alone), in a fresh process that reports its peak RSS
   (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The budget applies to what the data plane
   adds on top of the process baseline (interpreter, torch, zarr, the opened store and reader);
   the absolute peak is reported too. Target: the added peak stays under the budget.

Every measurement runs in its own process, started from this lean parent (no torch, no zarr), so
one measurement's memory never shows in another's peak. The table is written to
``bench/RESULTS.md`` under ``## Data loader`` (only that section is replaced).

Usage::

    .venv/bin/python -m bench.loader                     # defaults, ~2-4 minutes on 2 cores
    .venv/bin/python -m bench.loader --steps 8640 --budget-mib 64 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from typing import Any

from bench import results

HEADING = "## Data loader"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]


# -- measurements (run in child processes) -----------------------------------------------------
def _rss_mib() -> float:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak so far is the best available
        return _rss_mib()


def child_write(path: str, steps: int, nodes: int, channels: int, seed: int) -> dict[str, Any]:
    """Write a random store of ``steps x nodes x channels`` with ``write_store`` (Dask, chunked)."""
    import dask.array as da
    import numpy as np
    import pandas as pd

    from stkd_dist.storage import StoreMeta, choose_chunks, write_store

    chunks = choose_chunks(steps, nodes, channels)
    rs = da.random.RandomState(seed)
    values = (50 + 10 * rs.standard_normal((steps, nodes, channels), chunks=chunks)).astype(
        np.float32
    )
    mask = rs.random_sample((steps, nodes, channels), chunks=chunks) > 0.02
    meta = StoreMeta(
        name=Path(path).stem,
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        provenance="random benchmark data",
    )
    t = time.perf_counter()
    write_store(path, values, mask, meta, chunks=chunks)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - t, "store_mib": size / 2**20, "chunks": chunks}


def _reader(path: str, input_steps: int, horizon: int, stride: int = 1) -> Any:
    import torch

    from stkd_dist.data.reader import WindowReader
    from stkd_dist.data.windows import WindowSpec
    from stkd_dist.storage import open_store

    torch.set_num_threads(1)
    return WindowReader(open_store(path), WindowSpec(input_steps, horizon, stride))


def child_throughput(a: argparse.Namespace) -> dict[str, Any]:
    """One rank of one epoch, ``zarr`` (RankLoader) or ``memory`` (whole array in RAM)."""
    from stkd_dist.data.loader import make_loader

    reader = _reader(a.path, a.input_steps, a.horizon)
    loader = make_loader(reader, "train", a.world_size, a.rank, batch_size=a.batch_size, seed=1)
    if a.mode == "memory":
        values, mask = reader.store.read(0, reader.store.steps)  # the whole series in RAM
        idx, valid = loader.shard.entries()
        bounds = loader.plan.batch_bounds()
    print("ready", flush=True)  # barrier: wait until every rank of the run is set up
    sys.stdin.readline()
    t0, c0 = time.time(), time.process_time()
    windows = 0
    if a.mode == "memory":
        for lo, hi in bounds:
            b = reader.batch_from_block(values, mask, 0, idx[lo:hi], valid[lo:hi])
            windows += int(b.valid.sum())
    else:
        for b in loader:
            windows += int(b.valid.sum())
    return {"windows": windows, "t0": t0, "t1": time.time(), "cpu": time.process_time() - c0}


def child_memory(a: argparse.Namespace) -> dict[str, Any]:
    """Iterate one rank over the big store; report baseline and peak RSS."""
    from stkd_dist.data.loader import make_loader

    reader = _reader(a.path, a.input_steps, a.horizon, a.mem_stride)
    loader = make_loader(reader, "train", 1, 0, batch_size=a.batch_size, seed=1)
    baseline = _current_rss_mib()
    baseline_peak = _rss_mib()
    t = time.perf_counter()
    windows = batches = 0
    for b in loader:
        windows += int(b.valid.sum())
        batches += 1
    cs = reader.store.chunks[0]
    block_mib = (cs + reader.window.length - 1) * reader.store.nodes * reader.store.shape[2] * 5
    return {
        "baseline_rss_mib": baseline,
        "baseline_peak_mib": baseline_peak,
        "peak_rss_mib": _rss_mib(),
        "windows": windows,
        "batches": batches,
        "seconds": time.perf_counter() - t,
        "chunk_steps": cs,
        "block_mib": block_mib / 2**20,
        "train_steps": reader.windows("train").stop + reader.window.length - 1,
    }


# -- orchestration (parent) --------------------------------------------------------------------
def _child_cmd(args: argparse.Namespace, kind: str, **extra: Any) -> list[str]:
    cmd = [sys.executable, "-m", "bench.loader", "--child", kind]
    for key in ("input_steps", "horizon", "batch_size", "mem_stride"):
        cmd.append(f"--{key.replace('_', '-')}={getattr(args, key)}")
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    return cmd


def _env() -> dict[str, str]:
    # one thread per process for torch and Dask: the ranks share the machine's cores
    return {**os.environ, "STKD_DASK": "threads", "OMP_NUM_THREADS": "1"}


def _run_json(cmd: list[str]) -> dict[str, Any]:
    out = subprocess.run(cmd, cwd=REPO, env=_env(), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ranks(args: argparse.Namespace, path: Path, mode: str, world_size: int) -> dict[str, Any]:
    """Start ``world_size`` rank processes, release them together, return total windows/s."""
    procs = [
        subprocess.Popen(
            _child_cmd(args, "throughput", path=path, mode=mode, world_size=world_size, rank=r),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    for p in procs:  # wait until every rank has imported, opened and planned
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"rank process failed to start (got {line!r})")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"rank process exited with {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    windows = sum(r["windows"] for r in results)
    seconds = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    return {"windows": windows, "seconds": seconds, "wps": windows / seconds, "wpcs": windows / cpu}


def section(args: argparse.Namespace, data: dict[str, Any], command: str) -> str:
    """The markdown section for RESULTS.md."""
    tp, mem = data["throughput"], data["memory"]
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, {platform.python_implementation()} {platform.python_version()}); "
        f"other jobs shared the cores (1-minute load average {data['load'][0]:.1f} at the start, "
        f"{data['load'][1]:.1f} at the end), so wall-clock rates are indicative.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"**Throughput**: training split of a {args.steps} x {args.nodes} x {args.channels} store "
        f"(time chunks of {data['tp_store']['chunks'][0]} steps, "
        f"{data['tp_store']['store_mib']:.0f} MiB on disk), L={args.input_steps}, "
        f"H={args.horizon}, batch {args.batch_size}, one epoch per rank, best of {args.repeat} "
        "(Zarr and in-memory runs alternate). Windows/s is wall clock (2 ranks: all windows over "
        "first start to last end); the last column compares windows per CPU-second of the "
        "rank processes, which background load disturbs less.",
        "",
        "| ranks | Zarr (windows/s) | in memory (windows/s) | Zarr / memory | target >= 0.5 "
        "| Zarr / memory per CPU-second |",
        "|---:|---:|---:|---:|:---|---:|",
    ]
    ok = True
    for w in (1, 2):
        z, m = tp[f"zarr-{w}"]["wps"], tp[f"memory-{w}"]["wps"]
        cpu_ratio = tp[f"zarr-{w}"]["wpcs"] / tp[f"memory-{w}"]["wpcs"]
        passed = z / m >= 0.5
        ok &= passed
        lines.append(
            f"| {w} | {z:,.0f} | {m:,.0f} | {z / m:.2f} | {'pass' if passed else 'FAIL'} "
            f"| {cpu_ratio:.2f} |"
        )
    spread = "; ".join(
        f"{k}: {min(v['all']):,.0f}-{max(v['all']):,.0f}" for k, v in sorted(tp.items())
    )
    lines += ["", f"All runs, windows/s (mode-ranks: min-max): {spread}."]
    added = mem["peak_rss_mib"] - mem["baseline_rss_mib"]
    mem_ok = added < args.budget_mib
    ok &= mem_ok
    lines += [
        "",
        f"**Memory**: one rank iterates the training split ({mem['train_steps']} steps, "
        f"{mem['windows']:,} windows at stride {args.mem_stride}, {mem['batches']} batches, "
        f"{mem['seconds']:.0f} s) of a {data['mem_steps']} x {args.mem_nodes} x {args.channels} "
        f"store of {data['mem_values_mib']:.0f} MiB of values ({data['mem_store']['store_mib']:.0f} "
        f"MiB on disk), {args.mem_factor}x the budget. A block (chunk of "
        f"{mem['chunk_steps']} steps + halo, values and mask) is {mem['block_mib']:.1f} MiB.",
        "",
        "| budget (MiB) | baseline RSS (MiB) | peak RSS (MiB) | added by iterating (MiB) | target |",
        "|---:|---:|---:|---:|:---|",
        f"| {args.budget_mib} | {mem['baseline_rss_mib']:.0f} | {mem['peak_rss_mib']:.0f} | "
        f"{added:.0f} | {'pass' if mem_ok else 'FAIL'}: added < budget |",
        "",
        "Baseline = resident memory after importing torch/zarr and opening the store and reader "
        "(before iterating); peak = `ru_maxrss` of the process after the epoch.",
        "",
    ]
    data["ok"] = ok
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of ``bench/RESULTS.md``."""
    results.write_section(HEADING, text, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=207, help="throughput store nodes")
    p.add_argument("--steps", type=int, default=34272, help="throughput store steps (~4 months)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--input-steps", type=int, default=12)
    p.add_argument("--horizon", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="throughput runs per setting (best)")
    p.add_argument("--budget-mib", type=int, default=256, help="memory budget of a rank")
    p.add_argument("--mem-factor", type=int, default=4, help="store values = factor x budget")
    p.add_argument("--mem-nodes", type=int, default=512, help="memory store nodes")
    p.add_argument("--mem-stride", type=int, default=8, help="window stride of the memory run")
    p.add_argument("--workdir", type=Path, default=None, help="keep the stores here")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--child", choices=("write", "throughput", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("zarr", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--world-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--write-steps", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--write-nodes", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[bench.loader] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "write":
        print(
            json.dumps(child_write(args.path, args.write_steps, args.write_nodes, args.channels, 0))
        )
        return 0
    if args.child == "throughput":
        print(json.dumps(child_throughput(args)))
        return 0
    if args.child == "memory":
        print(json.dumps(child_memory(args)))
        return 0

    t_start = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="stkd-bench-loader-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {}
        tp_path, mem_path = work / "throughput.zarr", work / "memory.zarr"
        mem_steps = (
            args.mem_factor * args.budget_mib * 2**20 // (args.mem_nodes * args.channels * 4)
        )
        data["mem_steps"] = mem_steps
        data["mem_values_mib"] = mem_steps * args.mem_nodes * args.channels * 4 / 2**20
        for path, steps, nodes, key in (
            (tp_path, args.steps, args.nodes, "tp_store"),
            (mem_path, mem_steps, args.mem_nodes, "mem_store"),
        ):
            if path.exists():
                import shutil

                shutil.rmtree(path)
            _say(f"writing {path.name}: {steps} x {nodes} x {args.channels} ...")
            data[key] = _run_json(
                [
                    *_child_cmd(args, "write", path=path, write_steps=steps, write_nodes=nodes),
                    f"--channels={args.channels}",
                ]
            )
            _say(f"  {data[key]['store_mib']:.0f} MiB in {data[key]['seconds']:.0f} s")

        # Zarr and in-memory runs alternate so both see the same background load; best of N
        best: dict[str, dict[str, Any]] = {}
        for rep in range(args.repeat):
            for world in (1, 2):
                for mode in ("zarr", "memory"):
                    r = run_ranks(args, tp_path, mode, world)
                    key = f"{mode}-{world}"
                    runs = best.get(key, {}).get("all", [])
                    if key not in best or r["wps"] > best[key]["wps"]:
                        best[key] = r
                    best[key]["all"] = [*runs, r["wps"]]
                    _say(
                        f"run {rep + 1}/{args.repeat}: {mode} x {world} rank(s): "
                        f"{r['wps']:,.0f} windows/s, {r['wpcs']:,.0f} windows per CPU-second"
                    )
        data["throughput"] = best

        _say(f"memory: one rank over {mem_path.name} (budget {args.budget_mib} MiB) ...")
        data["memory"] = _run_json(_child_cmd(args, "memory", path=mem_path))
        _say(json.dumps(data["memory"]))

    data["load"] = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.loader", *map(shlex.quote, given)]).strip()
    text = section(args, data, command)
    print(text)
    if not args.no_write:
        write_section(text)
    _say(f"done in {time.perf_counter() - t_start:.0f} s: {'pass' if data['ok'] else 'FAIL'}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
