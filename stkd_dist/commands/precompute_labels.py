"""``stkd precompute-labels``: run a teacher once over a dataset and store its soft labels."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from upath import UPath

from stkd_dist import location as loc_
from stkd_dist.commands import SUMMARIES
from stkd_dist.data.windows import SPLITS, check_split_name
from stkd_dist.errors import InputError, StoreError
from stkd_dist.paths import storage_root
from stkd_dist.serving.cache import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_LABEL_DTYPE,
    LABEL_DTYPES,
    default_cache_path,
)
from stkd_dist.serving.forward import DEFAULT_MICRO_BATCH, PRECISIONS
from stkd_dist.serving.precompute import DEVICES, TeacherSource, precompute_labels
from stkd_dist.serving.teacher import Teacher, load_teacher

EPILOG = """\
examples:
  # every split, into <storage>/labels/<dataset fingerprint>/<teacher version>.zarr
  stkd precompute-labels --checkpoint my-run --data demo

  # only the training windows, to a chosen path
  stkd precompute-labels --checkpoint runs/my-run/teacher/epoch_0009 --data demo \\
      --splits train --out labels/demo-teacher.zarr

  # into an object store, as float16 (half the bytes; float32 is bitwise a live forward)
  stkd precompute-labels --checkpoint my-run --data demo \\
      --out s3://bucket/labels/demo.zarr --label-dtype float16

`stkd serve --cache auto` then serves these labels without running the teacher. A local cache is
written under a temporary name and renamed when complete; on an object store each chunk counts
once its done marker is written. With a Ray cluster connected (RAY_ADDRESS) the work fans out
over its workers by time block; otherwise --workers threads of this process share it.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``precompute-labels`` parser."""
    p = subparsers.add_parser(
        "precompute-labels",
        help=SUMMARIES["precompute-labels"],
        description=(
            "Run the teacher of a checkpoint on every window of the chosen splits of its dataset "
            "and store the outputs in a Zarr label cache keyed by dataset fingerprint and "
            "teacher version, for `stkd serve --cache`."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="teacher checkpoint, run dir or run name")
    p.add_argument("--data", required=True, help="the teacher's dataset (store path or name)")
    p.add_argument(
        "--splits", default=",".join(SPLITS), help="comma-separated splits (default all)"
    )
    p.add_argument("--out", help="cache path or object-store URL (default under <storage>/labels)")
    p.add_argument("--batch-size", type=int, default=256, help="windows per forward (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--workers",
        type=int,
        help="parallel workers: threads, or Ray time blocks (default: 4, or the cluster's size)",
    )
    p.add_argument(
        "--codec", choices=CODECS, default=DEFAULT_CODEC, help=f"chunk codec ({DEFAULT_CODEC})"
    )
    p.add_argument(
        "--label-dtype",
        choices=LABEL_DTYPES,
        default=DEFAULT_LABEL_DTYPE,
        help="stored label type (float32: bitwise a live forward; 16-bit: half the bytes)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where labels are computed (cpu: bitwise a CPU server; auto: GPUs when present)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), or bf16/fp16 under CUDA autocast (with --device cuda)",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=DEFAULT_MICRO_BATCH,
        help="windows per model call (default %(default)s; a server writing through to the "
        "cache must use the same)",
    )
    p.add_argument(
        "--hidden",
        action="store_true",
        help="also store the teacher's hidden states [N, F] per window (students trained with "
        "distill.loss: hint read them)",
    )
    p.set_defaults(func=run)


def _splits(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise InputError("name at least one split", where="--splits")
    for name in names:
        check_split_name(name)
    if len(set(names)) != len(names):
        raise InputError(f"a split is listed twice: {text}", where="--splits")
    return names


def run(args: argparse.Namespace) -> int:
    """Run ``stkd precompute-labels``."""
    splits = _splits(args.splits)
    if args.batch_size < 1:
        raise InputError(f"must be >= 1, got {args.batch_size}", where="--batch-size")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"must be >= 1, got {args.workers}", where="--workers")
    if args.micro_batch < 1:
        raise InputError(f"must be >= 1, got {args.micro_batch}", where="--micro-batch")
    if args.threads:
        torch.set_num_threads(args.threads)
    # loaded on the CPU: the fill moves it to --device (here or on Ray workers)
    teacher = load_teacher(args.checkpoint, args.data, micro_batch=args.micro_batch)
    meta = teacher.meta
    out = (
        loc_.location(args.out) if args.out else default_cache_path(meta.fingerprint, meta.version)
    )
    if loc_.exists(out) and not args.overwrite:
        raise StoreError(
            "a label cache exists there; pass --overwrite to replace it", where=loc_.url(out)
        )
    connected = _connect_ray()
    try:
        return _fill(args, teacher, out, splits)
    finally:
        if connected:
            import ray

            ray.shutdown()


def _fill(args: argparse.Namespace, teacher: Teacher, out: UPath, splits: list[str]) -> int:
    """Fill the cache at ``out`` and print what was written."""
    meta = teacher.meta
    total = sum(len(meta.splits[s]) for s in splits)
    console = Console(stderr=True)
    print(
        f"stkd precompute-labels: teacher {meta.version} on {total} windows "
        f"({', '.join(f'{s} {len(meta.splits[s])}' for s in splits)})",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    columns = (
        TextColumn("labels"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    done = {"windows": 0, "reported": 0}

    def status_line(n: int) -> None:
        # without a terminal (logs, CI) a line every 10 % instead of a bar
        done["windows"] += n
        if done["windows"] * 10 // max(total, 1) > done["reported"]:
            done["reported"] = done["windows"] * 10 // max(total, 1)
            print(f"stkd precompute-labels: {done['windows']}/{total} windows", file=sys.stderr)

    terminal = console.is_terminal
    with Progress(*columns, console=console, transient=True, disable=not terminal) as bar:
        task = bar.add_task("labels", total=total)
        cache = precompute_labels(
            teacher,
            out,
            splits,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=(lambda n: bar.advance(task, n)) if terminal else status_line,
            workers=args.workers,
            codec=args.codec,
            label_dtype=args.label_dtype,
            # Ray workers resolve run and dataset names under the same storage root
            source=TeacherSource(str(args.checkpoint), str(args.data), loc_.url(storage_root())),
            device=args.device,
            precision=args.precision,
            hidden=args.hidden,
        )
    seconds = time.perf_counter() - started
    print(f"wrote label cache {loc_.url(cache.path)}")
    print(f"  teacher        {meta.version} ({meta.model_key})")
    print(f"  dataset        {meta.fingerprint}")
    print(f"  label shape    {list(meta.window_shape)} per window, spread: {meta.has_spread}")
    if cache.hidden_dim:
        print(f"  hidden states  [{meta.window_shape[1]}, {cache.hidden_dim}] per window")
    print(
        f"  stored         {cache.label_dtype}, {cache.codec}, {cache.stored_bytes():,} bytes "
        f"(labels computed on {cache.label_device}, {cache.computed_with['precision']}, "
        f"micro-batches of {cache.computed_with['micro_batch']})"
    )
    for s in splits:
        print(f"  {s:<14} {cache.filled_windows(s)} windows")
    print(f"  forward passes {cache.forward_windows} windows in {seconds:.1f} s")
    return 0


def _connect_ray() -> bool:
    """Connect to the Ray cluster ``$RAY_ADDRESS`` names, if any: the fill then fans out there.

    Without one the fill runs in threads of this process (no local cluster is started for it:
    on one machine the threads use its cores as well). True when this call connected.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        return False
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=False)
    return True
