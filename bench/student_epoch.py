"""Student epoch benchmark: soft labels streamed from a local teacher server vs in memory.

One distilled-student epoch (the workers' code path: the rank loader, :class:`DistillLoss` joining
each batch's labels by window index, forward, backward, AdamW step; one rank, one thread) is timed
with the teacher's labels

* ``in memory``: the label cache loaded whole into memory before the epoch;
* ``streamed (cache)``: streamed by a ``stkd serve --cache`` process on 127.0.0.1 that reads them
  from the same label cache (the transport: gRPC chunks, checksums, decoding, the join);
* ``streamed (live)``: streamed by a ``stkd serve`` process that runs the teacher on the fly
  (informational: it adds the teacher's own inference time, on the same two cores).

Target: streamed (cache) / in memory <= 1.10. The first two modes alternate, ``--repeats`` times
each, and the best time counts; the live mode runs once (``--no-live`` skips it). Every mode must end with bitwise identical student parameters (the labels are
the same bits). The table is written to ``bench/RESULTS.md`` under the heading below (only that
section is replaced).

Usage::

    .venv/bin/python -m bench.student_epoch                  # defaults, ~2-4 minutes on 2 cores
    .venv/bin/python -m bench.student_epoch --steps 2016 --repeats 1 --no-write   # quick look
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
from pathlib import Path
from typing import Any

from bench import results

HEADING = "## Student epoch: streamed vs in-memory labels"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parents[1]
TARGET = 1.10
MODES = ("in memory", "streamed (cache)", "streamed (live)")


def _say(msg: str) -> None:
    print(f"[student_epoch] {msg}", file=sys.stderr, flush=True)


def make_inputs(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Write the store, a teacher checkpoint and its label cache of the training split."""
    import dask.array as da
    import numpy as np
    import pandas as pd
    import torch

    from stkd_dist.checkpoint import TrainState, save_checkpoint
    from stkd_dist.config import Config, DataSection, RunSection
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.models import build_forecaster
    from stkd_dist.serving.precompute import precompute_labels
    from stkd_dist.serving.teacher import load_teacher
    from stkd_dist.storage import StoreMeta, choose_chunks, open_store, write_store

    steps, nodes = args.steps, args.nodes
    rng = np.random.default_rng(0)
    t = np.arange(steps)[:, None, None]
    values = 50 + 10 * np.sin(2 * np.pi * t / 288 + rng.uniform(0, 6, (1, nodes, 1)))
    values = (values + rng.normal(0, 1, (steps, nodes, 1))).astype(np.float32)
    chunks = choose_chunks(steps, nodes, 1)
    meta = StoreMeta(
        name="bench-student",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=["speed"],
        freq="5min",
        provenance="random benchmark data",
    )
    path = write_store(
        root / "bench-student.zarr",
        da.from_array(values, chunks=chunks),
        da.from_array(np.ones(values.shape, bool), chunks=chunks),
        meta,
        chunks=chunks,
    )
    store = open_store(path)
    cfg = Config(
        run=RunSection(name="bench-teacher"),
        data=DataSection(dataset=str(path), batch_size=args.batch_size),
    )
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(0)
    teacher = build_forecaster(
        "stgnn",
        reader.dims,
        adjacency=np.eye(nodes, dtype=np.float32),
        target_scale=reader.target_scale(),
        residual_channels=16,
        dilation_channels=16,
        skip_channels=32,
        end_channels=64,
        blocks=2,
    )
    info = save_checkpoint(
        root / "teacher",
        model_state=teacher.state_dict(),
        spec=teacher.spec(),
        config=cfg,
        fingerprint=store.fingerprint,
        stats=reader.stats,
        metrics={"val_mae": 1.0},
        state=TrainState(epoch=0),
    )
    t0 = time.perf_counter()
    cache = precompute_labels(load_teacher(info.path, path), root / "labels.zarr", ["train"])
    return {
        "store": path,
        "checkpoint": info.path,
        "cache": cache.path,
        "cache_seconds": time.perf_counter() - t0,
        "windows": len(reader.windows("train")),
        "chunk_steps": store.chunks[0],
        "label_mib": cache.filled_windows("train") * 4 * 12 * nodes / 2**20,
    }


