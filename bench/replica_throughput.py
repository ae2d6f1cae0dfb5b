"""One teacher replica's live throughput vs the in-process forward pass of the same teacher.

Side by side, in one run, on a synthetic store and a freshly built teacher checkpoint:

* ``in-process forward``: the teacher's model calls alone (:meth:`Teacher.run` on inputs read
  beforehand), ``--batch-size`` windows per call in micro-batches of ``--micro-batch``, with
  ``--threads`` intra-op threads: the rate a replica could reach if reading, encoding and the
  network cost nothing;
* ``in-process predict`` (context): :meth:`Teacher.predict`, reading and computing one after the
  other in one thread, as the server's single batching thread did before the pipeline;
* ``in-process forward beside a busy process`` (context): the first again while another process
  keeps the other core busy, as the client (decoding in this process) does to the replica;
* ``stkd serve`` + ``SoftLabelClient``: a ``stkd serve`` process on 127.0.0.1 with the same
  teacher, micro-batch, batch size and threads, computing every label (no cache), streamed to a
  :class:`SoftLabelClient` in this process that decodes and checks every chunk.

Every timed run asks for windows no earlier run asked for (the server keeps recently computed
windows, which would otherwise be served without a forward pass; ``Describe``'s forward count
confirms each streamed window was computed). Runs alternate, best of ``--repeats``. Target: the
served rate >= 0.9 x the in-process forward. The section of ``bench/RESULTS.md`` under the
heading below is replaced.

Usage::

    .venv/bin/python -m bench.replica_throughput                       # ~1-2 minutes on 2 cores
    .venv/bin/python -m bench.replica_throughput --windows 300 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import results

HEADING = "## Teacher replica throughput: served live vs in-process forward"
TARGET = 0.9
# pause before each timed part: the threads of the part before (client, server) go idle first
SETTLE_S = 0.5
REPO = Path(__file__).resolve().parents[1]


def _say(msg: str) -> None:
    print(f"[replica_throughput] {msg}", file=sys.stderr, flush=True)


def make_teacher(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A random store and a teacher checkpoint (``args.model``); returns ``(store, checkpoint)``."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import torch

    from stkd_dist.checkpoint import TrainState, save_checkpoint
    from stkd_dist.config import Config, DataSection, RunSection
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.models import build_forecaster
    from stkd_dist.storage import StoreMeta, choose_chunks, open_store, write_store

    steps, nodes = args.steps, args.nodes
    rng = np.random.default_rng(0)
    t = np.arange(steps)[:, None, None]
    values = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, (1, nodes, 1)))
    values = (values + rng.normal(0, 1, (steps, nodes, 1))).astype(np.float32)
    chunks = choose_chunks(steps, nodes, 1)
    meta = StoreMeta(
        name="bench-replica",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=["speed"],
        freq="5min",
        provenance="random benchmark data",
    )
    path = write_store(
        root / "bench-replica.zarr",
        da.from_array(values, chunks=chunks),
        da.from_array(rng.random(values.shape) >= 0.02, chunks=chunks),
        meta,
        chunks=chunks,
    )
    store = open_store(path)
    cfg = Config(run=RunSection(name="bench-replica"), data=DataSection(dataset=str(path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"spread": True}
    if args.model == "stgnn":
        kwargs.update(
            adjacency=np.eye(nodes, dtype=np.float32),
            residual_channels=16,
            dilation_channels=16,
            skip_channels=32,
            end_channels=64,
            blocks=2,
        )
    else:
        kwargs.update(hidden=32, layers=1)
    model = build_forecaster(args.model, reader.dims, target_scale=reader.target_scale(), **kwargs)
    info = save_checkpoint(
        root / "teacher",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": 1.0},
        state=TrainState(epoch=0),
    )
    return path, info.path


def start_server(store: Path, checkpoint: Path, root: Path, args: argparse.Namespace) -> Any:
    """``stkd serve`` (no cache) on a free port of 127.0.0.1; returns ``(proc, address)``."""
    ready = root / "serve.ready.json"
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    cmd = [
        sys.executable, "-m", "stkd_dist.cli", "serve", "--checkpoint", str(checkpoint),
        "--data", str(store), "--port", "0", "--threads", str(args.threads),
        "--micro-batch", str(args.micro_batch), "--batch-size", str(args.batch_size),
        "--metrics-port", "0", "--ready-file", str(ready),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"stkd serve did not start:\n{(root / 'serve.log').read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return proc, info["address"], int(info["metrics_port"])


def forward_seconds(metrics_port: int) -> float:
    """The server's ``stkd_serve_forward_seconds_total``: time its forward thread spent in the
    model."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("stkd_serve_forward_seconds_total "):
            return float(line.split()[-1])
    raise RuntimeError("the server exports no stkd_serve_forward_seconds_total")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(
    address: str, fingerprint: str, windows: Any, pid: int, metrics_port: int
) -> dict[str, float]:
    """Stream the labels (prediction and spread) of ``windows``: wall and server CPU seconds,
    windows computed, seconds the server's forward thread spent in the model."""
    import numpy as np

    from stkd_dist.serving.client import SoftLabelClient

    with SoftLabelClient([address], expected_fingerprint=fingerprint, prefetch=4) as client:
        before = client.describe().forward_windows
        time.sleep(SETTLE_S)
        busy0 = forward_seconds(metrics_port)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        got = 0
        for idx, _labels in client.stream("train", windows, spread=True):
            got += len(idx)
        wall = time.perf_counter() - t0
        server_cpu = cpu_seconds(pid) - cpu0
        busy = forward_seconds(metrics_port) - busy0
        computed = client.describe().forward_windows - before
    assert got == len(windows), (got, len(windows))
    return {
        "wall": wall,
        "server_cpu": server_cpu,
        "computed": float(computed),
        "busy": busy / wall,  # the teacher's utilisation during the stream
        "rate": len(windows) / wall,
        "n": float(np.size(windows)),
    }


