"""The Ray half of filling a label cache (see :mod:`stkd_dist.serving.precompute`).

One Ray task per time block: :func:`fill_block_task` loads the teacher once per worker process
(straight onto the worker's device, with the driver's micro-batch and precision) and computes the
block's chunks with the driver's intra-op thread count, so every worker makes the very bits of a
serial fill.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from stkd_dist import location as loc_
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.fill_blocks import Block, BlockRunner, TeacherSource
from stkd_dist.serving.forward import ComputeSettings
from stkd_dist.serving.label_arrays import NumpyLabels


def default_workers(device: str) -> int:
    """Time blocks' workers of the connected cluster: its GPUs, or its CPUs per task."""
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


_WORKER_RUNNERS: dict[tuple[TeacherSource, str, str, int, bool], BlockRunner] = {}


def _worker_runner(
    source: TeacherSource,
    device: str,
    precision: str = "fp32",
    micro_batch: int = 32,
    hidden: bool = False,
) -> BlockRunner:
    """The teacher of ``source`` on ``device``, loaded once per worker process and settings."""
    from stkd_dist.serving.teacher import load_teacher

    key = (source, device, precision, micro_batch, hidden)
    if key not in _WORKER_RUNNERS:
        # straight onto the worker's device, with the driver's micro-batch and precision
        teacher = load_teacher(
            source.checkpoint,
            source.data,
            source.storage,
            device=device,
            precision=precision,
            micro_batch=micro_batch,
        )
        _WORKER_RUNNERS[key] = BlockRunner(teacher, device, hidden=hidden)
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
    precision: str = "fp32",
    micro_batch: int = 32,
    hidden: bool = False,
) -> tuple[int, list[tuple[int, NumpyLabels]]]:
    """Body of one Ray task: compute a time block; write it (``cache_url``) or return it.

    Returns ``(windows computed, [(chunk, labels)])`` (the list is empty when the task wrote the
    chunks itself). ``hidden``: the cache stores hidden states, compute them too.
    """
    # the driver's intra-op thread count: the same bits as the driver (and a server) computes
    torch.set_num_threads(threads)
    runner = _worker_runner(source, device, precision, micro_batch, hidden)
    cache = LabelCache(cache_url, mode="r+") if cache_url is not None else None
    out: list[tuple[int, NumpyLabels]] = []
    forward = 0
    index = [np.asarray(w, dtype=np.int64) for w in windows]
    for c, labels in runner.chunks(chunks, index, batch_size, None):
        forward += len(labels.prediction)
        if cache is not None:
            cache.write_chunk(split, c, labels)
        else:
            out.append((c, labels))
    return forward, out


def fill_ray(
    cache: LabelCache,
    blocks: Sequence[Block],
    source: TeacherSource,
    batch_size: int,
    compute: ComputeSettings,
    remote: bool,
    progress: Callable[[int], None] | None,
) -> int:
    """Fill ``blocks`` with one Ray task each; returns the windows computed."""
    import ray

    threads = torch.get_num_threads()
    device = compute.device_type
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
    settings = (device, compute.precision, compute.micro_batch, bool(cache.hidden_dim))
    pending = {
        task.remote(source, url, b.split, b.chunks, b.windows, batch_size, threads, *settings): b
        for b in blocks
    }
    forward = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            block = pending.pop(ready[0])
            n, labels = ray.get(ready[0])
            for c, chunk in labels:  # a local cache: this process writes the chunks
                cache.write_chunk(block.split, c, chunk)
            forward += n
            if progress is not None:
                progress(block.n_windows)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return forward
