"""Peak memory of ``stkd synth`` must not grow with the number of steps.

Runs the generator in a fresh subprocess for ``T`` and ``factor * T`` steps, each child reporting its
own peak RSS (``resource.getrusage``), and checks that the ratio of the peaks stays below
``--max-ratio`` (1.3). The table and the command line are written to ``bench/RESULTS.md`` under
``## Synthetic generator memory`` (only that section is replaced).

Usage::

    .venv/bin/python bench/synth_memory.py --nodes 2000 --steps 20000 --factor 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import results

HEADING = "## Synthetic generator memory"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _rss_mib() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS)
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(nodes: int, steps: int, seed: int) -> dict[str, Any]:
    """Generate one dataset in this process and measure it."""
    from stkd_dist.synth import SynthSpec, synthesize

    baseline = _rss_mib()  # after the imports: the interpreter, numpy, dask, zarr, xarray
    spec = SynthSpec(nodes=nodes, steps=steps, seed=seed)
    with tempfile.TemporaryDirectory(prefix="stkd-synth-bench-") as tmp:
        t = time.perf_counter()
        path = synthesize(spec, Path(tmp) / "bench.zarr")
        seconds = time.perf_counter() - t
        size = _du(path)
    return {
        "nodes": nodes,
        "steps": steps,
        "data_mib": nodes * steps * 4 / 2**20,
        "store_mib": size / 2**20,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _rss_mib(),
        "seconds": seconds,
    }


def run_child(nodes: int, steps: int, seed: int) -> dict[str, Any]:
    """Measure one size in a fresh interpreter (so peaks do not mix)."""
    env = {**os.environ, "STKD_DASK": "threads"}
    cmd = [sys.executable, __file__, "--child", f"--nodes={nodes}", f"--steps={steps}"]
    out = subprocess.run(
        [*cmd, f"--seed={seed}"], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(rows: list[dict[str, Any]], ratio: float, max_ratio: float, command: str) -> str:
    """The markdown section for RESULTS.md."""
    lines = [
        HEADING,
        "",
        "Peak resident memory of one `stkd synth` run (generation, chunked Zarr write, fingerprint",
        "and statistics) in a fresh process per size; `baseline` is the RSS after imports.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| nodes | steps | data (MiB) | store (MiB) | baseline RSS (MiB) | peak RSS (MiB) | time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['steps']} | {r['data_mib']:.0f} | {r['store_mib']:.0f} | "
            f"{r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |"
        )
    verdict = "pass" if ratio < max_ratio else "FAIL"
    lines += [
        "",
        f"Peak RSS ratio {rows[-1]['steps']} / {rows[0]['steps']} steps: **{ratio:.2f}** "
        f"(limit {max_ratio}: {verdict}). Machine: {os.cpu_count()} CPUs, "
        f"{platform.python_implementation()} {platform.python_version()}.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of ``bench/RESULTS.md``."""
    results.write_section(HEADING, text, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20000, help="T; the second run has factor*T")
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ratio", type=float, default=1.3)
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.nodes, args.steps, args.seed)))
        return 0

    rows = []
    for steps in (args.steps, args.factor * args.steps):
        print(f"synth {args.nodes} nodes x {steps} steps ...", file=sys.stderr, flush=True)
        rows.append(run_child(args.nodes, steps, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    command = (
        f".venv/bin/python bench/synth_memory.py --nodes {args.nodes} --steps {args.steps} "
        f"--factor {args.factor}"
    )
    text = section(rows, ratio, args.max_ratio, command)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0 if ratio < args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
