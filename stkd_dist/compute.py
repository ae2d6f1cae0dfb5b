"""Which Dask scheduler runs whole-dataset computations.

Statistics, fingerprints, rechunking on ingest, the synthetic generator's writes and the label cache
are Dask graphs over Zarr arrays. One setting picks where they run:

* ``STKD_DASK=ray``: on the connected Ray cluster through Ray's Dask scheduler (``ray.util.dask``);
* ``STKD_DASK=threads``: on Dask's threaded scheduler in this process;
* ``STKD_DASK=auto`` (default): Ray when a Ray cluster is connected in this process, else threads.

The code that builds the graphs is the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import dask

from stkd_dist.errors import ConfigError

DASK_ENV = "STKD_DASK"
_CHOICES = ("auto", "ray", "threads")


_LOCAL_SOURCES: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stkd_local_sources", default=False
)


@contextlib.contextmanager
def local_sources() -> Iterator[None]:
    """Graphs built inside this block read files of this machine (an ingest's source file):
    they run on the threaded scheduler whatever the setting, since other nodes lack the file."""
    token = _LOCAL_SOURCES.set(True)
    try:
        yield
    finally:
        _LOCAL_SOURCES.reset(token)


def scheduler_name() -> str:
    """Resolve the scheduler setting to ``"ray"`` or ``"threads"``."""
    if _LOCAL_SOURCES.get():
        return "threads"
    choice = os.environ.get(DASK_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ConfigError(f"must be one of {', '.join(_CHOICES)}, got {choice!r}", where=DASK_ENV)
    if choice == "auto":
        try:
            import ray

            return "ray" if ray.is_initialized() else "threads"
        except ImportError:  # pragma: no cover - ray is a dependency
            return "threads"
    return choice


def _scheduler() -> str | Callable[..., Any]:
    if scheduler_name() == "ray":
        from ray.util.dask import ray_dask_get

        return ray_dask_get
    return "threads"


@contextlib.contextmanager
def dask_scheduler() -> Iterator[str]:
    """Context in which every ``dask.compute`` (also xarray's) uses the configured scheduler."""
    with dask.config.set(scheduler=_scheduler()):
        yield scheduler_name()


def compute(*objs: Any) -> tuple[Any, ...]:
    """``dask.compute`` on the configured scheduler."""
    with dask_scheduler():
        return dask.compute(*objs)
