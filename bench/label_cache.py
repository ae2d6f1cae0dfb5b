"""Label cache benchmark: read amplification of a shuffled epoch, and bytes on disk.

A synthetic store shaped like METR-LA (30 days of 5-minute steps, 207 sensors, one channel; time
chunks by the store's own rule, ``choose_chunks``) and an ``lstm`` teacher (random weights, no
spread, trained briefly so that it forecasts the series) give the labels of the training split once (``precompute_labels``, float32, no codec:
the uncompressed reference). The same labels are then written in each stored form
(``fp32-zstd``, ``fp16-zstd``, ``fp32-blosc-zstd``, ``fp16-blosc-zstd``, ``bf16-blosc-zstd``),
and bytes on disk are compared with uncompressed float32.

Read amplification: every rank of a shuffled epoch (the shard plan of ``stkd_dist.data.plan``,
2 ranks and 4) opens the cache through a byte-counting Zarr store wrapper and takes the labels
of each of its batches (valid windows only, as a distilling rank does). Amplification = bytes
the store returned for label chunks / bytes of the labels used, where a used row counts its
share of its chunk object (so compression cancels out). For comparison the same epoch reads a
cache chunked by size alone (4 MiB chunks, the schema-1 layout) through a reader that keeps one
chunk, like the per-batch reads before the chunk cache. Target: <= 2 for the plan-chunked cache.

Usage::

    .venv/bin/python -m bench.label_cache              # defaults, ~1-2 minutes on 2 cores
    .venv/bin/python -m bench.label_cache --steps 2016 --no-write    # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from bench import results

HEADING = "## Label cache: read amplification and bytes on disk"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TARGET = 2.0
WORLDS = (2, 4)
# (name, codec, label dtype) of the stored forms compared
FORMS = (
    ("fp32-none", "none", "float32"),
    ("fp32-zstd", "zstd", "float32"),
    ("fp16-zstd", "zstd", "float16"),
    ("fp32-blosc-zstd", "blosc-zstd", "float32"),
    ("fp16-blosc-zstd", "blosc-zstd", "float16"),
    ("bf16-blosc-zstd", "blosc-zstd", "bfloat16"),
)
AMPLIFICATION_FORMS = ("fp32-zstd", "fp16-zstd", "fp32-blosc-zstd")


def _say(msg: str) -> None:
    print(f"[label_cache] {msg}", file=sys.stderr, flush=True)


class CountingStore(WrapperStore[Store]):
    """A Zarr store counting the bytes it returns, per key: what was fetched from the store."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.fetched: dict[str, int] = {}

    def _with_store(self, store: Store) -> CountingStore:
        twin = CountingStore(store)
        twin.fetched = self.fetched  # zarr re-wraps for read-only views: count in one place
        return twin

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.fetched[key] = self.fetched.get(key, 0) + len(buf)
        return buf


