"""CPU inference latency of several models, measured side by side in one process.

Every model runs on the same batch with the same number of torch threads. After ``warmup`` untimed
passes of each model, ``repeats`` rounds follow; each round times one forward pass of every model,
in an order rotated from round to round, so slow drifts of the machine (another process waking up,
frequency scaling) hit all models alike instead of whichever happened to run last. The reported
figure is the median of a model's timed passes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from stkd_dist.data.batch import WindowBatch
from stkd_dist.errors import ConfigError

Runner = Callable[[], object]


@dataclass(frozen=True)
class LatencyResult:
    """Timed forward passes of one model.

    Attributes:
        median_ms: median of ``times_ms``.
        times_ms: every timed pass, in milliseconds, in the order they ran.
        threads: torch intra-op threads used.
    """

    median_ms: float
    times_ms: tuple[float, ...]
    threads: int


def model_runner(model: torch.nn.Module, batch: WindowBatch) -> Runner:
    """A function running ``model`` once on ``batch`` (inference mode, no autograd)."""
    model.eval()

    def run() -> object:
        with torch.inference_mode():
            return model(batch.x, batch.time_of_day, batch.day_of_week)

    return run


def measure_latency(
    runners: Mapping[str, Runner],
    *,
    warmup: int = 3,
    repeats: int = 15,
    threads: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, LatencyResult]:
    """Median wall time of each runner, measured in interleaved rounds (see the module docstring).

    Args:
        runners: name -> a function doing one forward pass (see :func:`model_runner`).
        warmup: untimed passes of each runner first (lazy allocations, caches).
        repeats: timed passes of each runner.
        threads: ``torch.set_num_threads`` during the measurement (restored afterwards).
        timer: clock in seconds (injectable for tests).
    """
    if not runners:
        raise ConfigError("nothing to measure", where="latency")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ConfigError(
            f"need repeats >= 1, warmup >= 0 and threads >= 1, got {repeats}, {warmup}, {threads}",
            where="latency",
        )
    names = list(runners)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in names:
            for _ in range(warmup):
                runners[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = timer()
                runners[name]()
                times[name].append((timer() - t0) * 1000.0)
    finally:
        torch.set_num_threads(before)
    return {
        name: LatencyResult(statistics.median(ts), tuple(ts), threads) for name, ts in times.items()
    }
