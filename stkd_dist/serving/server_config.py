"""Settings of a teacher server (:class:`ServerConfig`) and the loopback rule.

Re-exported by :mod:`stkd_dist.serving.server`, where callers usually import them from.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stkd_dist.errors import ConfigError
from stkd_dist.serving import codec
from stkd_dist.serving.auth import ServerTls
from stkd_dist.serving.batcher import RECENT_BYTES

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerConfig:
    """Settings of a :class:`~stkd_dist.serving.server.TeacherServer`.

    Attributes:
        host: address to bind; forced to 127.0.0.1 when there is neither TLS nor a token.
        port: port to bind, 0 = a free port.
        max_streams: most concurrent ``StreamLabels`` calls.
        batch_size: most windows per teacher forward pass.
        batch_wait_s: how long a batch waits to fill.
        max_message_bytes: largest chunk message sent (requests may ask for less).
        token: bearer token required on the teacher service (None = none).
        tls: server TLS settings (None = plaintext).
        drain_grace_s: how long in-flight streams may run on after a drain starts.
        lookahead: chunks per stream queued in the batcher ahead of the one being sent.
        metrics_port: port of the Prometheus endpoint (None = no endpoint, 0 = a free port).
        recent_bytes: label bytes of recently computed batches the batcher keeps, so windows
            asked for again a moment later (streams reading the same epoch) are not recomputed.
        keep_versions: teacher versions that take new streams once newer ones are published
            (:meth:`TeacherServer.publish`): a stream pinned to the previous version (resumed,
            failed over) still finds it; older ones close once their last stream ends.

    How the teacher computes (device, precision, micro-batch) is the teacher's own setting
    (:attr:`Teacher.compute <stkd_dist.serving.teacher.Teacher.compute>`). ``batch_size`` is
    best a multiple of its micro-batch: every batch is padded to whole micro-batches.
    """

    host: str = LOOPBACK
    port: int = 0
    max_streams: int = 16
    batch_size: int = 64
    batch_wait_s: float = 0.005
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    token: str | None = None
    tls: ServerTls | None = None
    drain_grace_s: float = 10.0
    lookahead: int = 2
    metrics_port: int | None = None
    recent_bytes: int = RECENT_BYTES
    keep_versions: int = 2

    def __post_init__(self) -> None:
        for name in ("max_streams", "batch_size", "lookahead", "keep_versions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", where=name)
        for name in ("batch_wait_s", "drain_grace_s", "recent_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", where=name)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be a port number, got {self.port}", where="port")
        if self.max_message_bytes < 64 * 1024:
            raise ConfigError(
                f"must be at least 65536 bytes, got {self.max_message_bytes}",
                where="max_message_bytes",
            )

    @property
    def secured(self) -> bool:
        return self.tls is not None or bool(self.token)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: gRPC server arguments accepting the clients' keepalive pings (every second at most): without
#: them the server answers frequent pings with GOAWAY ("too_many_pings") and drops the stream
SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # the server pings its clients too: a student that vanished frees its stream slot
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
