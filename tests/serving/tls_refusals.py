"""What gRPC reports when a TLS teacher's handshake refuses a client, to assert on precisely.

A refused connection fails the call with ``UNAVAILABLE`` and the details ``failed to connect to
all addresses; last error: ...``; the last error says why (as grpcio 1.85 words it):

* :data:`UNTRUSTED`: the client does not trust the server's certificate (signed by another CA);
* :data:`WRONG_NAME`: the certificate does not name the address or name the client dialled;
* :data:`CLOSED_BY_SERVER`: the server ends the handshake of a client it refuses (a plaintext
  client, or a TLS client without the certificate mutual TLS asks for). The client then only
  sees its socket, connected a moment before, closed: the reason is on the server's side.

A port nobody listens on reads ``Failed to connect to remote host: Connection refused``, which
matches none of them (``test_auth.py`` checks that against a real closed port).
"""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from stkd_dist.serving.client import TeacherUnavailableError

UNTRUSTED = r"Tls handshake failed \(TSI_PROTOCOL_FAILURE\): .*CERTIFICATE_VERIFY_FAILED"
WRONG_NAME = r"Custom verification check failed with error: UNAUTHENTICATED: Hostname Verification"
CLOSED_BY_SERVER = r"ipv[46]:[^ ]+: Socket closed"
REASONS = (UNTRUSTED, WRONG_NAME, CLOSED_BY_SERVER)

_FAILED_TO_CONNECT = r"failed to connect to all addresses; last error: [A-Z_]+: "


def is_handshake_refusal(details: str, reason: str) -> bool:
    """Whether the details of an UNAVAILABLE call say the connection failed for ``reason``."""
    return (
        re.match(_FAILED_TO_CONNECT + ".*" + reason, details) is not None
        and "Connection refused" not in details
    )


def assert_rpc_refused(code: grpc.StatusCode, details: str, reason: str) -> None:
    """A raw gRPC call failed in the TLS handshake for ``reason`` (``e.code()``, ``e.details()``)."""
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert is_handshake_refusal(details, reason), f"not a refusal for {reason!r}: {details}"


def assert_client_refused(error: TeacherUnavailableError, reason: str) -> None:
    """A :class:`SoftLabelClient` call (``describe``) failed in the TLS handshake for ``reason``:
    its message is ``<code name>: <details>`` of the last attempt."""
    name, _, details = error.message.partition(": ")
    assert name in grpc.StatusCode.__members__, error.message
    assert_rpc_refused(grpc.StatusCode[name], details, reason)


def stream_breaks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The client's ``stream from ... broke (CODE: details); resuming at N`` log messages (a stream
    that runs out of attempts raises an error that no longer names the cause)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "stkd_dist.serving.client" and " broke (" in r.getMessage()
    ]


def assert_streams_refused(caplog: pytest.LogCaptureFixture, attempts: int, reason: str) -> None:
    """Each of the stream's ``attempts`` attempts broke in the TLS handshake for ``reason``.

    Needs ``caplog`` at INFO for ``stkd_dist.serving.client``.
    """
    breaks = stream_breaks(caplog)
    assert len(breaks) == attempts, breaks
    for line in breaks:
        found = re.search(r" broke \(UNAVAILABLE: (.*)\); resuming at \d+$", line)
        assert found is not None, line
        assert is_handshake_refusal(found.group(1), reason), f"not for {reason!r}: {line}"


def capture_client_log(caplog: pytest.LogCaptureFixture) -> None:
    """Record the client's INFO messages (what :func:`assert_streams_refused` reads)."""
    caplog.set_level(logging.INFO, logger="stkd_dist.serving.client")
