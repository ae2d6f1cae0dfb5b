"""Soft-label delivery benchmark: ``stkd serve`` + ``SoftLabelClient`` vs raw grpcio streaming.

Both sides run on loopback, each server in its own process (a client and a server in one process
would share one GIL):

1. **stkd**: a teacher checkpoint and its label cache (``precompute_labels``) of a synthetic
   store; ``stkd serve --cache`` streams the labels of every training window to a
   :class:`SoftLabelClient` that decodes each chunk, verifies its CRC-32C, teacher version and
   cursor, and hands it over through its prefetch queue.
2. **raw**: a bare grpcio server (generic handler, no protobuf, no processing) streams the same
   number of messages of the same payload size, pre-built, to a client that only counts bytes.

Rates are label payload bytes (and windows) per second of the whole stream, best of
``--repeats`` runs, the two alternating so that load from other jobs hits both alike. Target:
stkd >= 0.5 x raw. CPU seconds per MiB of the server process and of the client (this process)
are reported too: on shared cores they vary less than wall-clock rates. A third line shows the
rate when the teacher computes every label (no cache), which is bound by the model, not by
delivery.

The table is written to ``bench/RESULTS.md`` under ``## Soft-label delivery`` (only that section
is replaced).

Usage::

    .venv/bin/python -m bench.soft_labels                  # defaults, ~1-2 minutes on 2 cores
    .venv/bin/python -m bench.soft_labels --steps 2000 --repeats 1 --no-write    # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

HEADING = "## Soft-label delivery"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]
RAW_METHOD = "/stkd.bench.Raw/Stream"


# -- the raw baseline server (runs in a child process) -----------------------------------------
def raw_server(ready_file: str, max_bytes: int) -> None:
    """Serve ``RAW_METHOD``: request ``b"count,size"`` -> ``count`` messages of ``size`` bytes."""
    import grpc

    def stream(request: bytes, context: grpc.ServicerContext) -> Any:
        count, size = (int(v) for v in request.decode().split(","))
        payload = os.urandom(size)
        for _ in range(count):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "stkd.bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        handlers=[handler],
        options=[("grpc.max_send_message_length", max_bytes)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(ready_file).write_text(json.dumps({"address": f"127.0.0.1:{port}"}))
    server.wait_for_termination()


def raw_client(address: str, count: int, size: int, max_bytes: int) -> float:
    """Seconds to receive ``count`` messages of ``size`` bytes."""
    import grpc

    with grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", max_bytes)]
    ) as ch:
        call = ch.unary_stream(RAW_METHOD)  # no (de)serializers: bytes as they come
        started = time.perf_counter()
        got = 0
        for msg in call(f"{count},{size}".encode(), timeout=600):
            got += len(msg)
        seconds = time.perf_counter() - started
    assert got == count * size, (got, count * size)
    return seconds


# -- setup -------------------------------------------------------------------------------------
def make_teacher(root: Path, steps: int, nodes: int, channels: int) -> tuple[Path, Path]:
    """A random store and a small lstm teacher checkpoint; returns ``(store, checkpoint)``."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import torch

    from stkd_dist.checkpoint import TrainState, save_checkpoint
    from stkd_dist.config import Config, DataSection, RunSection
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.models import build_forecaster
    from stkd_dist.storage import StoreMeta, open_store, write_store

    rng = np.random.default_rng(0)
    t = np.arange(steps)[:, None, None]
    values = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, (1, nodes, channels)))
    values = (values + rng.normal(0, 1, values.shape)).astype(np.float32)
    meta = StoreMeta(
        name="bench",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=[f"c{i}" for i in range(channels)],
        freq="5min",
        provenance="soft-label benchmark data",
    )
    chunks = (512, nodes, channels)
    store_path = write_store(
        root / "bench.zarr",
        da.from_array(values, chunks=chunks),
        da.from_array(np.ones(values.shape, bool), chunks=chunks),
        meta,
        chunks=chunks,
    )
    store = open_store(store_path)
    cfg = Config(run=RunSection(name="bench"), data=DataSection(dataset=str(store_path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(0)
    model = build_forecaster(
        "lstm", reader.dims, target_scale=reader.target_scale(), hidden=16, layers=1
    )
    info = save_checkpoint(
        root / "ckpt",
        model_state=model.state_dict(),
        spec=model.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={},
        state=TrainState(epoch=0),
    )
    return store_path, info.path


def spawn(cmd: list[str], ready: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[:4]} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["address"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Measure:
    """Wall time and CPU time of this process and one server process over a block."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> Measure:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._server = cpu_seconds(self.server_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.client_cpu = time.process_time() - self._cpu
        self.server_cpu = cpu_seconds(self.server_pid) - self._server


def stkd_client(
    address: str, fingerprint: str, windows: np.ndarray, max_bytes: int, dtype: str
) -> tuple[int, int]:
    """``(windows, payload bytes)`` received through one full SoftLabelClient stream."""
    from stkd_dist.serving.client import SoftLabelClient

    with SoftLabelClient(
        [address],
        expected_fingerprint=fingerprint,
        max_message_bytes=max_bytes,
        wire_dtype=dtype,
        prefetch=4,
    ) as client:
        n = 0
        for idx, _labels in client.stream("train", windows):
            n += len(idx)
        return n, client.stats.bytes


# -- the benchmark -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from stkd_dist.serving import codec
    from stkd_dist.serving.precompute import precompute_labels
    from stkd_dist.serving.teacher import load_teacher

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="stkd-bench-labels-") as tmp:
        root = Path(tmp)
        store, ckpt = make_teacher(root, args.steps, args.nodes, args.channels)
        teacher = load_teacher(ckpt, store)
        meta = teacher.meta
        train = meta.splits["train"]
        # the training windows `passes` times over (epochs) in one stream: long enough that
        # connection and stream set-up do not count
        windows = np.tile(np.asarray(train), args.passes)
        cache_path = root / "labels.zarr"
        started = time.perf_counter()
        precompute_labels(teacher, cache_path, ["train"], batch_size=256)
        precompute_s = time.perf_counter() - started

        per_chunk = codec.windows_per_chunk(meta.window_shape, args.dtype, 1, args.max_bytes)
        window_bytes = codec.window_payload_bytes(meta.window_shape, args.dtype, 1)
        count = -(-len(windows) // per_chunk)
        # the raw stream carries the same payload in as many messages of the full chunk size
        raw_size = per_chunk * window_bytes
        total_bytes = len(windows) * window_bytes
        raw_bytes = count * raw_size
        limit = args.max_bytes + 64 * 1024
        live = np.asarray(train)[: args.live_windows]

        serve = [sys.executable, "-m", "stkd_dist.cli", "serve", "--checkpoint", str(ckpt),
                 "--data", str(store), "--port", "0", "--threads", "1"]  # fmt: skip
        raw = [sys.executable, "-m", "bench.soft_labels", "--max-bytes", str(args.max_bytes)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cached_proc, stkd_addr = spawn(
                [*serve, "--cache", str(cache_path), "--ready-file", str(root / "r1.json")],
                root / "r1.json",
                root / "serve-cache.log",
            )
            procs.append(cached_proc)
            raw_proc, raw_addr = spawn(
                [*raw, "--raw-server", str(root / "r2.json")], root / "r2.json", root / "raw.log"
            )
            procs.append(raw_proc)
            live_proc, live_addr = spawn(
                [*serve, "--batch-size", "256", "--ready-file", str(root / "r3.json")],
                root / "r3.json",
                root / "serve-live.log",
            )
            procs.append(live_proc)
            # one untimed stream each: the cache is read into memory, connections warm up
            stkd_client(stkd_addr, meta.fingerprint, np.asarray(train), args.max_bytes, args.dtype)
            raw_client(raw_addr, 2, raw_size, limit)
            stkd_runs, raw_runs = [], []
            for _ in range(args.repeats):  # alternating, so load from other jobs hits both
                with Measure(cached_proc.pid) as m:
                    n, got = stkd_client(
                        stkd_addr, meta.fingerprint, windows, args.max_bytes, args.dtype
                    )
                assert n == len(windows) and got == total_bytes, (n, got, total_bytes)
                stkd_runs.append(m)
                with Measure(raw_proc.pid) as m:
                    raw_client(raw_addr, count, raw_size, limit)
                raw_runs.append(m)
            with Measure(live_proc.pid) as live_m:
                n, _ = stkd_client(live_addr, meta.fingerprint, live, args.max_bytes, args.dtype)
            assert n == len(live)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)

    mib = 2**20
    best_stkd = min(stkd_runs, key=lambda m: m.wall)
    best_raw = min(raw_runs, key=lambda m: m.wall)

    def cpu_per_mib(runs: list[Measure], nbytes: int) -> tuple[float, float]:
        # median CPU ms per MiB of the server and of the client
        server = sorted(1000 * m.server_cpu / (nbytes / mib) for m in runs)
        client = sorted(1000 * m.client_cpu / (nbytes / mib) for m in runs)
        return server[len(server) // 2], client[len(client) // 2]

    stkd_cpu = cpu_per_mib(stkd_runs, total_bytes)
    raw_cpu = cpu_per_mib(raw_runs, raw_bytes)
    return {
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}, CPython "
        f"{platform.python_version()})",
        "load_average": os.getloadavg()[0],
        "store": [args.steps, args.nodes, args.channels],
        "window_shape": list(meta.window_shape),
        "train_windows": len(train),
        "passes": args.passes,
        "windows": len(windows),
        "dtype": args.dtype,
        "max_message_bytes": args.max_bytes,
        "windows_per_chunk": per_chunk,
        "chunks": count,
        "payload_bytes": total_bytes,
        "raw_bytes": raw_bytes,
        "stkd_seconds": [m.wall for m in stkd_runs],
        "raw_seconds": [m.wall for m in raw_runs],
        "stkd_bytes_per_s": total_bytes / best_stkd.wall,
        "stkd_windows_per_s": len(windows) / best_stkd.wall,
        "raw_bytes_per_s": raw_bytes / best_raw.wall,
        "raw_windows_per_s": raw_bytes / window_bytes / best_raw.wall,
        "stkd_cpu_ms_per_mib": stkd_cpu,
        "raw_cpu_ms_per_mib": raw_cpu,
        "live_windows": len(live),
        "live_bytes_per_s": len(live) * window_bytes / live_m.wall,
        "live_windows_per_s": len(live) / live_m.wall,
        "precompute_seconds": precompute_s,
        "ratio": (total_bytes / best_stkd.wall) / (raw_bytes / best_raw.wall),
        "cpu_ratio": sum(raw_cpu) / sum(stkd_cpu),
    }


def render(r: dict[str, Any]) -> str:
    steps, nodes, channels = r["store"]
    mib = 2**20
    ok = "pass" if r["ratio"] >= 0.5 else "FAIL"
    s_cpu, r_cpu = r["stkd_cpu_ms_per_mib"], r["raw_cpu_ms_per_mib"]
    lines = [
        HEADING,
        "",
        f"Measured {r['date']} on {r['machine']}, load average {r['load_average']:.1f} (other "
        "jobs share the cores, so absolute rates are indicative). Servers run in their own "
        "processes, on loopback.",
        "",
        "```bash",
        ".venv/bin/python -m bench.soft_labels",
        "```",
        "",
        f"Labels of the {r['train_windows']:,} training windows of a {steps} x {nodes} x "
        f"{channels} store, {r['passes']} times over in one stream ({r['windows']:,} windows, "
        f"{r['payload_bytes'] / mib:,.0f} MiB): {r['window_shape']} {r['dtype']} per window, "
        f"chunks of up to {r['windows_per_chunk']} windows (max message "
        f"{r['max_message_bytes'] / mib:.0f} MiB). Rates: best of {len(r['stkd_seconds'])} "
        "alternating runs; CPU: median per MiB of payload.",
        "",
        "| path | MiB/s | windows/s | vs raw | server CPU ms/MiB | client CPU ms/MiB |",
        "|:---|---:|---:|---:|---:|---:|",
        f"| raw grpcio, same bytes, no processing | {r['raw_bytes_per_s'] / mib:,.0f} | "
        f"{r['raw_windows_per_s']:,.0f} | 1.00 | {r_cpu[0]:.2f} | {r_cpu[1]:.2f} |",
        f"| `stkd serve --cache` + `SoftLabelClient` | {r['stkd_bytes_per_s'] / mib:,.0f} | "
        f"{r['stkd_windows_per_s']:,.0f} | **{r['ratio']:.2f}** | {s_cpu[0]:.2f} | "
        f"{s_cpu[1]:.2f} |",
        f"| `stkd serve` computing every label (no cache, {r['live_windows']:,} windows) | "
        f"{r['live_bytes_per_s'] / mib:,.1f} | {r['live_windows_per_s']:,.0f} | "
        f"{r['live_bytes_per_s'] / r['raw_bytes_per_s']:.3f} | | |",
        "",
        f"Target: delivery >= 0.5 x raw: **{ok}** ({r['ratio']:.2f}; by CPU per byte, server + "
        f"client: {r['cpu_ratio']:.2f}). The stkd path reads each chunk from the label cache "
        "(held in memory), encodes it, computes and verifies CRC-32C, checks teacher version and "
        "cursor, and passes it through the client's prefetch queue. `stkd precompute-labels` "
        f"took {r['precompute_seconds']:.1f} s for the {r['train_windows']:,} windows (teacher "
        "forward passes and Zarr writes); the last line is bound by the teacher model.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others alone."""
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text + "\n", current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(updated.rstrip("\n") + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soft_labels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=4032, help="store steps (default 4032)")
    parser.add_argument("--nodes", type=int, default=207, help="nodes (default 207)")
    parser.add_argument("--channels", type=int, default=1, help="channels (default 1)")
    parser.add_argument("--dtype", default="float32", help="wire dtype (default float32)")
    parser.add_argument("--max-bytes", type=int, default=3 * 2**20, help="max message bytes")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each path (default 5)")
    parser.add_argument("--passes", type=int, default=20, help="epochs per stream (default 20)")
    parser.add_argument(
        "--live-windows", type=int, default=1000, help="windows streamed with the teacher live"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--raw-server", metavar="READY_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_server:
        raw_server(args.raw_server, args.max_bytes + 64 * 1024)
        return 0
    result = run(args)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soft_labels.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0 if result["ratio"] >= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
