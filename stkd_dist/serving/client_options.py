"""The settings, requests, counters and errors of :class:`~stkd_dist.serving.client.SoftLabelClient`.

:class:`ClientOptions` is the one definition of how a client talks to teacher services (and of
its defaults); every caller (``train-student``, ``distill``, sweeps, benchmarks) passes one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from stkd_dist.errors import ConfigError, StkdError
from stkd_dist.serving import codec

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,  # a server that stops cancels its in-flight calls
        grpc.StatusCode.INTERNAL,  # e.g. RST_STREAM from a peer that died mid-message
        grpc.StatusCode.UNKNOWN,
    }
)
STREAM_LABELS = "/stkd.v1.TeacherService/StreamLabels"
# most ranges in one request (~15 bytes each): keeps requests far below gRPC's 4 MiB default
MAX_RANGES_PER_REQUEST = 100_000


class LabelMismatchError(StkdError):
    """The teacher serves another dataset or teacher version than the client expects."""


class TeacherUnavailableError(StkdError):
    """No replica could deliver the labels within the retry budget."""


class TeacherRequestError(StkdError):
    """The teacher refused the request (bad windows, split, token, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str, where: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}", where=where)
        self.code = code
        self.details = message

    def __reduce__(self) -> tuple[Any, ...]:
        # pickling (Ray hands a worker's exception to the driver) must call __init__ with its own
        # arguments: the default, cls(*self.args), passes the one formatted message and fails
        return type(self), (self.code, self.details, self.where)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between reconnection attempts.

    Attempt ``k`` (1-based, counted since the last chunk received) waits
    ``min(max_s, initial_s * multiplier**(k-1))`` times a random factor in ``[0.5, 1]``; after
    ``max_attempts`` attempts without progress the stream fails with
    :class:`TeacherUnavailableError`.
    """

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < self.initial_s or self.multiplier < 1:
            raise ConfigError("need 0 <= initial_s <= max_s and multiplier >= 1", where="backoff")
        if self.max_attempts < 1:
            raise ConfigError(
                f"must be >= 1, got {self.max_attempts}", where="backoff.max_attempts"
            )

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier ** max(attempt - 1, 0))
        return base * random.uniform(0.5, 1.0)


@dataclass(frozen=True)
class ClientOptions:
    """How a client talks to teacher services: the one definition of its settings and defaults.

    Attributes:
        token: bearer token (None: ``$STKD_TOKEN``; resolve it on the driver, workers may not see
            its environment).
        tls_ca: CA certificate (PEM path, readable where the client runs); enables TLS.
        tls_cert, tls_key: client certificate and key for mutual TLS.
        tls_ca_pem: the CA certificate itself (PEM bytes) instead of a path: what a run's
            generated CA travels as to workers on other nodes (see
            :mod:`~stkd_dist.serving.certs`); enables TLS.
        wire_dtype: ``float32`` keeps labels bit-exact; ``float16``/``bfloat16`` halve the bytes.
        prefetch: label chunks buffered ahead of the consumer, per stream.
        max_message_bytes: largest label message accepted (the server caps it to its own
            limit); windows whose labels are larger arrive split along the node axis and are
            reassembled here. The server refuses a limit below one node's labels of one window
            (``[H, 1, C]`` per output plus about 1 KB of headers) with INVALID_ARGUMENT.
        deadline: seconds one call may take before it is resumed with a new call (None = none).
        backoff: reconnection policy.
        keepalive_s: seconds between HTTP/2 keepalive pings on every connection, even idle
            ones: a replica that stops answering without closing its connection (stopped,
            partitioned) is noticed within ``keepalive_s + keepalive_timeout_s``, not at the call
            deadline, and its streams resume from their cursors on another replica.
        keepalive_timeout_s: seconds a ping may go unanswered before the connection is dropped.
        discovery_s: seconds after which the endpoints are resolved again when a stream opens:
            replicas started meanwhile get new streams without any failure having happened.
        admission_timeout_s: how long a new stream waits for a free slot while every replica is
            full (its ``max_streams``) before the run fails with a clear error.
        connect_timeout_s: seconds a new connection may take to complete its HTTP/2 handshake:
            a stopped replica accepts TCP connections (the kernel does) but never answers, and
            gRPC's default of 20 s per attempt would hold every new stream that long.
    """

    # secrets stay out of reprs (logs, error messages)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca_pem: bytes | None = field(default=None, repr=False)
    wire_dtype: str = "float32"
    prefetch: int = 8
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    deadline: float | None = 300.0
    backoff: Backoff = Backoff()
    keepalive_s: float = 2.0
    keepalive_timeout_s: float = 3.0
    connect_timeout_s: float = 2.0
    discovery_s: float = 5.0
    admission_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        codec.wire_dtype(self.wire_dtype)  # raises for an unknown dtype
        if self.prefetch < 1:
            raise ConfigError(f"must be >= 1, got {self.prefetch}", where="prefetch")
        if self.max_message_bytes < 1:
            raise ConfigError(
                f"must be >= 1 byte, got {self.max_message_bytes}", where="max_message_bytes"
            )
        for name in (
            "keepalive_s",
            "keepalive_timeout_s",
            "connect_timeout_s",
            "discovery_s",
            "admission_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be > 0 seconds, got {getattr(self, name)}", where=name)
        if self.deadline is not None and self.deadline <= 0:
            raise ConfigError(f"must be > 0 seconds, got {self.deadline}", where="deadline")


@dataclass
class ClientStats:
    """What a client did (all streams): ``chunks`` handed to streams (a split window is one),
    ``slices`` node-slice messages received (including those of partial windows that a broken
    stream dropped), ``windows`` and label ``bytes`` delivered."""

    chunks: int = 0
    slices: int = 0
    windows: int = 0
    bytes: int = 0
    reconnects: int = 0
    checksum_failures: int = 0
    redirects: int = 0  # streams a full replica turned away, placed on another one
    admission_waits: int = 0  # waits for a free stream slot while every replica was full
    endpoints: set[str] = field(default_factory=set)


def to_ranges(windows: Sequence[int] | np.ndarray) -> list[tuple[int, int, int]]:
    """Compress an ordered window sequence into ``(start, stop, step)`` runs (order kept)."""
    w = np.asarray(windows, dtype=np.int64).reshape(-1)
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(w)
    while i < n:
        if i + 1 < n and w[i + 1] > w[i]:
            step = int(w[i + 1] - w[i])
            j = i + 1
            while j + 1 < n and w[j + 1] - w[j] == step:
                j += 1
            out.append((int(w[i]), int(w[j]) + 1, step))
            i = j + 1
        else:
            out.append((int(w[i]), int(w[i]) + 1, 1))
            i += 1
    return out


@dataclass(frozen=True)
class PlanRequest:
    """A shard plan the server recomputes (see :func:`stkd_dist.data.plan.make_plan`)."""

    world_size: int
    rank: int
    epoch: int = 0
    seed: int = 0
    batch_size: int = 32
    shuffle: bool = True
    chunk_steps: int = 0  # 0: the server's store's time-chunk length
    start: int = 0  # the position in the rank's sequence to start at (a resumed epoch)
    # (world_size, steps) of the epoch's earlier deals, when it was re-dealt (data.regroup)
    regroups: tuple[tuple[int, int], ...] = ()


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ClientOptions))


def keepalive_options(options: ClientOptions) -> list[tuple[str, int]]:
    """gRPC channel arguments that notice a silent replica within seconds: keepalive pings
    (:attr:`ClientOptions.keepalive_s`) and the connection timeout."""
    keepalive_s, timeout_s = options.keepalive_s, options.keepalive_timeout_s
    return [
        # gRPC core uses the minimum reconnect backoff as the timeout of a connection attempt
        ("grpc.min_reconnect_backoff_ms", int(options.connect_timeout_s * 1000)),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # newer gRPC cores time pings out by this argument (default 60 s), not the one above
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        # ping idle connections too: a stream waiting on a stopped replica carries no data
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
