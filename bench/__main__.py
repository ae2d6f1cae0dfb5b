"""Run the benchmarks: every module ``bench/<name>.py`` (not starting with ``_``) with a ``main``.

Usage::

    .venv/bin/python -m bench              # all, each with its default sizes
    .venv/bin/python -m bench loader       # only the named ones
    .venv/bin/python -m bench --list

Each ``main(argv)`` is called with an empty argument list (its defaults) and returns an exit
status; the run fails when any benchmark fails.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Names of the benchmark modules in this folder that define ``main``."""
    names = []
    for info in sorted(pkgutil.iter_modules([str(HERE)]), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return names


def run_one(name: str) -> int:
    main = importlib.import_module(f"bench.{name}").main
    takes_argv = len(inspect.signature(main).parameters) > 0
    return int((main([]) if takes_argv else main()) or 0)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}"
        )
    failed = []
    for name in args.names or available:
        print(f"== bench {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        status = run_one(name)
        print(
            f"== bench {name}: exit {status} in {time.perf_counter() - t0:.0f} s", file=sys.stderr
        )
        if status:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
