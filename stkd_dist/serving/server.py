"""The ``TeacherService`` gRPC server (``stkd serve``).

One server starts with one :class:`~stkd_dist.serving.teacher.Teacher` and may be handed newer
versions of it while it runs (:meth:`TeacherServer.publish`, ``stkd serve --follow``; see
:mod:`~stkd_dist.serving.versions`): each ``StreamLabels`` call is bound to one version when it
starts and keeps it to its end. It turns its request into an ordered window sequence, then walks
it chunk by chunk: windows found in that version's label cache are read from it, the others go to
the version's shared :class:`Batcher` (a few chunks ahead, so the batcher always has work from
every stream), and each chunk is encoded, checksummed and sent with the cursor to resume after it.

Operations:

* at most ``max_streams`` concurrent streams (RESOURCE_EXHAUSTED past it);
* :meth:`TeacherServer.drain` (SIGTERM in ``stkd serve``): health goes NOT_SERVING first, new
  streams get UNAVAILABLE, in-flight streams run on for ``drain_grace_s`` and are then ended at a
  chunk boundary with UNAVAILABLE naming the cursor to resume at; then the server stops;
* standard ``grpc.health.v1`` health checking (open, no token), Prometheus metrics, key=value logs.

Requests asking for the ``HIDDEN`` output get the teacher's hidden representation ``[n, N, F]``
in every chunk as well (``Describe`` reports F as ``hidden_dim``): the forward passes their
windows go through also return what the teacher's output head reads. Requests without it are
served exactly as before.

Status codes of bad requests: unknown dataset fingerprint or teacher version, or a spread the
teacher does not have (or hidden states of unknown width): FAILED_PRECONDITION; windows outside the split or a cursor past the end:
OUT_OF_RANGE; malformed ranges, split or plan: INVALID_ARGUMENT; no or wrong token:
UNAUTHENTICATED (see :mod:`~stkd_dist.serving.auth`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stkd_dist.errors import ConfigError
from stkd_dist.serving import codec
from stkd_dist.serving.auth import TokenAuthInterceptor
from stkd_dist.serving.batcher import BatcherStats
from stkd_dist.serving.cache import LabelCache
from stkd_dist.serving.load import StreamLoad
from stkd_dist.serving.metrics import ServerMetrics, log_event
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.requests import LabelPlan, RequestError
from stkd_dist.serving.server_config import (
    LOOPBACK,
    SERVER_KEEPALIVE_OPTIONS,
    ServerConfig,
    is_loopback,
)
from stkd_dist.serving.teacher import Teacher
from stkd_dist.serving.versions import ServedVersion, VersionSet

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK", "SERVICE_NAME", "ServerConfig", "TeacherServer", "is_loopback"]

SERVICE_NAME = "stkd.v1.TeacherService"
DEFAULT_CONFIG = ServerConfig()


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """The RPC handlers; state shared by all streams lives in :class:`TeacherServer`."""

    def __init__(self, server: TeacherServer) -> None:
        self.s = server

    def Describe(
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.TeacherInfo:
        return self.s.describe()

    def StreamLabels(
        self, request: pb.LabelRequest, context: grpc.ServicerContext
    ) -> Iterator[codec.EncodedChunk]:
        s = self.s
        peer = context.peer()
        if s.draining:
            s.metrics.stream_errors.labels(code="UNAVAILABLE").inc()
            context.abort(
                grpc.StatusCode.UNAVAILABLE, "the server is draining; use another replica"
            )
        if not s.acquire_stream():
            s.metrics.stream_errors.labels(code="RESOURCE_EXHAUSTED").inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server already serves {s.config.max_streams} streams; retry later or elsewhere",
            )
        started = time.monotonic()
        sent = {"windows": 0, "bytes": 0, "cursor": request.resume_cursor}
        status = "OK"
        owed = 0  # windows of this stream counted as outstanding and not sent yet
        served = None
        try:
            served = s.versions.acquire(request)  # this stream's teacher, to its end
            plan = served.plan(request)
            owed = max(len(plan.sequence) - plan.start, 0)
            s.load.progress(owed)
            log_event(
                log,
                "stream_start",
                peer=peer,
                split=plan.split,
                teacher=served.version,
                windows=len(plan.sequence),
                cursor=plan.start,
                dtype=codec.dtype_name(plan.dtype),
            )
            for chunk in s.chunks(plan, context, served):
                yield chunk
                sent["windows"] += chunk.windows
                sent["bytes"] += chunk.payload_bytes
                # the cursor, not chunk.windows: node slices of a window move it once
                moved = min(chunk.cursor - sent["cursor"], owed)
                s.load.progress(-moved)
                owed -= moved
                sent["cursor"] = chunk.cursor
        except RequestError as e:
            status = e.code.name
            s.metrics.stream_errors.labels(code=e.code.name).inc()
            context.abort(e.code, e.message)
        except GeneratorExit:  # the client went away
            status = "CANCELLED"
            raise
        except Exception as e:
            status = "INTERNAL"
            s.metrics.stream_errors.labels(code="INTERNAL").inc()
            log.exception("stream from %s failed", peer)
            context.abort(
                grpc.StatusCode.INTERNAL, f"teacher server error: {type(e).__name__}: {e}"
            )
        finally:
            if served is not None:
                s.versions.release(served)
            s.release_stream(owed)
            log_event(
                log,
                "stream_end",
                peer=peer,
                status=status,
                sent=sent["windows"],
                bytes=sent["bytes"],
                cursor=sent["cursor"],
                seconds=f"{time.monotonic() - started:.3f}",
            )


def _add_servicer(servicer: TeacherServicer, server: grpc.Server) -> None:
    """Register the service like the generated ``add_TeacherServiceServicer_to_server``, except
    that ``StreamLabels`` yields chunks already serialized by :func:`codec.encode_chunk_bytes`
    (two copies of the label bytes instead of four)."""
    handlers = {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe,
            request_deserializer=pb.DescribeRequest.FromString,
            response_serializer=pb.TeacherInfo.SerializeToString,
        ),
        "StreamLabels": grpc.unary_stream_rpc_method_handler(
            servicer.StreamLabels,
            request_deserializer=pb.LabelRequest.FromString,
            response_serializer=lambda chunk: chunk.data,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class TeacherServer:
    """A running teacher soft-label server.

    Args:
        teacher: the teacher to serve.
        config: server settings.
        cache: a label cache of this teacher to serve from (opened ``"r+"`` for write-through).
        write_through: write every window the teacher computes into ``cache``.

    Raises:
        StoreError: ``cache`` holds labels of another teacher or dataset.
    """

    def __init__(
        self,
        teacher: Teacher,
        config: ServerConfig = DEFAULT_CONFIG,
        cache: LabelCache | None = None,
        write_through: bool = False,
    ) -> None:
        if write_through and cache is None:
            raise ConfigError(
                "write-through needs a label cache (--cache)", where="--write-through"
            )
        self.config = config
        self.metrics = ServerMetrics()
        micro = teacher.compute.micro_batch
        if config.batch_size % micro:
            log_event(
                log,
                "batch_padding",
                level=logging.WARNING,
                batch_size=config.batch_size,
                micro_batch=micro,
                reason="a full batch ends in a padded micro-batch; use a multiple",
            )
        self._lock = threading.Lock()
        self.load = StreamLoad(config.max_streams)
        self._drain_deadline: float | None = None
        self._stopped = threading.Event()
        self._stopping = False
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.versions = VersionSet(
            self._served(teacher, cache, write_through), config.keep_versions
        )
        self.host = config.host
        self.port = 0
        self.metrics_port: int | None = None

    def _served(
        self, teacher: Teacher, cache: LabelCache | None, write_through: bool
    ) -> ServedVersion:
        return ServedVersion(
            teacher,
            self.config,
            self.metrics,
            cache,
            write_through,
            self._stopped,
            lambda: self._drain_deadline,
        )

    @property
    def teacher(self) -> Teacher:
        """The newest teacher version (what new streams of its dataset get)."""
        return self.versions.newest.teacher

    @property
    def cache(self) -> LabelCache | None:
        """The newest version's label cache."""
        return self.versions.newest.cache

    def publish(
        self, teacher: Teacher, cache: LabelCache | None = None, write_through: bool = False
    ) -> None:
        """Serve ``teacher`` as the newest version: new streams get it (those of its dataset),
        streams in progress finish on the version they started on, and versions beyond
        ``config.keep_versions`` stop taking streams (closed when their last one ends)."""
        if write_through and cache is None:
            raise ConfigError("write-through needs a label cache", where="cache")
        self.versions.publish(self._served(teacher, cache, write_through))

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and start serving; returns the port."""
        cfg = self.config
        if not cfg.secured and not is_loopback(cfg.host):
            log_event(
                log,
                "bind_loopback",
                level=logging.WARNING,
                requested=cfg.host,
                reason="no TLS and no token: serving on 127.0.0.1 only",
            )
            self.host = LOOPBACK
        elif cfg.token and cfg.tls is None and not is_loopback(cfg.host):
            log.warning("the token travels in plain text without TLS (--tls-cert/--tls-key)")
        # room for the chunk's headers on top of its payload limit
        limit = cfg.max_message_bytes + 64 * 1024
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", max(limit, 4 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
            *SERVER_KEEPALIVE_OPTIONS,
        ]
        interceptors = [TokenAuthInterceptor(cfg.token)] if cfg.token else []
        # a worker per allowed stream, plus room for Describe, health probes and refusals
        pool = futures.ThreadPoolExecutor(cfg.max_streams + 8, thread_name_prefix="stkd-rpc")
        server = grpc.server(
            pool,
            interceptors=interceptors,
            options=options,
            maximum_concurrent_rpcs=cfg.max_streams + 32,
        )
        _add_servicer(TeacherServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.host}:{cfg.port}"
        if cfg.tls is not None:
            self.port = server.add_secure_port(address, cfg.tls.credentials())
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise ConfigError(f"cannot bind {address}", where="--port")
        server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics_port, self.host)
        meta = self.teacher.meta
        log_event(
            log,
            "serving",
            address=self.address,
            teacher=meta.version,
            model=meta.model_key,
            dataset=meta.fingerprint,
            device=self.teacher.compute.device,
            precision=self.teacher.compute.precision,
            micro_batch=self.teacher.compute.micro_batch,
            threads=torch.get_num_threads(),
            tls=cfg.tls is not None,
            token=bool(cfg.token),
            cache=self.cache.path if self.cache else "none",
            write_through=self.versions.newest.writer is not None,
            metrics_port=self.metrics_port or "none",
        )
        return self.port

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def drain(self, grace_s: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, refuse new streams, end in-flight ones, stop.

        In-flight streams may run on for ``grace_s`` (default ``config.drain_grace_s``); streams
        still running then are ended at their next chunk boundary with UNAVAILABLE, and clients
        resume elsewhere from their cursor. Returns when the server has stopped.
        """
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        with self._lock:
            if self._drain_deadline is None:
                # health first: load balancers stop routing here before streams are refused
                for service in ("", SERVICE_NAME):
                    self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
                self._drain_deadline = time.monotonic() + grace
        log_event(log, "drain", grace_s=grace, active_streams=self.load.active)
        # streams end at the deadline at their next chunk; allow a moment for that chunk
        left = self.load.wait_idle(grace + 2.0)
        if left:
            log_event(log, "drain_cancel", level=logging.WARNING, streams=left)
        self.stop(grace_s=0.5)

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop at once (in-flight calls are cancelled after ``grace_s``); a second call (from
        another thread) waits for the first."""
        with self._lock:
            first = not self._stopping
            self._stopping = True
        if not first:
            self._stopped.wait()
            return
        self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        self.versions.close()
        self.metrics.close()
        self._stopped.set()
        log_event(
            log, "stopped", address=self.address, forward_windows=self.teacher.forward_windows
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (or ``timeout``); True when stopped."""
        return self._stopped.wait(timeout)

    def flush_cache(self) -> None:
        """Wait until write-through labels queued so far are on disk."""
        for v in self.versions.all():
            v.flush()

    # -- shared stream state -------------------------------------------------------------------
    def acquire_stream(self) -> bool:
        """Admit a stream (False: ``max_streams`` are active)."""
        if not self.load.acquire():
            return False
        self.metrics.active_streams.inc()
        return True

    def release_stream(self, unsent: int = 0) -> None:
        """A stream ended with ``unsent`` windows not sent."""
        self.load.release(unsent)
        self.metrics.active_streams.dec()

    @property
    def active_streams(self) -> int:
        return self.load.active

    def batcher_stats(self) -> BatcherStats:
        """Counters of the shared batching queue."""
        return self.versions.newest.stats()

    def describe(self) -> pb.TeacherInfo:
        meta = self.teacher.meta
        load = self.load.snapshot()
        return pb.TeacherInfo(
            teacher_version=meta.version,
            model_key=meta.model_key,
            dataset_fingerprint=meta.fingerprint,
            window_shape=list(meta.window_shape),
            wire_dtypes=list(codec.WIRE_DTYPES.values()),
            horizon=meta.horizon,
            input_steps=meta.input_steps,
            has_spread=meta.has_spread,
            splits=[
                pb.SplitInfo(split=s, windows=len(r), start=r.start, stop=r.stop, step=r.step)
                for s, r in meta.splits.items()
            ],
            max_message_bytes=self.config.max_message_bytes,
            server_id=f"{self.address}/pid{os.getpid()}",
            forward_windows=self.teacher.forward_windows,
            cached_windows=self.cache.filled_windows() if self.cache else 0,
            val_mae=meta.val_mae or 0.0,
            active_streams=load.active_streams,
            max_streams=load.max_streams,
            outstanding_windows=load.outstanding_windows,
            streams_served=load.streams_served,
            idle_seconds=load.idle_s,
            hidden_dim=meta.hidden_dim,
        )

    # -- requests ------------------------------------------------------------------------------
    def plan(self, request: pb.LabelRequest) -> LabelPlan:
        """Validate ``request`` against the newest version and resolve its window sequence;
        raises :class:`RequestError`."""
        return self.versions.newest.plan(request)

    def chunks(
        self,
        plan: LabelPlan,
        context: grpc.ServicerContext,
        version: ServedVersion | None = None,
    ) -> Iterator[codec.EncodedChunk]:
        """The chunks of ``plan`` from its resume cursor on, computed by ``version``'s teacher
        (default: the newest)."""
        return (version or self.versions.newest).producer.chunks(plan, context)
