"""Several student epochs with labels streamed live (write-through) vs in memory.

A distilled student trains ``--epochs`` epochs (the workers' code path: the rank loader,
:class:`DistillLoss` joining each batch's labels by window index, forward, backward, AdamW; one
rank, one thread) with the teacher's labels

* ``cache path``: what ``serve.mode: cache`` does: precompute the label cache with the teacher
  in this process (one thread), then train from it loaded whole into memory;
* ``in memory`` (informational): the same epochs without the precomputation: labels that are
  already there, the cheapest a student can get them;
* ``streamed, write-through``: streamed by a ``stkd serve --cache NEW --write-through`` process on
  127.0.0.1 that starts with an empty cache: the first epoch runs the teacher on every window
  and stores it, later epochs read it back;
* ``streamed, no cache`` (``--no-cache-mode`` skips it): a ``stkd serve`` process that runs the
  teacher on every request, every epoch (what stream mode did before write-through).

Target: streamed, write-through / cache path <= 1.10 over all epochs (streaming costs no more
than the cache path: the teacher's one pass over the windows is paid in either). Every mode must end with
bitwise identical student parameters. The section of ``bench/RESULTS.md`` under the heading below
is replaced.

Usage::

    .venv/bin/python -m bench.stream_epochs                          # ~3-5 minutes on 2 cores
    .venv/bin/python -m bench.stream_epochs --steps 2016 --no-write  # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import results
from bench.student_epoch import make_inputs, run_epochs, start_server

HEADING = "## Student epochs: streamed with write-through vs in-memory labels"
TARGET = 1.10


def _say(msg: str) -> None:
    print(f"[stream_epochs] {msg}", file=sys.stderr, flush=True)


def section(args: argparse.Namespace, inputs: dict[str, Any], runs: dict, command: str) -> str:
    """The markdown section for RESULTS.md."""
    base = runs["cache path"]["seconds"]
    same = len({r["digest"] for r in runs.values()}) == 1
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
        f"{args.epochs} epochs of a distilled `mlp` (STID) student, rank 0 of 1, one torch "
        f"thread: {inputs['windows']:,} training windows of a {args.steps} x {args.nodes} x 1 "
        f"store, L=12, H=12, batch {args.batch_size}; labels of an `stgnn` teacher "
        f"({inputs['label_mib']:.1f} MiB float32 per epoch). Servers are `stkd serve` "
        "processes (one thread) on 127.0.0.1. Load average (1 min) "
        f"{inputs['load'][0]:.1f} at the start, {inputs['load'][1]:.1f} at the end.",
        "",
        f"| labels | total (s) | per epoch (s) | waiting for labels (s) | / cache path | "
        f"target <= {TARGET:.2f} |",
        "|:---|---:|:---|---:|---:|:---|",
    ]
    for mode, r in runs.items():
        ratio = r["seconds"] / base
        verdict = "-"
        if mode == "streamed, write-through":
            verdict = "pass" if ratio <= TARGET else "FAIL"
        per = ", ".join(f"{s:.1f}" for s in r["epochs"])
        if mode == "cache path":
            per = f"precompute {r['epochs'][0]:.1f}; " + ", ".join(
                f"{s:.1f}" for s in r["epochs"][1:]
            )
        lines.append(
            f"| {mode} | {r['seconds']:.1f} | {per} | {r['wait_s']:.1f} | {ratio:.2f} | {verdict} |"
        )
    lines += [
        "",
        f"The cache path's total includes precomputing the labels ({inputs['cache_seconds']:.1f} "
        "s). With write-through the teacher runs once per window, in the first epoch; the "
        "later epochs read its labels from the cache the server filled. Without a cache a server "
        "still keeps its most recent windows in memory (`ServerConfig.recent_bytes`, 32 MiB): "
        f"here that holds the whole split ({inputs['label_mib']:.1f} MiB), so "
        "`streamed, no cache` is served from memory after its first "
        "epoch too; a split larger than that memory is recomputed every epoch. Student "
        "parameters after "
        f"the last epoch are {'bitwise identical' if same else 'NOT identical'} in all "
        f"{len(runs)} modes.",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.stream_epochs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=4032, help="time steps (default 4032: 14 days)")
    p.add_argument("--nodes", type=int, default=100, help="nodes (default 100)")
    p.add_argument("--batch-size", type=int, default=64, help="windows per batch (default 64)")
    p.add_argument("--epochs", type=int, default=3, help="student epochs (default 3)")
    p.add_argument(
        "--no-cache-mode",
        dest="no_cache",
        action="store_false",
        help="skip the mode that streams without a cache",
    )
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    from stkd_dist.labels.teachers import TeacherSpec

    torch.set_num_threads(1)
    command = ".venv/bin/python -m bench.stream_epochs" + (" " + shlex.join(argv) if argv else "")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="stkd-bench-stream-") as tmp:
        root = Path(tmp)
        _say(f"writing a {args.steps} x {args.nodes} store, a teacher and its label cache")
        inputs = make_inputs(root, args)
        servers = {}
        runs: dict[str, dict] = {}
        try:
            runs["in memory"] = run_epochs(
                inputs, TeacherSpec("cache", str(inputs["cache"])), root, args, args.epochs
            )
            _say(f"in memory: {runs['in memory']['seconds']:.1f} s")
            mem = runs["in memory"]
            runs = {
                "cache path": {
                    **mem,
                    "seconds": mem["seconds"] + inputs["cache_seconds"],
                    "epochs": [inputs["cache_seconds"], *mem["epochs"]],
                },
                **runs,
            }
            cache = str(root / "write-through.zarr")
            servers["wt"] = start_server(inputs, root, "wt", "--cache", cache, "--write-through")
            runs["streamed, write-through"] = run_epochs(
                inputs, TeacherSpec("stream", servers["wt"][1]), root, args, args.epochs
            )
            _say(f"write-through: {runs['streamed, write-through']['seconds']:.1f} s")
            if args.no_cache:
                servers["live"] = start_server(inputs, root, "live")
                runs["streamed, no cache"] = run_epochs(
                    inputs, TeacherSpec("stream", servers["live"][1]), root, args, args.epochs
                )
                _say(f"no cache: {runs['streamed, no cache']['seconds']:.1f} s")
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        inputs["load"] = (load, os.getloadavg()[0])
    text = section(args, inputs, runs, command)
    print(text)
    if not args.no_write:
        results.write_section(HEADING, text)
        _say(f"wrote {HEADING!r} to {results.RESULTS}")
    identical = len({r["digest"] for r in runs.values()}) == 1
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
