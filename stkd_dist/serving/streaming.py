"""Producing the chunks of one validated request.

:class:`ChunkProducer` walks a :class:`~stkd_dist.serving.requests.LabelPlan` chunk by chunk,
``lookahead`` chunks ahead of the one being sent: windows found in the label cache are encoded at
once; the others go to the server's shared :class:`~stkd_dist.serving.batcher.Batcher`, so the
batcher always holds work from every stream, and are encoded when the teacher's labels arrive.

A request for the hidden states (``LabelPlan.hidden``) reads only a cache that holds them and asks
the batcher for them; a chunk carries exactly the outputs its request asked for, so a request
without hidden states gets the very messages it got before they existed.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures

import grpc
import numpy as np

from stkd_dist.serving import codec, codec_slices
from stkd_dist.serving.batcher import Batcher
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.label_arrays import NumpyLabels, merge_rows
from stkd_dist.serving.metrics import ServerMetrics
from stkd_dist.serving.requests import LabelPlan, RequestError
from stkd_dist.serving.write_through import WriteBehind


class _Pending:
    """One chunk on its way: cached rows now, the teacher's rows when the future resolves."""

    def __init__(
        self,
        lo: int,
        hi: int,
        indices: np.ndarray,
        hit: np.ndarray,
        cached: NumpyLabels | None,
        future: futures.Future[NumpyLabels] | None,
    ) -> None:
        self.lo, self.hi, self.indices = lo, hi, indices
        self.hit, self.cached, self.future = hit, cached, future
        # the chunk's messages: one of whole windows, or the node slices of a large window
        self.encoded: Iterable[codec.EncodedChunk] | None = None

    def labels(self, timeout: float | None) -> NumpyLabels:
        """The labels of the chunk's windows, in order (``[n, H, N, C]``, hidden ``[n, N, F]``)."""
        computed = self.future.result(timeout) if self.future is not None else None
        if computed is None:
            assert self.cached is not None
            return self.cached
        if self.cached is None:
            return computed
        return merge_rows(self.hit, self.cached, computed)


class ChunkProducer:
    """The chunks of requests, from the cache and the shared batcher.

    Args:
        cache: label cache to read first (None = none).
        batcher: the server's batching queue of the teacher.
        metrics: the server's metrics.
        version: the teacher version written into every chunk.
        lookahead: chunks in production ahead of the one being sent.
        stopped: set when the server has stopped (waits give up).
        drain_deadline: when in-flight streams must end (None = not draining).
        writer: the write-through writer (None = none): labels the teacher computed for a
            chunk are stored before the chunk is sent.
    """

    def __init__(
        self,
        *,
        cache: LabelCache | None,
        batcher: Batcher,
        metrics: ServerMetrics,
        version: str,
        lookahead: int,
        stopped: threading.Event,
        drain_deadline: Callable[[], float | None],
        writer: WriteBehind | None = None,
    ) -> None:
        self.cache = cache
        self._writer = writer
        self._batcher = batcher
        self.metrics = metrics
        self.version = version
        self.lookahead = lookahead
        self._stopped = stopped
        self._drain_deadline = drain_deadline

    def _launch(self, plan: LabelPlan, lo: int, hi: int) -> _Pending:
        """Start producing chunk ``[lo, hi)`` of ``plan``: rows found in the cache are encoded
        now, ahead of sending; the others go to the batcher and are encoded when they arrive."""
        indices = plan.sequence[lo:hi]
        hit = np.zeros(len(indices), dtype=bool)
        cached: NumpyLabels | None = None
        if self.cache is not None and (self.cache.hidden_dim or not plan.hidden):
            # a cache without hidden states cannot serve a request for them: every row misses
            hit, cached = self.cache.lookup(plan.split, indices, with_hidden=plan.hidden)
        n_hit = int(hit.sum())
        self.metrics.cache_hits.inc(n_hit)
        computed = None
        if n_hit < len(indices):
            computed = self._batcher.submit(indices[~hit], hidden=plan.hidden)
            self.metrics.cache_misses.inc(len(indices) - n_hit)
        pending = _Pending(lo, hi, indices, hit, cached, computed)
        if computed is None:
            pending.encoded = self._encode(plan, pending)
        return pending

    def _encode(self, plan: LabelPlan, p: _Pending) -> Iterable[codec.EncodedChunk]:
        """The messages of chunk ``p``: one message of whole windows, or, when one window does not
        fit a message, the node slices of its window (encoded one at a time as they are sent, so
        a large window is not held twice)."""
        # only the outputs asked for: [n, H, N, C] (hidden [n, N, F])
        labels = p.labels(timeout=0).keep(spread=plan.spread, hidden=plan.hidden)
        if plan.nodes_per_slice:
            return codec_slices.encode_node_slices(
                p.indices,
                labels,
                nodes_per_slice=plan.nodes_per_slice,
                position=p.lo,
                dtype=plan.dtype,
                teacher_version=self.version,
                total=len(plan.sequence),
            )
        return [
            codec.encode_chunk_bytes(
                p.indices,
                labels,
                dtype=plan.dtype,
                teacher_version=self.version,
                cursor=p.hi,
                total=len(plan.sequence),
            )
        ]

    def _ready(self, p: _Pending, context: grpc.ServicerContext) -> bool:
        """Wait for the teacher's part of ``p``; False when the client left or the server
        stopped first."""
        while p.future is not None:
            try:
                p.future.result(timeout=0.5)
                break
            except futures.TimeoutError:
                if not context.is_active() or self._stopped.is_set():
                    return False
        if p.future is not None and self._writer is not None:
            # the batcher hands a batch to the writer before it resolves the batch's futures,
            # so every batch that computed rows of this chunk is among those handed over now
            batches = self._writer.handed_over
            while not self._writer.written_through(batches, timeout=0.5):
                if not context.is_active() or self._stopped.is_set():
                    return False
        return True

    def chunks(
        self, plan: LabelPlan, context: grpc.ServicerContext
    ) -> Iterator[codec.EncodedChunk]:
        """The chunks of ``plan`` from its resume cursor on."""
        total = len(plan.sequence)
        bounds = iter(
            (lo, min(lo + plan.per_chunk, total)) for lo in range(plan.start, total, plan.per_chunk)
        )
        # `lookahead` chunks in production (batcher, encoding) ahead of the one being sent
        pending: collections.deque[_Pending] = collections.deque()
        for lo, hi in bounds:
            pending.append(self._launch(plan, lo, hi))
            if len(pending) > self.lookahead:
                break
        while pending:
            p = pending.popleft()
            nxt = next(bounds, None)
            if nxt is not None:
                pending.append(self._launch(plan, *nxt))
            if not self._ready(p, context):
                return
            messages = p.encoded if p.encoded is not None else self._encode(plan, p)
            n_hit = int(p.hit.sum())
            for chunk in messages:
                deadline = self._drain_deadline()
                if deadline is not None and time.monotonic() >= deadline:
                    # between node slices too: the cursor stays at the window until its last one
                    raise RequestError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the server is draining; resume at cursor {p.lo} on another replica",
                    )
                if chunk.windows:  # a split window counts once, with its last slice
                    self.metrics.windows.labels(source="cache").inc(n_hit)
                    self.metrics.windows.labels(source="teacher").inc(len(p.indices) - n_hit)
                self.metrics.bytes.inc(chunk.payload_bytes)
                yield chunk
