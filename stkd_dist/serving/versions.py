"""The teacher versions one server holds: a new version is published while streams run.

A :class:`ServedVersion` is everything that belongs to one teacher version: the teacher, its
label cache and write-behind writer, the batcher its forward thread runs and the chunk producer
its streams read. A :class:`VersionSet` holds the versions of one server, oldest first:

* a stream is bound to one version when it starts (:meth:`VersionSet.acquire`): the version its
  request pins (``teacher_version``: a resumed or failed-over stream), else the newest version of
  the request's dataset. It keeps that version to its end, whatever is published meanwhile, so
  no epoch mixes two teachers and a stream's windows still arrive exactly once;
* :meth:`VersionSet.publish` adds a version; new streams get it. Versions beyond ``keep`` are
  retired: refused to new streams, closed once their last stream ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from stkd_dist.serving.batcher import Batcher, BatcherStats
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.forward import PreparedBatch
from stkd_dist.serving.label_arrays import NumpyLabels
from stkd_dist.serving.metrics import ServerMetrics, log_event
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.requests import LabelPlan, RequestError, resolve_request
from stkd_dist.serving.server_config import ServerConfig
from stkd_dist.serving.streaming import ChunkProducer
from stkd_dist.serving.teacher import Teacher
from stkd_dist.serving.write_through import WriteBehind

log = logging.getLogger(__name__)


class ServedVersion:
    """One teacher version of a server and what serves it (see the module docstring).

    Args:
        teacher: the teacher.
        config: the server's settings (batch size and wait, lookahead, limits).
        metrics: the server's metrics (shared by its versions).
        cache: a label cache of this teacher, or None.
        write_through: write every window the teacher computes into ``cache``.
        stopped: set when the server stops (streams end at their next chunk).
        drain_deadline: when draining streams must end (None: not draining).
    """

    def __init__(
        self,
        teacher: Teacher,
        config: ServerConfig,
        metrics: ServerMetrics,
        cache: LabelCache | None,
        write_through: bool,
        stopped: threading.Event,
        drain_deadline: Callable[[], float | None],
    ) -> None:
        if cache is not None:
            cache.check_matches(teacher.meta)
            # labels written through must have the cache's bits (refused), served ones should
            cache.check_compute(teacher.compute)
        self.teacher = teacher
        self.config = config
        self.metrics = metrics
        self.cache = cache
        self.writer = WriteBehind(cache) if write_through and cache is not None else None
        self.streams = 0  # streams bound to this version now
        self.retired = False
        # the forward thread computes with this thread's intra-op thread count (`--threads`):
        # the labels' bits depend on it, and they must match an in-process forward pass
        threads = torch.get_num_threads()
        # a write-through cache holding hidden states needs them for every window it stores
        store_hidden = self.writer is not None and bool(cache is not None and cache.hidden_dim)
        self.batcher = Batcher(
            self._run,
            config.batch_size,
            config.batch_wait_s,
            on_batch=self._on_batch,
            prepare=teacher.prepare,
            recent_bytes=config.recent_bytes,
            forward_init=lambda: torch.set_num_threads(threads),
            hidden=store_hidden,
        )
        self.producer = ChunkProducer(
            cache=cache,
            batcher=self.batcher,
            metrics=metrics,
            version=teacher.version,
            lookahead=config.lookahead,
            stopped=stopped,
            drain_deadline=drain_deadline,
            writer=self.writer,
        )

    @property
    def version(self) -> str:
        return self.teacher.version

    @property
    def fingerprint(self) -> str:
        return self.teacher.meta.fingerprint

    def _run(self, batch: PreparedBatch, hidden: bool) -> NumpyLabels:
        """The forward thread's model call (timed: ``stkd_serve_forward_seconds_total``)."""
        import time

        started = time.perf_counter()
        try:
            return self.teacher.run(batch, hidden=hidden)
        finally:
            self.metrics.forward_seconds.inc(time.perf_counter() - started)

    def _on_batch(self, indices: np.ndarray, labels: NumpyLabels, n_requests: int) -> None:
        """Called by the forward thread after every teacher forward pass, before the futures of
        the requests it serves resolve; ``indices`` are the windows computed (no padding)."""
        self.metrics.batch_windows.observe(len(indices))
        self.metrics.forward_windows.inc(len(indices))
        if self.writer is not None:
            self.writer.put(indices, labels)

    def plan(self, request: pb.LabelRequest) -> LabelPlan:
        """Validate ``request`` against this version and resolve its window sequence."""
        return resolve_request(
            request,
            self.teacher.meta,
            chunk_steps=self.teacher.reader.store.chunks[0],
            max_message_bytes=self.config.max_message_bytes,
            max_chunk_windows=self.config.batch_size,
        )

    def stats(self) -> BatcherStats:
        return self.batcher.stats()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Stop the forward thread and flush the writer (no stream uses this version)."""
        self.batcher.close()
        if self.writer is not None:
            self.writer.close()


class VersionSet:
    """The versions of one server, oldest first; binds streams to them (module docstring).

    Args:
        first: the version the server starts with.
        keep: most versions that take new streams (older ones are retired).
    """

    def __init__(self, first: ServedVersion, keep: int = 2) -> None:
        self._lock = threading.Lock()
        self._versions = [first]
        self.keep = max(1, keep)

    @property
    def newest(self) -> ServedVersion:
        with self._lock:
            return self._versions[-1]

    def all(self) -> list[ServedVersion]:
        """Every version still held (retired ones with streams included), oldest first."""
        with self._lock:
            return list(self._versions)

    def publish(self, version: ServedVersion) -> list[ServedVersion]:
        """Add ``version`` as the newest; returns the versions retired and closed now."""
        with self._lock:
            if any(v.version == version.version for v in self._versions if not v.retired):
                raise ValueError(f"teacher {version.version} is already served")
            self._versions.append(version)
            live = [v for v in self._versions if not v.retired]
            for old in live[: max(0, len(live) - self.keep)]:
                old.retired = True
            closed = self._sweep()
        for v in closed:
            v.close()
        log_event(log, "published", teacher=version.version, dataset=version.fingerprint)
        return closed

    def acquire(self, request: pb.LabelRequest) -> ServedVersion:
        """The version a new stream of ``request`` is bound to (released with :meth:`release`).

        Raises:
            RequestError: FAILED_PRECONDITION when no version held serves the request.
        """
        import grpc

        with self._lock:
            live = [v for v in self._versions if not v.retired]
            if request.teacher_version:
                chosen = next((v for v in live if v.version == request.teacher_version), None)
            else:
                # the newest version of the request's dataset: a store grown by an append has a
                # new fingerprint, and its students ask for the teacher trained on it
                same = [v for v in live if v.fingerprint == request.dataset_fingerprint]
                chosen = same[-1] if same else live[-1]  # the newest refuses it, naming why
            if chosen is None:
                served = ", ".join(v.version for v in live)
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this server serves teacher {served}, the request wants "
                    f"{request.teacher_version}",
                )
            chosen.streams += 1
            return chosen

    def release(self, version: ServedVersion) -> None:
        """A stream bound to ``version`` ended (a retired version closes with its last one)."""
        with self._lock:
            version.streams -= 1
            closed = self._sweep()
        for v in closed:
            v.close()

    def _sweep(self) -> list[ServedVersion]:
        """Drop retired versions without streams (under the lock); returns them to close."""
        gone = [v for v in self._versions if v.retired and v.streams == 0]
        self._versions = [v for v in self._versions if v not in gone]
        return gone

    def close(self) -> None:
        """Close every version (the server stops)."""
        for v in self.all():
            v.close()
