"""Fill a label cache: ``stkd precompute-labels`` and the pipeline's labels stage.

The teacher runs over every window of the requested splits, whole cache chunks at a time. The
work is cut into time blocks (runs of consecutive chunks of one split) and fanned out:

* ``ray``: one Ray task per block when a Ray cluster is connected in this process and the caller
  says where workers load the teacher from (``source``). A task asks for as many CPUs as the
  intra-op threads the labels are computed with, and for a GPU (``num_gpus=1``) when the labels
  are computed on GPUs. Each task loads the teacher once per worker process.
* ``threads``: threads of this process otherwise. The teacher's forward passes run one at a time
  (:meth:`Teacher.predict` serialises them) on all intra-op threads, while the other threads read
  windows and encode and upload chunks.

Every chunk belongs to exactly one block, so each chunk is written whole by one worker, then its
done marker (see :mod:`stkd_dist.serving.cache`). Tasks on an object-store cache write their
chunks themselves; a local cache path may not exist on other nodes, so there the tasks return
the labels and this process writes them.

Bitwise equality. Labels do not depend on the batch a window was computed in (the teacher runs
fixed micro-batches, :data:`~stkd_dist.serving.teacher.MICRO_BATCH`) nor on the worker: every
worker runs the same micro-batches with this process's intra-op thread count
(``torch.get_num_threads()``, which ``--threads`` sets), as a server with that thread count
does. So a parallel fill gives the very bits of a serial one, and of a live forward pass on the
CPU. A GPU fill (``device="cuda"``) is bitwise stable across GPU fills but not equal to a CPU
server: the cache records ``label_device``.

A local cache is written under a temporary name and renamed into place; a cache on an object
store is written in place (a copy of every object would double the cost) and only counts as
complete chunk by chunk, as markers appear. Either way a failure removes what was written, and a
crashed fill leaves nothing a reader takes for complete.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from upath import UPath

from stkd_dist import location as loc_
from stkd_dist.errors import InputError, StoreError
from stkd_dist.location import location
from stkd_dist.serving.cache import DEFAULT_CODEC, DEFAULT_LABEL_DTYPE, LabelCache
from stkd_dist.serving.teacher import MICRO_BATCH, Teacher

DEVICES = ("cpu", "cuda", "auto")
FILL_MODES = ("auto", "ray", "threads")
# time blocks per worker: enough to balance uneven workers, few enough to keep tasks coarse
BLOCKS_PER_WORKER = 4

Labels = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class TeacherSource:
    """Where a worker loads the teacher from (the arguments of ``load_teacher``)."""

    checkpoint: str
    data: str
    storage: str | None = None


@dataclass(frozen=True)
class _Block:
    """A time block: consecutive chunks of one split, and the windows of each."""

    split: str
    chunks: tuple[int, ...]
    windows: tuple[np.ndarray, ...]

    @property
    def n_windows(self) -> int:
        return int(sum(len(w) for w in self.windows))


class _Runner:
    """Runs a teacher on windows on one device, in the teacher's micro-batches."""

    def __init__(self, teacher: Teacher, device: str) -> None:
        self.teacher = teacher
        self.device = torch.device(device)
        self._lock = threading.Lock()
        # a CPU run is the serving teacher's own predict; a GPU run needs a model on the GPU
        # (a copy: the caller's teacher stays on the CPU)
        self.model = (
            teacher.model if self.device.type == "cpu" else copy.deepcopy(teacher.model).to(device)
        )

    def predict(self, idx: np.ndarray) -> Labels:
        """``(prediction, spread)`` of windows ``idx`` as :meth:`Teacher.predict` computes them."""
        if self.device.type == "cpu":
            return self.teacher.predict(idx)
        n = len(idx)
        padded = np.concatenate([idx, np.repeat(idx[-1:], -n % MICRO_BATCH)])
        batch = self.teacher.reader.batch(padded)
        means, spreads = [], []
        has_spread = self.teacher.meta.has_spread
        with self._lock, torch.inference_mode():
            for lo in range(0, len(padded), MICRO_BATCH):
                part = slice(lo, lo + MICRO_BATCH)
                x, tod, dow = (
                    t[part].to(self.device) for t in (batch.x, batch.time_of_day, batch.day_of_week)
                )
                if has_spread:
                    mean, log_var = self.model.forward_with_spread(x, tod, dow)
                    spreads.append(log_var.float().cpu())
                else:
                    mean = self.model(x, tod, dow)
                means.append(mean.float().cpu())
        spread = torch.cat(spreads)[:n].numpy() if spreads else None
        return torch.cat(means)[:n].numpy(), spread

    def chunks(
        self,
        chunks: Sequence[int],
        windows: Sequence[np.ndarray],
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """``(chunk, prediction, spread)`` of consecutive chunks, computed ``batch_size`` at a time.

        Chunks may hold fewer windows than a micro-batch: consecutive chunks are computed
        together (at least ``batch_size`` windows per group, whole chunks) so that no call pads
        a few windows to a whole micro-batch, then split again for writing.
        """
        if len(chunks) != len(windows):
            raise ValueError("one window array per chunk")
        group: list[int] = []
        for i in range(len(chunks)):
            group.append(i)
            if sum(len(windows[j]) for j in group) < batch_size and i < len(chunks) - 1:
                continue
            index = np.concatenate([windows[j] for j in group])
            preds, spreads = [], []
            for b in range(0, len(index), batch_size):
                pred, spread = self.predict(index[b : b + batch_size])
                preds.append(pred)
                spreads.append(spread)
                if progress is not None:
                    progress(len(pred))
            pred_all = np.concatenate(preds)
            spread_all = np.concatenate(spreads) if self.teacher.meta.has_spread else None
            lo = 0
            for j in group:
                hi = lo + len(windows[j])
                yield chunks[j], pred_all[lo:hi], None if spread_all is None else spread_all[lo:hi]
                lo = hi
            group = []


def precompute_labels(
    teacher: Teacher,
    out: str | os.PathLike[str] | UPath,
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

    Raises:
        StoreError: ``out`` exists and ``overwrite`` is False.
        InputError: bad ``batch_size``, ``device`` or ``mode``.
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
    try:
        cache = LabelCache.create(
            target,
            teacher.meta,
            splits,
            codec=codec,
            label_dtype=label_dtype,
            chunk_steps=int(teacher.reader.store.chunks[0]),
            label_device=device,
        )
        blocks = _blocks(cache, splits, workers if workers else _default_workers(fill, device))
        if fill == "ray":
            assert source is not None
            forward = _fill_ray(cache, blocks, source, batch_size, device, remote, report)
        else:
            forward = _fill_threads(
                cache, blocks, _Runner(teacher, device), batch_size, workers or 4, report
            )
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
    import ray

    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1) // _task_cpus()))


def _task_cpus() -> int:
    """CPUs a Ray task asks for: the intra-op threads it computes with, at most a node's CPUs."""
    import ray

    node_cpus = max((n.get("Resources", {}).get("CPU", 1) for n in ray.nodes()), default=1)
    return max(1, min(torch.get_num_threads(), int(node_cpus)))


def _blocks(cache: LabelCache, splits: Sequence[str], workers: int) -> list[_Block]:
    """Time blocks of consecutive chunks, about ``BLOCKS_PER_WORKER`` per worker."""
    chunks = [
        (s, c, w) for s in splits if s in cache.ranges for c, w in enumerate(cache.chunk_windows(s))
    ]
    if not chunks:
        return []
    per_block = max(1, -(-len(chunks) // (BLOCKS_PER_WORKER * max(1, workers))))
    blocks: list[_Block] = []
    for split in dict.fromkeys(s for s, _, _ in chunks):
        mine = [(c, w) for s, c, w in chunks if s == split]
        for lo in range(0, len(mine), per_block):
            part = mine[lo : lo + per_block]
            blocks.append(_Block(split, tuple(c for c, _ in part), tuple(w for _, w in part)))
    return blocks


def _fill_threads(
    cache: LabelCache,
    blocks: Sequence[_Block],
    runner: _Runner,
    batch_size: int,
    workers: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Fill ``blocks`` from a thread pool; returns the windows computed."""

    def fill(block: _Block) -> int:
        for c, pred, spread in runner.chunks(block.chunks, block.windows, batch_size, progress):
            cache.write_chunk(block.split, c, pred, spread)
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


# -- Ray ---------------------------------------------------------------------------------------
_WORKER_RUNNERS: dict[tuple[TeacherSource, str], _Runner] = {}


def _worker_runner(source: TeacherSource, device: str) -> _Runner:
    """The teacher of ``source`` on ``device``, loaded once per worker process."""
    from stkd_dist.serving.teacher import load_teacher

    key = (source, device)
    if key not in _WORKER_RUNNERS:
        teacher = load_teacher(source.checkpoint, source.data, source.storage)
        _WORKER_RUNNERS[key] = _Runner(teacher, device)
    return _WORKER_RUNNERS[key]


def fill_block_task(
    source: TeacherSource,
    cache_url: str | None,
    split: str,
    chunks: tuple[int, ...],
    windows: tuple[np.ndarray, ...],
    batch_size: int,
    threads: int,
    device: str,
) -> tuple[int, list[tuple[int, np.ndarray, np.ndarray | None]]]:
    """Body of one Ray task: compute a time block; write it (``cache_url``) or return it.

    Returns ``(windows computed, [(chunk, prediction, spread)])`` (the list is empty when the
    task wrote the chunks itself).
    """
    # the driver's intra-op thread count: the same bits as the driver (and a server) computes
    torch.set_num_threads(threads)
    runner = _worker_runner(source, device)
    cache = LabelCache(cache_url, mode="r+") if cache_url is not None else None
    out: list[tuple[int, np.ndarray, np.ndarray | None]] = []
    forward = 0
    index = [np.asarray(w, dtype=np.int64) for w in windows]
    for c, pred, spread in runner.chunks(chunks, index, batch_size, None):
        forward += len(pred)
        if cache is not None:
            cache.write_chunk(split, c, pred, spread)
        else:
            out.append((c, pred, spread))
    return forward, out


def _fill_ray(
    cache: LabelCache,
    blocks: Sequence[_Block],
    source: TeacherSource,
    batch_size: int,
    device: str,
    remote: bool,
    progress: Callable[[int], None] | None,
) -> int:
    """Fill ``blocks`` with one Ray task each; returns the windows computed."""
    import ray

    threads = torch.get_num_threads()
    options: dict[str, Any] = {"num_cpus": _task_cpus(), "max_retries": 2}
    if device == "cuda":
        options["num_gpus"] = 1
    if remote:
        # the workers open the object store themselves: give them this process's settings
        env = {k: os.environ[k] for k in loc_.CREDENTIAL_ENV if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
    task = ray.remote(fill_block_task).options(**options)
    url = loc_.url(cache.path) if remote else None
    pending = {
        task.remote(source, url, b.split, b.chunks, b.windows, batch_size, threads, device): b
        for b in blocks
    }
    forward = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            block = pending.pop(ready[0])
            n, labels = ray.get(ready[0])
            for c, pred, spread in labels:  # a local cache: this process writes the chunks
                cache.write_chunk(block.split, c, pred, spread)
            forward += n
            if progress is not None:
                progress(block.n_windows)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return forward
