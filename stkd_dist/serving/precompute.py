"""Fill a label cache: ``stkd precompute-labels`` and the pipeline's labels stage.

The teacher runs over every window of the requested splits, whole cache chunks at a time. The
work is cut into time blocks (runs of consecutive chunks of one split) and fanned out:

* ``ray`` (:mod:`~stkd_dist.serving.precompute_ray`): one Ray task per block when a Ray cluster is connected in this process and the caller
  says where workers load the teacher from (``source``). A task asks for as many CPUs as the
  intra-op threads the labels are computed with, and for a GPU (``num_gpus=1``) when the labels
  are computed on GPUs. Each task loads the teacher once per worker process.
* ``threads``: threads of this process otherwise. The teacher's forward passes run one at a time
  (:meth:`Teacher.predict` serialises them) on all intra-op threads, while the other threads read
  windows and encode and upload chunks.

With ``hidden=True`` the cache also stores the teacher's hidden states ``[windows, N, F]``
(every forward pass then returns them too; the labels' bits are unchanged).

Every chunk belongs to exactly one block, so each chunk is written whole by one worker, then its
done marker (see :mod:`stkd_dist.serving.cache`). Tasks on an object-store cache write their
chunks themselves; a local cache path may not exist on other nodes, so there the tasks return
the labels and this process writes them.

Bitwise equality. Labels do not depend on the batch a window was computed in (every forward pass
runs the teacher's fixed micro-batches through the one shared forward function of
:mod:`~stkd_dist.serving.forward`) nor on the worker: every worker runs the same micro-batches
and precision with this process's intra-op thread count (``torch.get_num_threads()``, which
``--threads`` sets), as a server with those settings does. So a parallel fill gives the very bits
of a serial one, and of a live forward pass on the CPU. A GPU fill (``device="cuda"``) is bitwise
stable across GPU fills but not equal to a CPU server: the cache records the device type, the
micro-batch and the precision (``label_device``, ``micro_batch``, ``precision``), and a server
writing through refuses a cache of other settings.

A local cache is written under a temporary name and renamed into place; a cache on an object
store is written in place (a copy of every object would double the cost) and only counts as
complete chunk by chunk, as markers appear. Either way a failure removes what was written, and a
crashed fill leaves nothing a reader takes for complete.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import torch

from stkd_dist import location as loc_
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import PathInput, location
from stkd_dist.serving.cache import DEFAULT_CODEC, DEFAULT_LABEL_DTYPE, LabelCache
from stkd_dist.serving.fill_blocks import Block, BlockRunner, TeacherSource
from stkd_dist.serving.forward import (
    ComputeSettings,
)
from stkd_dist.serving.precompute_ray import default_workers, fill_ray
from stkd_dist.serving.teacher import Teacher

__all__ = ["DEVICES", "FILL_MODES", "TeacherSource", "precompute_labels"]

DEVICES = ("cpu", "cuda", "auto")
FILL_MODES = ("auto", "ray", "threads")
# time blocks per worker: enough to balance uneven workers, few enough to keep tasks coarse
BLOCKS_PER_WORKER = 4


def precompute_labels(
    teacher: Teacher,
    out: PathInput,
    splits: Sequence[str],
    *,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
    codec: str = DEFAULT_CODEC,
    label_dtype: str = DEFAULT_LABEL_DTYPE,
    source: TeacherSource | None = None,
    device: str = "cpu",
    mode: str = "auto",
    precision: str | None = None,
    hidden: bool = False,
) -> LabelCache:
    """Run ``teacher`` on every window of ``splits`` and store the labels at ``out``.

    Args:
        teacher: the teacher (its metadata and store chunking shape the cache; threads run it).
        out: the cache (local path or object-store URL).
        batch_size: windows per teacher call (labels do not depend on it).
        overwrite: replace a cache at ``out``.
        progress: called with the number of windows done after each batch (from any thread;
            calls are serialised).
        workers: parallel workers (threads, or Ray tasks' time blocks); default: 4 threads,
            or the Ray cluster's CPUs (GPUs) per task.
        codec, label_dtype: how chunks are stored (see :class:`LabelCache`).
        source: where Ray workers load the teacher from; without it the fill uses threads.
        device: ``cpu`` (labels bitwise equal to a CPU server), ``cuda``, or ``auto`` (GPUs when
            the cluster, or this machine without Ray, has them).
        mode: ``auto`` (Ray when connected and ``source`` given), ``ray`` or ``threads``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (the last two on CUDA); None: the teacher's.
            The micro-batch is always the teacher's (``teacher.compute.micro_batch``).
        hidden: also compute and store the teacher's hidden states ``[windows, N, F]`` (for
            students trained with ``distill.loss: hint``).

    Raises:
        StoreError: ``out`` exists and ``overwrite`` is False.
        InputError: bad ``batch_size``, ``device`` or ``mode``.
        ConfigError: a precision the device does not offer, or CUDA asked for without it.
    """
    if batch_size < 1:
        raise InputError(f"must be >= 1, got {batch_size}", where="batch_size")
    if device not in DEVICES:
        raise InputError(f"must be one of {', '.join(DEVICES)}, got {device!r}", where="device")
    fill = _fill_mode(mode, source)
    device = _resolve_device(device, fill)
    dest = location(out)
    if loc_.exists(dest) and not overwrite:
        raise StoreError(
            "a label cache exists there; pass --overwrite to replace it", where=str(dest)
        )
    remote = loc_.is_remote(dest)
    target = dest if remote else loc_.temporary_sibling(dest)
    report = _serialised(progress)
    precision = precision or teacher.compute.precision
    # threads compute here (checked against this machine); Ray workers check their own device
    runner = BlockRunner(teacher, device, precision, hidden) if fill == "threads" else None
    compute = (
        runner.compute
        if runner is not None
        else ComputeSettings(device, precision, teacher.compute.micro_batch)
    )
    try:
        cache = LabelCache.create(
            target,
            teacher.meta,
            splits,
            codec=codec,
            label_dtype=label_dtype,
            chunk_steps=int(teacher.reader.store.chunks[0]),
            label_device=compute.device_type,
            micro_batch=compute.micro_batch,
            precision=compute.precision,
            hidden=hidden,
        )
        blocks = _blocks(cache, splits, workers if workers else _default_workers(fill, device))
        if runner is None:
            assert source is not None
            forward = fill_ray(cache, blocks, source, batch_size, compute, remote, report)
        else:
            forward = _fill_threads(cache, blocks, runner, batch_size, workers or 4, report)
        cache.add_forward_windows(forward)
        if not remote:
            loc_.remove(dest)
            loc_.rename_or_copy(target, dest)
    except BaseException:
        loc_.remove(target)
        raise
    return LabelCache(dest)


def _serialised(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """``progress`` called under a lock (workers report from several threads)."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)

    return report