def train_briefly(model: Any, reader: Any, steps: int) -> float:
    """A few hundred Adam steps (masked MAE): the teacher then forecasts the series, so its
    labels vary like real forecasts (a random-weight model outputs nearly one value, which
    compresses unrealistically well). Returns the last batch's MAE."""
    import torch

    windows = np.asarray(reader.windows("train"))
    rng = np.random.default_rng(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    mae = float("nan")
    for _ in range(steps):
        batch = reader.batch(rng.choice(windows, 32, replace=False))
        pred = model(batch.x, batch.time_of_day, batch.day_of_week)
        err = (pred - batch.y).abs() * batch.mask
        loss = err.sum() / batch.mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mae = float(loss.detach())
    model.eval()
    return mae


def make_inputs(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The store, the teacher checkpoint and the uncompressed float32 label cache of train."""
    import dask.array as da
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
        name="bench-label-cache",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=["speed"],
        freq="5min",
        provenance="random benchmark data",
    )
    path = write_store(
        root / "store.zarr",
        da.from_array(values, chunks=chunks),
        da.from_array(np.ones(values.shape, bool), chunks=chunks),
        meta,
        chunks=chunks,
    )
    store = open_store(path)
    cfg = Config(run=RunSection(name="bench-teacher"), data=DataSection(dataset=str(path)))
    reader = WindowReader(store, cfg.data.window(), cfg.data.splits())
    torch.manual_seed(0)
    model = build_forecaster(
        "lstm", reader.dims, target_scale=reader.target_scale(), hidden=16, layers=1
    )
    train_mae = train_briefly(model, reader, args.train_steps)
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
    teacher = load_teacher(info.path, path)
    t0 = time.perf_counter()
    cache = precompute_labels(
        teacher, root / "fp32-none.zarr", ["train"], codec="none", workers=args.workers
    )
    return {
        "teacher": teacher,
        "train_mae": train_mae,
        "store_chunks": chunks,
        "fill_s": time.perf_counter() - t0,
        "reference": cache,
        "windows": teacher.meta.splits["train"],
    }


def write_forms(root: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """Every stored form of the reference labels (plus the size-chunked comparison cache)."""
    from stkd_dist.serving.cache import LabelCache
    from stkd_dist.serving.label_arrays import LabelArrays

    teacher, ref = inputs["teacher"], inputs["reference"]
    pred = ref.read_split("train").prediction
    first = inputs["windows"].start
    caches: dict[str, Any] = {"fp32-none": ref}
    chunk_steps = int(inputs["store_chunks"][0])
    for name, codec, dtype in FORMS[1:]:
        cache = LabelCache.create(
            root / f"{name}.zarr", teacher.meta, ["train"], codec=codec, label_dtype=dtype,
            chunk_steps=chunk_steps,
        )  # fmt: skip
        for c, w in enumerate(cache.chunk_windows("train")):
            cache.write_chunk("train", c, LabelArrays(pred[w - first]))
        caches[name] = LabelCache(cache.path)
    # the comparison: chunks by size alone (no chunk_steps), as schema 1 chunked them
    flat = LabelCache.create(root / "by-size.zarr", teacher.meta, ["train"], codec="zstd")
    for c, w in enumerate(flat.chunk_windows("train")):
        flat.write_chunk("train", c, LabelArrays(pred[w - first]))
    caches["by-size"] = LabelCache(flat.path)
    return caches


def epoch_amplification(
    path: Path, windows: range, chunk_steps: int, world: int, batch: int, keep: int | None
) -> dict[str, float]:
    """Read one shuffled epoch of ``world`` ranks; bytes fetched vs bytes of labels used."""
    from stkd_dist.data.plan import make_plan
    from stkd_dist.serving.cache import LabelCache

    plan = make_plan(windows, chunk_steps, world, epoch=3, seed=11, batch_size=batch)
    fetched = used = 0.0
    per_rank = []
    for r in range(world):
        counters: list[CountingStore] = []

        def wrap(store: Store, counters: list[CountingStore] = counters) -> CountingStore:
            counters.append(CountingStore(store))
            return counters[-1]

        cache = LabelCache(path, wrap_store=wrap, chunk_cache_bytes=keep)
        rows = cache.chunk_rows("train")
        n = len(windows)
        idx, valid = plan.rank(r).entries()
        for lo, hi in plan.batch_bounds():
            ok = valid[lo:hi]
            hit, _ = cache.lookup("train", idx[lo:hi][ok], with_spread=False)
            assert hit.all(), "the cache is complete"
        got = {k: v for k, v in counters[0].fetched.items() if "/prediction/c/" in k}
        sizes = {int(k.split("/c/")[1].split("/")[0]): v for k, v in _stored_sizes(path).items()}
        rank_used = 0.0
        for w in plan.rank(r).windows:
            c = (w - windows.start) // windows.step // rows
            rank_used += sizes[c] / min(rows, n - c * rows)
        rank_fetched = float(sum(got.values()))
        per_rank.append(rank_fetched / rank_used)
        fetched += rank_fetched
        used += rank_used
    return {"amplification": fetched / used, "worst_rank": max(per_rank), "fetched": fetched}


def _stored_sizes(path: Path) -> dict[str, int]:
    """Bytes of each chunk object of ``train/prediction`` (a local cache)."""
    base = path / "train" / "prediction"
    return {
        str(p.relative_to(path)).replace(os.sep, "/"): p.stat().st_size
        for p in (base / "c").rglob("*")
        if p.is_file()
    }


def section(args: argparse.Namespace, inputs: dict[str, Any], out: dict[str, Any], cmd: str) -> str:
    """The markdown section for RESULTS.md."""
    windows = inputs["windows"]
    ref = out["caches"]["fp32-none"]
    raw = len(windows) * int(np.prod(ref.window_shape)) * 4
    chunks = inputs["store_chunks"]
    lines = [
        HEADING,
        "",
        f"Measured {dt.date.today().isoformat()} on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, CPython {platform.python_version()}).",
        "",
        "```bash",
        cmd,
        "```",
        "",
        f"Labels of the {len(windows):,} training windows of a {args.steps} x {args.nodes} x 1 "
        f"store (time chunks of {chunks[0]} steps), [12, {args.nodes}, 1] float32 per window "
        f"({raw / 2**20:.1f} MiB uncompressed), from an `lstm` teacher trained for "
        f"{args.train_steps} Adam steps (train MAE {inputs['train_mae']:.2f}) "
        f"(`precompute_labels`, {args.workers} workers: {inputs['fill_s']:.1f} s). Chunks of "
        f"{ref.chunk_rows('train')} windows follow the shard plan; the size-chunked comparison "
        f"has chunks of {out['caches']['by-size'].chunk_rows('train')} windows.",
        "",
        "Read amplification of one shuffled epoch (batch "
        f"{args.batch_size}): bytes the Zarr store returned for label chunks (counted by a store "
        "wrapper) / bytes of the labels the ranks used (each row's share of its chunk object).",
        "",
        "| cache | ranks | amplification | worst rank | MiB fetched | target <= 2 |",
        "|:---|---:|---:|---:|---:|:---|",
    ]
    for (name, world), r in out["amplification"].items():
        verdict = (
            "(before)"
            if name == "by-size"
            else ("pass" if r["amplification"] <= TARGET else "FAIL")
        )
        label = "by size, one chunk kept (before)" if name == "by-size" else f"{name}, plan chunks"
        lines.append(
            f"| {label} | {world} | {r['amplification']:.2f} | {r['worst_rank']:.2f} | "
            f"{r['fetched'] / 2**20:.1f} | {verdict} |"
        )
    lines += [
        "",
        "Bytes on disk of the label chunks (array metadata included) vs uncompressed float32:",
        "",
        "| stored as | MiB | / fp32 uncompressed | exact |",
        "|:---|---:|---:|:---|",
    ]
    base = out["bytes"]["fp32-none"]
    for name, _, dtype in FORMS:
        b = out["bytes"][name]
        exact = "bitwise" if dtype == "float32" else f"rounded to {dtype}"
        lines.append(f"| {name} | {b / 2**20:.1f} | {b / base:.2f} | {exact} |")
    lines += [
        "",
        "fp32 forms read back bitwise equal to the teacher's forward pass; 16-bit forms hold the "
        "labels rounded to nearest even. Re-running the command above rewrites this section.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.label_cache",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=8640, help="time steps (default 8640: 30 days)")
    p.add_argument("--nodes", type=int, default=207, help="nodes (default 207, as METR-LA)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="fill workers (default 2)")
    p.add_argument(
        "--train-steps", type=int, default=200, help="teacher training steps (default 200)"
    )
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    command = ".venv/bin/python -m bench.label_cache" + (" " + shlex.join(argv) if argv else "")
    with tempfile.TemporaryDirectory(prefix="stkd-bench-label-cache-") as tmp:
        root = Path(tmp)
        _say(f"writing a {args.steps} x {args.nodes} store, a teacher and its labels")
        inputs = make_inputs(root, args)
        caches = write_forms(root, inputs)
        pred = inputs["reference"].read_split("train").prediction
        for name, _, dtype in FORMS:
            if dtype == "float32":  # the fp32 forms are the teacher's bits
                assert np.array_equal(caches[name].read_split("train").prediction, pred), name
        out: dict[str, Any] = {
            "caches": caches,
            "bytes": {name: caches[name].stored_bytes() for name, _, _ in FORMS},
            "amplification": {},
        }
        chunk_steps = int(inputs["store_chunks"][0])
        for name in (*AMPLIFICATION_FORMS, "by-size"):
            keep = 1 if name == "by-size" else None  # the comparison keeps a single chunk
            for world in WORLDS:
                r = epoch_amplification(
                    root / f"{name}.zarr", inputs["windows"], chunk_steps, world,
                    args.batch_size, keep,
                )  # fmt: skip
                out["amplification"][(name, world)] = r
                _say(f"{name}, {world} ranks: amplification {r['amplification']:.2f}")
        text = section(args, inputs, out, command)
    print(text)
    if not args.no_write:
        results.write_section(HEADING, text, RESULTS)
        _say(f"wrote {HEADING!r} to {RESULTS}")
    ok = all(
        r["amplification"] <= TARGET
        for (name, _), r in out["amplification"].items()
        if name != "by-size"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