def start_server(inputs: dict[str, Any], root: Path, name: str, *extra: str) -> Any:
    """``stkd serve`` on a free port of 127.0.0.1 with one torch thread; returns (proc, address)."""
    ready = root / f"{name}.ready.json"
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the server
    cmd = [
        sys.executable, "-m", "stkd_dist.cli", "serve", "--checkpoint", str(inputs["checkpoint"]),
        "--data", str(inputs["store"]), "--port", "0", "--threads", "1",
        "--ready-file", str(ready), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"stkd serve did not start: see {root / f'{name}.log'}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["address"]


def run_epochs(
    inputs: dict[str, Any], teacher: Any, root: Path, args: argparse.Namespace, epochs: int = 1
) -> dict:
    """``epochs`` distilled-student epochs of rank 0 of 1 (``args.batch_size``; the client
    prefetches ``args.prefetch`` chunks when given); seconds in all and per epoch, label wait,
    labels delivered, batches per epoch and the final weights' digest."""
    import torch

    from stkd_dist.checkpoint import weights_digest
    from stkd_dist.config import Config, DataSection, RunSection
    from stkd_dist.data.loader import make_loader
    from stkd_dist.labels.teachers import LabelSpec
    from stkd_dist.serving.client import ClientOptions
    from stkd_dist.storage import open_store
    from stkd_dist.train.loop import WorkerContext, build_model, build_reader, global_mean
    from stkd_dist.train.student import DistillLoss

    cfg = Config(
        run=RunSection(name="bench-student", seed=0),
        data=DataSection(dataset=str(inputs["store"]), batch_size=args.batch_size),
    )
    store = open_store(inputs["store"])
    reader = build_reader(cfg, store)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.student, reader, store)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.student.optim.lr)
    prefetch = getattr(args, "prefetch", None)
    client = ClientOptions() if prefetch is None else ClientOptions(prefetch=prefetch)
    labels = LabelSpec(
        (teacher,), store.fingerprint, client=client, in_memory=teacher.kind == "cache"
    )
    ctx = WorkerContext(cfg, reader, store, 0, 1, torch.device("cpu"))
    per_epoch, wait, delivered, batches = [], 0.0, 0, 0
    t0 = time.perf_counter()
    # the label source is opened inside the timing: loading the cache into memory counts too
    loss_fn = DistillLoss(ctx, labels, str(root / f"deliveries-{time.monotonic_ns()}"))
    for epoch in range(epochs):
        e0 = time.perf_counter()
        loader = make_loader(reader, "train", 1, 0, epoch=epoch, seed=0, batch_size=args.batch_size)
        loss_fn.begin_epoch(epoch, loader)
        model.train()
        for batch in loader:
            pred = model(batch.x, batch.time_of_day, batch.day_of_week)
            loss = global_mean(loss_fn(batch, pred), 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        extra = loss_fn.end_epoch(epoch)
        wait += extra["label_wait_s"]
        delivered += extra["labels_delivered"]
        batches = len(loader)
        per_epoch.append(time.perf_counter() - e0)
    seconds = time.perf_counter() - t0
    loss_fn.close()
    return {
        "seconds": seconds,
        "epochs": per_epoch,
        "wait_s": wait,
        "delivered": delivered,
        "digest": weights_digest(model.state_dict()),
        "batches": batches,
    }


def section(args: argparse.Namespace, inputs: dict[str, Any], best: dict, command: str) -> str:
    """The markdown section for RESULTS.md."""
    base = best["in memory"]["seconds"]
    modes = [m for m in MODES if m in best]
    same = len({best[m]["digest"] for m in modes}) == 1
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on 2 CPU cores ({platform.machine()}, CPython "
        f"{platform.python_version()}); other jobs may share the cores, so absolute times are "
        "indicative.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"One epoch of a distilled `mlp` (STID) student, rank 0 of 1, one torch thread: "
        f"{inputs['windows']:,} training windows of a {args.steps} x {args.nodes} x 1 store "
        f"(time chunks of {inputs['chunk_steps']} steps), L=12, H=12, batch {args.batch_size}, "
        f"{best['in memory']['batches']} batches; {inputs['label_mib']:.1f} MiB of float32 labels "
        f"from an `stgnn` teacher. The server is a `stkd serve` process (one thread) on "
        f"127.0.0.1; the client prefetches {args.prefetch} chunks. Best of {args.repeats} "
        f"(live: one epoch). Load average (1 min) {inputs['load'][0]:.1f} at the start, "
        f"{inputs['load'][1]:.1f} at the end.",
        "",
        f"| labels | epoch (s) | waiting for labels (s) | / in memory | target <= {TARGET:.2f} |",
        "|:---|---:|---:|---:|:---|",
    ]
    for mode in modes:
        r = best[mode]
        ratio = r["seconds"] / base
        verdict = "-"
        if mode == "streamed (cache)":
            verdict = "pass" if ratio <= TARGET else "FAIL"
        elif mode == "streamed (live)":
            verdict = "(informational)"
        lines.append(
            f"| {mode} | {r['seconds']:.2f} | {r['wait_s']:.2f} | {ratio:.2f} | {verdict} |"
        )
    lines += [
        "",
        "`streamed (cache)`: the server reads the labels from the label cache "
        f"(`stkd precompute-labels`, {inputs['cache_seconds']:.0f} s for the split), so the "
        "ratio measures the transport. `streamed (live)` runs the teacher for every chunk on the "
        "same two cores as the student. Student parameters after the epoch are "
        f"{'bitwise identical' if same else 'NOT identical'} in all {len(modes)} modes.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of ``bench/RESULTS.md``."""
    results.write_section(HEADING, text, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.student_epoch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=8640, help="time steps (default 8640: 30 days)")
    p.add_argument("--nodes", type=int, default=100, help="nodes (default 100)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per batch (default 64)")
    p.add_argument("--prefetch", type=int, default=8, help="label chunks prefetched (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="epochs per mode; best counts")
    p.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="skip the epoch with labels computed live by the teacher",
    )
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from stkd_dist.labels.teachers import TeacherSpec

    torch.set_num_threads(1)
    command = ".venv/bin/python -m bench.student_epoch" + (" " + shlex.join(argv) if argv else "")
    load = os.getloadavg()[0]  # other jobs on the machine skew the times: say how busy it was
    with tempfile.TemporaryDirectory(prefix="stkd-bench-student-") as tmp:
        root = Path(tmp)
        _say(f"writing a {args.steps} x {args.nodes} store, a teacher and its label cache")
        inputs = make_inputs(root, args)
        servers = {}
        try:
            servers["cache"] = start_server(inputs, root, "cache", "--cache", str(inputs["cache"]))
            if args.live:
                servers["live"] = start_server(inputs, root, "live")
            teachers = {
                "in memory": TeacherSpec("cache", str(inputs["cache"])),
                "streamed (cache)": TeacherSpec("stream", servers["cache"][1]),
                "streamed (live)": TeacherSpec("stream", servers["live"][1]) if args.live else None,
            }
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            plan = [m for _ in range(args.repeats) for m in MODES[:2]]
            for i, mode in enumerate([*plan, *MODES[2:]] if args.live else plan):
                r = run_epochs(inputs, teachers[mode], root, args)
                runs[mode].append(r)
                _say(
                    f"{i + 1}/{len(plan) + args.live} {mode}: {r['seconds']:.2f} s "
                    f"(waited {r['wait_s']:.2f} s for labels)"
                )
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in runs.items() if rs}
        inputs["load"] = (load, os.getloadavg()[0])
    text = section(args, inputs, best, command)
    print(text)
    if not args.no_write:
        write_section(text)
        _say(f"wrote {HEADING!r} to {RESULTS}")
    ratio = best["streamed (cache)"]["seconds"] / best["in memory"]["seconds"]
    identical = len({r["digest"] for r in best.values()}) == 1
    _say(f"streamed (cache) / in memory = {ratio:.2f} (target <= {TARGET:.2f})")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