def _fill_mode(mode: str, source: TeacherSource | None) -> str:
    if mode not in FILL_MODES:
        raise InputError(f"must be one of {', '.join(FILL_MODES)}, got {mode!r}", where="mode")
    if mode == "threads":
        return mode
    # a process that never imported Ray is connected to no cluster (and need not pay the import)
    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    if mode == "ray" and (not connected or source is None):
        raise InputError(
            "a Ray fill needs a connected Ray cluster and the teacher's checkpoint and data",
            where="mode",
        )
    return "ray" if connected and source is not None else "threads"


def _resolve_device(device: str, fill: str) -> str:
    if device != "auto":
        return device
    if fill == "ray":
        import ray

        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_workers(fill: str, device: str) -> int:
    if fill != "ray":
        return 4
    return default_workers(device)


def _blocks(cache: LabelCache, splits: Sequence[str], workers: int) -> list[Block]:
    """Time blocks of consecutive chunks, about ``BLOCKS_PER_WORKER`` per worker."""
    chunks = [
        (s, c, w) for s in splits if s in cache.ranges for c, w in enumerate(cache.chunk_windows(s))
    ]
    if not chunks:
        return []
    per_block = max(1, -(-len(chunks) // (BLOCKS_PER_WORKER * max(1, workers))))
    blocks: list[Block] = []
    for split in dict.fromkeys(s for s, _, _ in chunks):
        mine = [(c, w) for s, c, w in chunks if s == split]
        for lo in range(0, len(mine), per_block):
            part = mine[lo : lo + per_block]
            blocks.append(Block(split, tuple(c for c, _ in part), tuple(w for _, w in part)))
    return blocks


def _fill_threads(
    cache: LabelCache,
    blocks: Sequence[Block],
    runner: BlockRunner,
    batch_size: int,
    workers: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Fill ``blocks`` from a thread pool; returns the windows computed."""

    def fill(block: Block) -> int:
        for c, labels in runner.chunks(block.chunks, block.windows, batch_size, progress):
            cache.write_chunk(block.split, c, labels)
        return block.n_windows

    if not blocks:
        return 0
    pool = ThreadPoolExecutor(max(1, min(workers, len(blocks))), "stkd-fill")
    futures = [pool.submit(fill, b) for b in blocks]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            f.result()  # the first failure, if any, is raised here
        return sum(f.result() for f in futures)
    finally:
        # after a failure the blocks not started are dropped; running ones finish their chunk
        pool.shutdown(wait=True, cancel_futures=True)
