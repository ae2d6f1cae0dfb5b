"""Loader throughput from an S3-compatible server vs the same store on local disk.

One store of random readings is written twice, with the same ``write_store``: to a local folder
and to a bucket of a real S3-compatible HTTP server on 127.0.0.1 (:class:`stkd_dist.testing.S3Server`,
moto's server mode). One rank then iterates one training epoch of each (``make_loader``: block
reads with a prefetch thread), alternating local and S3 runs so both see the same background
load; each run is a fresh process. Reported: windows/s, best of ``--repeat`` runs, and their ratio
(target: S3 >= 0.5 x local). The section ``## Object storage`` of ``bench/RESULTS.md`` is
replaced.

The server is a Python process on the same 2 cores, so the ratio is a lower bound for a real
object store, which serves requests on other machines.

Usage::

    .venv/bin/python -m bench.object_store             # ~2-4 minutes on 2 cores
    .venv/bin/python -m bench.object_store --repeat 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import results

HEADING = "## Object storage"
REPO = Path(__file__).resolve().parents[1]


def child_write(url: str, steps: int, nodes: int) -> dict[str, Any]:
    """Write the random store at ``url`` (local path or s3://)."""
    import dask.array as da
    import numpy as np
    import pandas as pd

    from stkd_dist.storage import StoreMeta, choose_chunks, write_store

    chunks = choose_chunks(steps, nodes, 1)
    rs = da.random.RandomState(0)
    values = (50 + 10 * rs.standard_normal((steps, nodes, 1), chunks=chunks)).astype(np.float32)
    mask = rs.random_sample((steps, nodes, 1), chunks=chunks) > 0.02
    meta = StoreMeta(
        name="bench",
        time=pd.date_range("2024-01-01", periods=steps, freq="5min"),
        node_ids=[f"s{i}" for i in range(nodes)],
        channels=["flow"],
        freq="5min",
        provenance="random benchmark data",
    )
    t = time.perf_counter()
    write_store(url, values, mask, meta, chunks=chunks)
    return {"seconds": time.perf_counter() - t, "chunks": list(chunks)}


def child_epoch(url: str, batch_size: int) -> dict[str, Any]:
    """One rank, one training epoch of the store at ``url``: windows/s."""
    import torch

    from stkd_dist.data.loader import make_loader
    from stkd_dist.data.reader import WindowReader
    from stkd_dist.data.windows import WindowSpec
    from stkd_dist.storage import open_store

    torch.set_num_threads(1)
    t_open = time.perf_counter()
    reader = WindowReader(open_store(url), WindowSpec(12, 12, 1))
    loader = make_loader(reader, "train", 1, 0, batch_size=batch_size, seed=1)
    opened = time.perf_counter() - t_open
    t0, c0 = time.perf_counter(), time.process_time()
    windows = 0
    for b in loader:
        windows += int(b.valid.sum())
    seconds = time.perf_counter() - t0
    return {
        "windows": windows,
        "seconds": seconds,
        "wps": windows / seconds,
        "cpu": time.process_time() - c0,
        "open_s": opened,
    }


def _run(kind: str, env: dict[str, str], *args: object) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.object_store", "--child", kind, *map(str, args)]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=17_280, help="time steps (default 60 days)")
    p.add_argument("--nodes", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--child", choices=["write", "epoch"], help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child == "write":
        print(json.dumps(child_write(a.args[0], a.steps, a.nodes)))
        return 0
    if a.child == "epoch":
        print(json.dumps(child_epoch(a.args[0], a.batch_size)))
        return 0

    from stkd_dist.testing import S3Server

    base = {**os.environ, "STKD_DASK": "threads", "OMP_NUM_THREADS": "1"}
    load0 = os.getloadavg()[0]
    with S3Server() as server, tempfile.TemporaryDirectory(prefix="stkd-bench-s3-") as tmp:
        env = {**base, **server.env()}
        bucket = server.make_bucket()
        stores = {"local": str(Path(tmp) / "bench.zarr"), "s3": f"s3://{bucket}/bench.zarr"}
        shape = ["--steps", a.steps, "--nodes", a.nodes]
        writes = {k: _run("write", env, *shape, url) for k, url in stores.items()}
        size = sum(f.stat().st_size for f in Path(stores["local"]).rglob("*") if f.is_file())
        best: dict[str, dict[str, Any]] = {}
        for rep in range(a.repeat):
            for kind, url in stores.items():
                r = _run("epoch", env, "--batch-size", a.batch_size, url)
                if kind not in best or r["wps"] > best[kind]["wps"]:
                    best[kind] = r
                print(f"[bench.object_store] {rep + 1}/{a.repeat} {kind}: {r['wps']:,.0f} windows/s", file=sys.stderr)  # fmt: skip
    ratio = best["s3"]["wps"] / best["local"]["wps"]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python -m bench.object_store", *map(shlex.quote, given)])
    chunks = writes["local"]["chunks"]
    text = "\n".join(
        [
            HEADING,
            "",
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; load average {load0:.1f} at start, "
            f"2 cores). One store of {a.steps} steps x {a.nodes} nodes x 1 channel "
            f"({size / 2**20:.0f} MiB on disk, chunks {chunks}), written by `write_store` to a "
            "local folder and to a bucket of an S3-compatible server on 127.0.0.1 (moto's server "
            "mode, a Python process on the same cores). One rank iterates one training epoch "
            f"(batch {a.batch_size}, 12 in / 12 out steps), best of {a.repeat} runs each, local "
            "and S3 runs alternating.",
            "",
            "| store | windows/s | epoch s | open s | write s |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {k} | {best[k]['wps']:,.0f} | {best[k]['seconds']:.2f} | "
                f"{best[k]['open_s']:.2f} | {writes[k]['seconds']:.1f} |"
                for k in ("local", "s3")
            ),
            "",
            f"**S3 / local = {ratio:.2f}** (target >= 0.5: {'met' if ratio >= 0.5 else 'MISSED'}).",
            "",
        ]
    )
    print(text)
    if not a.no_write:
        results.write_section(HEADING, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
