"""Security of the teacher service: TLS credentials and bearer tokens.

* TLS: the server presents a certificate (``--tls-cert``/``--tls-key``); with ``--tls-client-ca``
  it also requires client certificates signed by that CA (mutual TLS). Certificates and keys are
  PEM files or PEM bytes in memory (those a run generates: :mod:`~stkd_dist.serving.certs`).
* Token: every call to the project's services must carry the metadata
  ``authorization: Bearer <token>``; :class:`TokenAuthInterceptor` checks it in constant time and
  answers UNAUTHENTICATED otherwise. The standard health service stays open so that load balancers
  and Kubernetes probes need no secret.

The token comes from ``--token`` or the ``STKD_TOKEN`` environment variable, on the server and the
client alike.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from stkd_dist.errors import ConfigError
from stkd_dist.location import PathInput, as_path

TOKEN_ENV = "STKD_TOKEN"
# methods of these packages need the token; everything else (grpc.health.v1) stays open
PROTECTED_PREFIXES = ("/stkd.",)


def resolve_token(token: str | None) -> str | None:
    """``token``, else ``$STKD_TOKEN``, else None (an empty string counts as unset)."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    return value or None


PemSource: TypeAlias = Path | bytes
"""A PEM file, or the PEM bytes themselves."""


def _read(path: PathInput | bytes | None, what: str) -> bytes | None:
    """The PEM bytes of ``path`` (bytes are already PEM and pass through)."""
    if path is None or isinstance(path, bytes):
        return path
    p = as_path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} ({e.strerror})", where=str(p)) from e


def _check_pem(value: PemSource | None, where: str) -> None:
    """Refuse bytes that are not PEM: a path given as bytes, or an empty value, would otherwise
    surface only as an obscure handshake failure."""
    if isinstance(value, bytes) and b"-----BEGIN " not in value:
        raise ConfigError("expected PEM bytes (give a file as a Path)", where=where)


def _describe(value: PemSource | None) -> str:
    # keys (and certificates) in memory stay out of reprs and the logs they end up in
    return f"<{len(value)} PEM bytes>" if isinstance(value, bytes) else repr(value)


@dataclass(frozen=True, repr=False)
class ServerTls:
    """Server TLS: certificate chain and key, and an optional client CA for mTLS.

    Each is a PEM file (:class:`~pathlib.Path`, read when :meth:`credentials` is called) or the
    PEM bytes themselves (e.g. a certificate issued by
    :meth:`~stkd_dist.serving.certs.CertificateAuthority.issue`).

    Raises:
        ConfigError: a value given as bytes that is not PEM.
    """

    cert: PemSource
    key: PemSource
    client_ca: PemSource | None = None

    def __post_init__(self) -> None:
        _check_pem(self.cert, "tls.cert")
        _check_pem(self.key, "tls.key")
        _check_pem(self.client_ca, "tls.client_ca")

    def __repr__(self) -> str:
        return (
            f"ServerTls(cert={_describe(self.cert)}, key={_describe(self.key)}, "
            f"client_ca={_describe(self.client_ca)})"
        )

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; requires client certificates when ``client_ca`` is set.

        Raises:
            ConfigError: a file that cannot be read.
        """
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        ca = _read(self.client_ca, "client CA") if self.client_ca is not None else None
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True, repr=False)
class ClientTls:
    """Client TLS: the CA that signed the servers' certificates, and an optional client
    certificate and key for mTLS; each a PEM file (:class:`~pathlib.Path`) or PEM bytes (e.g. a
    run's generated CA, :attr:`~stkd_dist.serving.certs.RunSecurity.ca_pem`). ``ca=None`` trusts
    the system's roots. ``target_name`` overrides the name the server certificate is checked
    against (needed when connecting by IP to a certificate issued for a DNS name).

    Raises:
        ConfigError: a certificate without its key (or the reverse), or bytes that are not PEM.
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    target_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("give both a client certificate and its key, or neither", "tls")
        _check_pem(self.ca, "tls.ca")
        _check_pem(self.cert, "tls.cert")
        _check_pem(self.key, "tls.key")

    def __repr__(self) -> str:
        return (
            f"ClientTls(ca={_describe(self.ca)}, cert={_describe(self.cert)}, "
            f"key={_describe(self.key)}, target_name={self.target_name!r})"
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials.

        Raises:
            ConfigError: a file that cannot be read.
        """
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS client key"),
            certificate_chain=_read(self.cert, "TLS client certificate"),
        )


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        deny,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every method of the project's services.

    Args:
        token: the shared secret.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("the token must not be empty", where="--token")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(PROTECTED_PREFIXES):
            return handler
        given = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode()
                break
        if not given:
            return _denying(handler, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(given.encode(), self._expected):
            return _denying(handler, "invalid token")
        return handler
