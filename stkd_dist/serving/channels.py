"""The gRPC channels of a client, one per replica: TLS, token, keepalive, message limits.

:class:`Channels` builds every channel of a :class:`~stkd_dist.serving.client.SoftLabelClient`
from its :class:`~stkd_dist.serving.client_options.ClientOptions` and keeps it for the client's
life; :meth:`Channels.probe` asks a replica for its load (what stream placement needs).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import grpc

from stkd_dist.location import PathInput, as_path
from stkd_dist.serving.auth import ClientTls, bearer, resolve_token
from stkd_dist.serving.client_options import ClientOptions, keepalive_options
from stkd_dist.serving.discovery import Endpoint
from stkd_dist.serving.placement import ReplicaLoad
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc


def _path(p: PathInput | None) -> Path | None:
    return None if p is None else as_path(p)


class Channels:
    """One channel per replica endpoint, made on first use (thread-safe).

    Args:
        options: the client's settings (``token`` resolved against ``$STKD_TOKEN`` here).
    """

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        token = resolve_token(options.token)
        #: call metadata carrying the bearer token (empty without one)
        self.metadata: tuple[tuple[str, str], ...] = bearer(token) if token else ()
        self._tls: ClientTls | None = None
        if options.tls_ca is not None or options.tls_cert is not None or options.tls_ca_pem:
            self._tls = ClientTls(
                ca=options.tls_ca_pem if options.tls_ca_pem is not None else _path(options.tls_ca),
                cert=_path(options.tls_cert),
                key=_path(options.tls_key),
            )
        # a load probe is answered at once by a live replica; a stopped one must not hold a
        # new stream longer than a broken connection would
        self.probe_timeout = options.connect_timeout_s + options.keepalive_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[Endpoint, grpc.Channel] = {}

    def get(self, ep: Endpoint) -> grpc.Channel:
        """The channel to ``ep`` (TLS checked against ``ep.tls_name`` when it has one)."""
        with self._lock:
            ch = self._channels.get(ep)
            if ch is None:
                limit = int(self.options.max_message_bytes) + 64 * 1024
                args: list[tuple[str, Any]] = [
                    ("grpc.max_receive_message_length", max(limit, 4 * 1024 * 1024)),
                    ("grpc.max_send_message_length", 16 * 1024 * 1024),
                    *keepalive_options(self.options),
                ]
                if self._tls is not None:
                    if ep.tls_name:
                        args.append(("grpc.ssl_target_name_override", ep.tls_name))
                    ch = grpc.secure_channel(ep.address, self._tls.credentials(), args)
                else:
                    ch = grpc.insecure_channel(ep.address, args)
                self._channels[ep] = ch
            return ch

    def probe(self, ep: Endpoint) -> ReplicaLoad | None:
        """A replica's load, or None when it does not answer within the probe timeout."""
        stub = pb_grpc.TeacherServiceStub(self.get(ep))
        try:
            info = stub.Describe(
                pb.DescribeRequest(), timeout=self.probe_timeout, metadata=self.metadata
            )
        except grpc.RpcError:
            return None
        return ReplicaLoad(info.active_streams, info.max_streams, info.outstanding_windows)

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()
