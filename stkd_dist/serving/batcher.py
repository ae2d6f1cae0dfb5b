"""One batching queue shared by every concurrent stream of a server.

Streams submit the windows they need next (a few dozen to a few hundred) and get a future. One
background thread collects windows from all streams until it has ``batch_size`` of them or the
oldest has waited ``max_wait_s``, runs the teacher once on them and fans the results back. A
request larger than a batch is split over several batches and one batch can serve many requests,
so the model sees full batches whatever the number and size of streams. Windows requested twice
in one batch (two streams reading the same epoch) are computed once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# labels of windows: prediction [n, H, N, C] and spread [n, H, N, C] or None, float32
Labels = tuple[np.ndarray, np.ndarray | None]
InferFn = Callable[[np.ndarray], Labels]
BatchHook = Callable[[np.ndarray, Labels, int], None]


@dataclass
class _Request:
    indices: np.ndarray  # [n] int64
    future: Future[Labels]
    taken: int = 0  # windows handed to a batch so far
    done: int = 0  # windows whose labels arrived
    prediction: np.ndarray | None = None
    spread: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class BatcherStats:
    """Counters of a :class:`Batcher` (read them through :meth:`Batcher.stats`)."""

    batches: int = 0
    windows: int = 0  # distinct windows run through the model
    requests: int = 0
    max_batch: int = 0  # most windows in one batch
    max_requests_per_batch: int = 0  # most requests one batch served
    sizes: list[int] = field(default_factory=list)  # recent batch sizes (last 1000)


class Batcher:
    """Collect windows from concurrent requests into batches for one model.

    Args:
        infer: runs the model on window indices ``[b]`` and returns ``(prediction, spread)``.
        batch_size: most windows per model call.
        max_wait_s: how long the oldest queued window may wait for a batch to fill.
        on_batch: called after each model call with ``(indices, labels, n_requests)`` (metrics,
            write-through to the label cache).
    """

    def __init__(
        self,
        infer: InferFn,
        batch_size: int,
        max_wait_s: float = 0.005,
        on_batch: BatchHook | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self._infer = infer
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_windows = 0  # windows in the queue not yet handed to a batch
        self._oldest: float | None = None  # arrival time of the oldest untaken window
        self._cond = threading.Condition()
        self._closed = False
        self._stats = BatcherStats()
        self._thread = threading.Thread(target=self._run, name="stkd-batcher", daemon=True)
        self._thread.start()

    def submit(self, indices: np.ndarray) -> Future[Labels]:
        """Queue windows ``indices`` ``[n]``; the future resolves to their ``(prediction, spread)``."""
        req = _Request(np.asarray(indices, dtype=np.int64).reshape(-1), Future())
        if req.size == 0:
            req.future.set_result((np.empty((0,)), None))
            return req.future
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(req)
            self._queued_windows += req.size
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._stats.requests += 1
            self._cond.notify()
        return req.future

    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        with self._cond:
            s = self._stats
            return BatcherStats(
                s.batches, s.windows, s.requests, s.max_batch, s.max_requests_per_batch, [*s.sizes]
            )

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the queued requests are served."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the batching thread -----------------------------------------------------------------
    def _take(self) -> list[tuple[_Request, int, int]] | None:
        """Wait for a full batch or the wait limit; return slices ``(request, lo, hi)`` to run."""
        with self._cond:
            while True:
                if self._queued_windows >= self.batch_size:
                    break
                if self._queued_windows and self._oldest is not None:
                    left = self._oldest + self.max_wait_s - time.monotonic()
                    if left <= 0 or self._closed:
                        break
                    self._cond.wait(left)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()
            parts: list[tuple[_Request, int, int]] = []
            room = self.batch_size
            for req in self._queue:
                if room == 0:
                    break
                if req.taken == req.size:
                    continue
                n = min(room, req.size - req.taken)
                parts.append((req, req.taken, req.taken + n))
                req.taken += n
                room -= n
            self._queued_windows -= self.batch_size - room
            self._oldest = time.monotonic() if self._queued_windows else None
            return parts

    def _run(self) -> None:
        while True:
            parts = self._take()
            if parts is None:
                return
            wanted = np.concatenate([r.indices[lo:hi] for r, lo, hi in parts])  # [b]
            unique, inverse = np.unique(wanted, return_inverse=True)
            try:
                pred, spread = self._infer(unique)  # [u, H, N, C]
                if self._on_batch is not None:
                    self._on_batch(unique, (pred, spread), len(parts))
            except Exception as e:  # every request in the batch fails, the server keeps going
                log.exception("teacher inference failed on %d windows", len(unique))
                self._fail(parts, e)
                continue
            with self._cond:
                s = self._stats
                s.batches += 1
                s.windows += len(unique)
                s.max_batch = max(s.max_batch, len(wanted))
                s.max_requests_per_batch = max(s.max_requests_per_batch, len(parts))
                s.sizes = [*s.sizes[-999:], len(wanted)]
            self._scatter(parts, inverse, pred, spread)

    def _scatter(
        self,
        parts: list[tuple[_Request, int, int]],
        inverse: np.ndarray,
        pred: np.ndarray,
        spread: np.ndarray | None,
    ) -> None:
        at = 0
        for req, lo, hi in parts:
            rows = inverse[at : at + hi - lo]
            at += hi - lo
            if req.future.done():  # failed earlier in another batch
                continue
            if req.prediction is None:
                req.prediction = np.empty((req.size, *pred.shape[1:]), dtype=pred.dtype)
                if spread is not None:
                    req.spread = np.empty((req.size, *spread.shape[1:]), dtype=spread.dtype)
            req.prediction[lo:hi] = pred[rows]
            if spread is not None and req.spread is not None:
                req.spread[lo:hi] = spread[rows]
            req.done += hi - lo
            if req.done == req.size:
                self._finish(req)
                req.future.set_result((req.prediction, req.spread))

    def _fail(self, parts: list[tuple[_Request, int, int]], error: Exception) -> None:
        for req, _, _ in parts:
            if not req.future.done():
                req.future.set_exception(error)
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        """Drop a finished (or failed) request from the queue, with its untaken windows."""
        with self._cond:
            try:
                self._queue.remove(req)
            except ValueError:
                return
            self._queued_windows -= req.size - req.taken
            req.taken = req.size
            if not self._queued_windows:
                self._oldest = None
