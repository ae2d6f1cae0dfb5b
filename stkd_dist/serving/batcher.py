"""One batching pipeline shared by every concurrent stream of a server.

Streams submit the windows they need next (a few dozen to a few hundred) and get a future. A
request larger than a batch is split over several batches and one batch can serve many requests,
so the model sees full batches whatever the number and size of streams. A window is computed
once however many requests want it at about the same time: windows requested twice in one batch,
windows already queued in or being computed by another batch, and windows computed a moment ago
(a small LRU of recent batches, ``recent_bytes``) all share one forward pass.

Threads and hand-offs::

    stream threads     submit(indices) -> Future                 (the request queue, under _cond)
    stkd-batcher       collect up to batch_size fresh windows from the queued requests, mark
                       them in flight, read and decode their inputs (``prepare``)
                          --> hand-off queue, one batch ahead of the forward (_slots)
    stkd-forward       run the model on its device (``infer``); on_batch(indices, labels, n);
                       then copy the labels into the waiting requests and resolve their futures
    stream threads     encode, checksum and send (:mod:`~stkd_dist.serving.streaming`)

Reading batch k+1 thus overlaps the forward pass of batch k. The collector takes a batch only
when the forward thread has taken the previous one (one batch ahead, not more): windows arriving
meanwhile join the next batch instead of waiting behind a row of half-empty ones.

Invariant (write-through relies on it): ``on_batch`` is called with the freshly computed windows
of a batch BEFORE any future those windows serve resolves; labels served from the recent LRU
come from batches whose ``on_batch`` has returned.

Hidden states: a request submitted with ``hidden=True`` gets the teacher's hidden
representation too. A batch computes them when such a request waits on it (or always, with the
batcher's ``hidden``: a write-through cache that stores them); a window in flight or recent in a
batch without them is computed again for such a request. Requests without them get exactly the
labels they got before hidden states existed (the network call is the same either way).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stkd_dist.serving.inflight import InflightBatch, RecentBatches, Request
from stkd_dist.serving.label_arrays import NumpyLabels, empty_labels

log = logging.getLogger(__name__)

# infer(prepared inputs, hidden) -> the labels of the batch's windows, float32
InferFn = Callable[[Any, bool], NumpyLabels]
PrepareFn = Callable[[np.ndarray], Any]
BatchHook = Callable[[np.ndarray, NumpyLabels, int], None]

#: default budget of the LRU of recently computed batches
RECENT_BYTES = 32 * 2**20


@dataclass
class BatcherStats:
    """Counters of a :class:`Batcher` (read them through :meth:`Batcher.stats`)."""

    batches: int = 0
    windows: int = 0  # distinct windows run through the model
    requests: int = 0
    max_batch: int = 0  # most windows one batch computed
    max_requests_per_batch: int = 0  # most requests one batch served
    sizes: list[int] = field(default_factory=list)  # recent batch sizes (last 1000)
    shared: int = 0  # windows served by a forward pass another request already asked for
    recent_hits: int = 0  # windows served from the LRU of recently computed batches


class Batcher:
    """Collect windows from concurrent requests into batches for one model.

    Args:
        infer: runs the model: on window indices ``[b]`` (sorted, distinct), or, with
            ``prepare``, on what ``prepare`` returned for them, and whether to compute the hidden
            states too; returns their labels.
        batch_size: most windows per model call.
        max_wait_s: how long the oldest queued window may wait for a batch to fill.
        on_batch: called after each model call with ``(indices, labels, n_requests)`` (metrics,
            write-through to the label cache), before the futures the batch serves resolve.
        prepare: reads the inputs of window indices ``[b]`` (the I/O half, run in the
            collecting thread while the forward thread computes the previous batch).
        recent_bytes: label bytes of recently computed batches kept to serve repeats (0: none).
        forward_init: called once in the forward thread before its first batch (e.g. to set
            the intra-op thread count the labels are computed with).
        hidden: compute the hidden states in every batch (``on_batch`` then always gets them).
    """

    def __init__(
        self,
        infer: InferFn,
        batch_size: int,
        max_wait_s: float = 0.005,
        on_batch: BatchHook | None = None,
        *,
        prepare: PrepareFn | None = None,
        recent_bytes: int = RECENT_BYTES,
        forward_init: Callable[[], None] | None = None,
        hidden: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.batch_size = int(batch_size)
        self.max_wait_s = float(max_wait_s)
        self._infer = infer
        self._prepare = prepare
        self._on_batch = on_batch
        self._forward_init = forward_init
        self._always_hidden = bool(hidden)
        # _cond guards the queue, the in-flight map, the recent LRU, every request's state and
        # the stats; futures are resolved outside it (their callbacks may submit again)
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._queued_windows = 0  # windows in the queue not yet handed to a batch
        self._oldest: float | None = None  # arrival time of the oldest untaken window
        self._pending: dict[int, InflightBatch] = {}  # window -> the batch computing it
        self._recent = RecentBatches(recent_bytes)
        self._seq = 0
        self._closed = False
        self._stats = BatcherStats()
        # collector -> forward thread: (batch, prepared inputs); None ends the forward thread.
        # _slots bounds it to one batch waiting while one computes.
        self._handoff: queue.SimpleQueue[tuple[InflightBatch, Any] | None] = queue.SimpleQueue()
        self._slots = threading.Semaphore(1)
        self._collector = threading.Thread(target=self._collect_loop, name="stkd-batcher")
        self._forward = threading.Thread(target=self._forward_loop, name="stkd-forward")
        for t in (self._collector, self._forward):
            t.daemon = True
            t.start()

    def submit(self, indices: np.ndarray, *, hidden: bool = False) -> Future[NumpyLabels]:
        """Queue windows ``indices`` ``[n]``; the future resolves to their labels (with the
        hidden states when ``hidden``)."""
        req = Request(np.asarray(indices, dtype=np.int64).reshape(-1), Future(), hidden=hidden)
        if req.size == 0:
            # no shapes are known here: an empty prediction stands for "no windows"
            req.future.set_result(empty_labels((0, 0, 0), False))
            return req.future
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(req)
            self._queued_windows += req.size
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._stats.requests += 1
            self._cond.notify_all()
        return req.future

    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        with self._cond:
            s = self._stats
            return BatcherStats(
                s.batches,
                s.windows,
                s.requests,
                s.max_batch,
                s.max_requests_per_batch,
                [*s.sizes],
                s.shared,
                s.recent_hits,
            )

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the queued requests are served."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._collector.join(timeout)
        self._forward.join(timeout)

    # -- the collecting thread ---------------------------------------------------------------
    def _wait_for_work(self) -> bool:
        """Under ``_cond``: wait for a full batch or the wait limit; False when closed and idle."""
        while True:
            if self._queued_windows >= self.batch_size:
                return True
            if self._queued_windows and self._oldest is not None:
                left = self._oldest + self.max_wait_s - time.monotonic()
                if left <= 0 or self._closed:
                    return True
                self._cond.wait(left)
            elif self._closed:
                return False
            else:
                self._cond.wait()

    def _take(self) -> tuple[InflightBatch | None, list[Request]] | None:
        """Collect the next batch: up to ``batch_size`` windows no batch has in flight.

        Windows in flight attach their request to the batch computing them; windows recently
        computed are copied into their request at once. Returns ``(batch or None when nothing
        is left to compute, requests completed meanwhile)``, or None when closed and idle.
        """
        with self._cond:
            if not self._wait_for_work():
                return None
            batch = InflightBatch(self._seq, hidden=self._always_hidden)
            self._seq += 1
            done: list[Request] = []
            room = self.batch_size
            while self._queue and room:
                req = self._queue[0]
                while req.taken < req.size and room:
                    pos = req.taken
                    w = int(req.indices[pos])
                    req.taken += 1
                    self._queued_windows -= 1
                    owner = self._pending.get(w)
                    if owner is not None and owner is not batch and not owner.serves(req):
                        # in flight without the hidden states this request wants: compute anew
                        owner = None
                    if owner is None:
                        recent = self._recent.get(w)
                        if recent is not None and recent.serves(req):
                            self._stats.recent_hits += 1
                            if recent.fill(req, [pos], [w]):
                                done.append(req)
                            continue
                        owner = batch
                        batch.add(w)
                        self._pending[w] = batch
                        room -= 1
                    else:  # queued twice in this batch, or in flight in an earlier one
                        self._stats.shared += 1
                    if owner is batch and req.hidden:
                        batch.hidden = True  # still being collected: it computes them for all
                    owner.wait(req, pos, w)
                if req.taken == req.size:
                    self._queue.popleft()
            self._oldest = time.monotonic() if self._queued_windows else None
            return (batch.seal() if batch.size else None), done

    def _collect_loop(self) -> None:
        while True:
            # wait until the forward thread has taken the previous batch: windows arriving
            # meanwhile join this batch instead of a half-empty one queued behind it
            self._slots.acquire()
            taken = self._take()
            if taken is None:
                self._handoff.put(None)
                return
            batch, done = taken
            self._resolve(done, None)
            if batch is None:  # every window was in flight or recent: nothing to compute
                self._slots.release()
                continue
            try:
                prepared = batch.indices if self._prepare is None else self._prepare(batch.indices)
            except Exception as e:  # the batch's requests fail, the server keeps going
                log.exception("reading the inputs of %d windows failed", batch.size)
                self._slots.release()
                self._complete(batch, None, e)
                continue
            # hand-off: from here the forward thread owns the batch and its inputs
            self._handoff.put((batch, prepared))

    # -- the forward thread ------------------------------------------------------------------
    def _forward_loop(self) -> None:
        if self._forward_init is not None:
            self._forward_init()
        while True:
            item = self._handoff.get()
            self._slots.release()  # the collector may prepare the next batch now
            if item is None:
                return
            batch, prepared = item
            try:
                # [u, H, N, C] (hidden [u, N, F]); `hidden` was fixed when the batch was sealed
                labels = self._infer(prepared, batch.hidden)
                del prepared  # the inputs are not needed past the model call
                if self._on_batch is not None:
                    # before any future resolves (write-through stores labels before sending)
                    self._on_batch(batch.indices, labels, batch.n_requests)
            except Exception as e:  # every request of the batch fails, the server keeps going
                log.exception("teacher inference failed on %d windows", batch.size)
                self._complete(batch, None, e)
                continue
            self._complete(batch, labels, None)

    def _complete(
        self, batch: InflightBatch, labels: NumpyLabels | None, error: Exception | None
    ) -> None:
        """Copy a finished batch's labels into its waiting requests (or fail them)."""
        with self._cond:
            for w in batch.indices.tolist():
                if self._pending.get(w) is batch:
                    del self._pending[w]
            # from here on no request attaches to the batch: it is no longer in flight
            waiters = batch.take_waiters()
            failed: list[Request] = []
            done: list[Request] = []
            if labels is not None:
                batch.labels = labels
                self._recent.add(batch)
                s = self._stats
                s.batches += 1
                s.windows += batch.size
                s.max_batch = max(s.max_batch, batch.size)
                s.max_requests_per_batch = max(s.max_requests_per_batch, len(waiters))
                s.sizes = [*s.sizes[-999:], batch.size]
                for req, (positions, windows) in waiters.items():
                    if batch.fill(req, positions, windows):
                        done.append(req)
            else:
                for req in waiters:
                    if req.fail():
                        # its windows not yet taken are dropped with it
                        self._queued_windows -= req.size - req.taken
                        req.taken = req.size
                        failed.append(req)
                if not self._queued_windows:
                    self._oldest = None
        self._resolve(done, None)
        self._resolve(failed, error)

    @staticmethod
    def _resolve(requests: list[Request], error: Exception | None) -> None:
        """Resolve futures decided under the lock (exactly once each), outside it."""
        for req in requests:
            if error is not None:
                req.future.set_exception(error)
            else:
                req.future.set_result(req.labels())