def in_process(teacher: Any, windows: Any, batch_size: int) -> dict[str, float]:
    """Model calls alone on inputs read first, then read+compute serially: seconds of each."""
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    prepared = [teacher.prepare(b) for b in batches]
    time.sleep(SETTLE_S)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for p in prepared:
        teacher.run(p)
    forward = time.perf_counter() - t0
    forward_cpu = time.process_time() - cpu0
    del prepared
    teacher.reader.block_cache.clear()  # predict reads the store as a cold server would
    t0 = time.perf_counter()
    for b in batches:
        teacher.predict(b)
    predict = time.perf_counter() - t0
    return {
        "forward": len(windows) / forward,
        "predict": len(windows) / predict,
        "forward_cpu_ms": 1000 * forward_cpu / len(windows),
    }


BUSY_NEIGHBOUR = "import numpy as np\nx = np.random.rand(2_000_000)\nwhile True:\n    x.sum()\n    sum(range(2000))\n"


def beside_busy_neighbour(teacher: Any, windows: Any, batch_size: int) -> float:
    """The in-process forward rate while another process keeps the other core busy (what the
    client does to the replica while it decodes)."""
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_NEIGHBOUR])
    try:
        time.sleep(SETTLE_S)
        return in_process(teacher, windows, batch_size)["forward"]
    finally:
        neighbour.kill()
        neighbour.wait()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from stkd_dist.serving.teacher import load_teacher

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stkd-bench-replica-") as tmp:
        root = Path(tmp)
        _say(f"writing a {args.steps} x {args.nodes} store and a {args.model} teacher")
        store, ckpt = make_teacher(root, args)
        teacher = load_teacher(ckpt, store, micro_batch=args.micro_batch)
        train = np.asarray(teacher.meta.splits["train"])
        need = args.warmup + 3 * args.repeats * args.windows
        if need > len(train):
            raise SystemExit(f"{need} windows needed, the store has {len(train)}: more --steps")
        proc, address, metrics_port = start_server(store, ckpt, root, args)
        try:
            fp = teacher.meta.fingerprint
            # warm-up: connection, kernels
            served(address, fp, train[: args.warmup], proc.pid, metrics_port)
            in_process(teacher, train[: args.warmup], args.batch_size)
            runs_served, runs_local = [], []
            at = args.warmup
            for r in range(args.repeats):  # alternating, so load from other jobs hits both
                part = train[at : at + args.windows]
                at += args.windows
                runs_served.append(served(address, fp, part, proc.pid, metrics_port))
                runs_local.append(
                    in_process(teacher, train[at : at + args.windows], args.batch_size)
                )
                at += args.windows
                runs_local[-1]["neighbour"] = beside_busy_neighbour(
                    teacher, train[at : at + args.windows], args.batch_size
                )
                at += args.windows
                _say(
                    f"run {r + 1}: served {runs_served[-1]['rate']:.0f} windows/s, in-process "
                    f"forward {runs_local[-1]['forward']:.0f}, predict {runs_local[-1]['predict']:.0f}"
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    best_served = max(runs_served, key=lambda m: m["rate"])
    forward = max(m["forward"] for m in runs_local)
    predict = max(m["predict"] for m in runs_local)
    neighbour = max(m["neighbour"] for m in runs_local)
    out: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}, CPython "
        f"{platform.python_version()})",
        "load": (load, os.getloadavg()[0]),
        "args": vars(args),
        "window_shape": list(teacher.meta.window_shape),
        "served": runs_served,
        "local": runs_local,
        "served_rate": best_served["rate"],
        "served_cpu_per_window_ms": sorted(1000 * m["server_cpu"] / m["n"] for m in runs_served)[
            len(runs_served) // 2
        ],
        "forward_cpu_per_window_ms": sorted(m["forward_cpu_ms"] for m in runs_local)[
            len(runs_local) // 2
        ],
        "computed_all": all(m["computed"] == m["n"] for m in runs_served),
        "forward_rate": forward,
        "predict_rate": predict,
        "neighbour_rate": neighbour,
        "ratio": best_served["rate"] / forward,
    }
    out["cpu_ratio"] = out["forward_cpu_per_window_ms"] / out["served_cpu_per_window_ms"]
    out["busy"] = sorted(m["busy"] for m in runs_served)[len(runs_served) // 2]
    mid = len(runs_served) // 2
    out["median_ratio"] = (
        sorted(m["rate"] for m in runs_served)[mid] / sorted(m["forward"] for m in runs_local)[mid]
    )
    return out


def section(r: dict[str, Any], command: str) -> str:
    """The markdown section for RESULTS.md."""
    a = r["args"]
    ok = "pass" if r["ratio"] >= TARGET else "FAIL"
    lines = [
        HEADING,
        "",
        f"Measured {r['date']} on {r['machine']}; load average (1 min) {r['load'][0]:.1f} at "
        f"the start, {r['load'][1]:.1f} at the end (other jobs share the cores, so absolute "
        "rates are indicative).",
        "",
        "```bash",
        command,
        "```",
        "",
        f"A `{a['model']}` teacher with spread on a {a['steps']} x {a['nodes']} x 1 store "
        f"(labels {r['window_shape']} per window, prediction and spread), batches of "
        f"{a['batch_size']} windows in micro-batches of {a['micro_batch']}, {a['threads']} torch "
        f"thread(s) on both sides. Each run: {a['windows']:,} training windows in order, never "
        f"asked for before; best of {a['repeats']} alternating runs.",
        "",
        "| path | windows/s | vs in-process forward |",
        "|:---|---:|---:|",
        f"| in-process forward (model calls alone, inputs read beforehand) | "
        f"{r['forward_rate']:,.0f} | 1.00 |",
        f"| in-process predict (read, then compute, one thread) | {r['predict_rate']:,.0f} | "
        f"{r['predict_rate'] / r['forward_rate']:.2f} |",
        f"| in-process forward, another process busy on the other core | "
        f"{r['neighbour_rate']:,.0f} | {r['neighbour_rate'] / r['forward_rate']:.2f} |",
        f"| `stkd serve` (pipelined) + `SoftLabelClient`, every label computed | "
        f"{r['served_rate']:,.0f} | **{r['ratio']:.2f}** |",
        "",
        f"Target: served >= {TARGET} x the in-process forward: **{ok}** ({r['ratio']:.2f}, "
        f"best against best; median against median {r['median_ratio']:.2f}).",
        "",
        f"- The server's forward thread spent **{100 * r['busy']:.0f} %** of each stream's wall "
        "time in model calls (median; `stkd_serve_forward_seconds_total`): the pipeline keeps "
        "the teacher busy, reading the next batch and encoding the last one beside it.",
        f"- CPU per window (median): the server {r['served_cpu_per_window_ms']:.2f} ms (all its "
        f"threads: reading, the forward pass, encoding, gRPC), the in-process forward "
        f"{r['forward_cpu_per_window_ms']:.2f} ms (ratio {r['cpu_ratio']:.2f}).",
        "- While the replica computes, the client in this process decodes on the other core, "
        "while the in-process forward runs with that core idle: the fourth line is the same "
        "forward pass beside a busy process, the fairer reference on 2 shared cores. A "
        "wall-clock ratio above 1 is noise (the served path runs the same forward passes plus "
        "its own work).",
        "- Every streamed window was "
        + ("computed by the teacher" if r["computed_all"] else "NOT computed (recent hits)")
        + " (Describe's forward count). Runs (windows/s: served (teacher busy) / forward / "
        "predict / forward beside a busy process): "
        + "; ".join(
            f"{s['rate']:,.0f} ({100 * s['busy']:.0f} %) / {m['forward']:,.0f} / "
            f"{m['predict']:,.0f} / {m['neighbour']:,.0f}"
            for s, m in zip(r["served"], r["local"], strict=True)
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.replica_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=11520, help="time steps (default 11520: 40 days)")
    p.add_argument("--nodes", type=int, default=100, help="nodes (default 100)")
    p.add_argument("--model", choices=("stgnn", "lstm"), default="stgnn", help="teacher model")
    p.add_argument("--batch-size", type=int, default=256, help="windows per batch (default 256)")
    p.add_argument("--micro-batch", type=int, default=32, help="windows per call (default 32)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--windows", type=int, default=500, help="windows per timed run (default 500)")
    p.add_argument("--warmup", type=int, default=128, help="untimed windows first (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="runs of each path (default 5)")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = ".venv/bin/python -m bench.replica_throughput" + (
        " " + shlex.join(argv) if argv else ""
    )
    result = run(args)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "replica_throughput.json").write_text(json.dumps(result, indent=2, default=str))
    text = section(result, command)
    print(text)
    if not args.no_write:
        results.write_section(HEADING, text)
        _say(f"wrote {HEADING!r} to {results.RESULTS}")
    return 0 if result["ratio"] >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
