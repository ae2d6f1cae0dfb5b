"""Security: bearer token on the teacher service (health stays open), TLS and mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stkd_dist.errors import ConfigError
from stkd_dist.serving.auth import ClientTls, ServerTls, TokenAuthInterceptor
from stkd_dist.serving.client import (
    Backoff,
    SoftLabelClient,
    TeacherRequestError,
    TeacherUnavailableError,
)
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.server import SERVICE_NAME
from tests.serving.tls_refusals import (
    CLOSED_BY_SERVER,
    REASONS,
    UNTRUSTED,
    assert_client_refused,
    assert_streams_refused,
    capture_client_log,
    is_handshake_refusal,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path,
    cert: x509.Certificate | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        assert key is not None
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("stkd test CA", ca_key, "stkd test CA", ca_key, ca=True)
    other = _cert("another CA", other_key, "another CA", other_key, ca=True)
    s_key, c_key = _key(), _key()
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("teacher", s_key, "stkd test CA", ca_key, ca=False, san=san)
    client = _cert("student", c_key, "stkd test CA", ca_key, ca=False)
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", server),
        server_key=_write(d / "server.key", key=s_key),
        client_cert=_write(d / "client.pem", client),
        client_key=_write(d / "client.key", key=c_key),
        other_ca=_write(d / "other-ca.pem", other),
    )


FAST_FAIL = Backoff(initial_s=0.01, max_s=0.02, max_attempts=2)


def _labels(client: SoftLabelClient) -> np.ndarray:
    return np.concatenate([i for i, _ in client.stream("train", range(0, 40))])


def test_token_required_on_teacher_service_but_not_health(server_factory, teacher_env) -> None:
    server = server_factory(token="s3cret")
    ok = SoftLabelClient(
        [server.address], expected_fingerprint=teacher_env.fingerprint, token="s3cret"
    )
    with ok:
        assert _labels(ok).tolist() == list(range(40))
        assert ok.describe().teacher_version == teacher_env.version
    for token in (None, "wrong"):
        client = SoftLabelClient(
            [server.address], expected_fingerprint=teacher_env.fingerprint, token=token
        )
        with client, pytest.raises(TeacherRequestError, match="UNAUTHENTICATED") as info:
            _labels(client)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with client, pytest.raises(TeacherRequestError, match="UNAUTHENTICATED"):
            client.describe()
    # raw calls: the status code and a message saying what is missing
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Describe(pb.DescribeRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in info.value.details()
        # probes need no token
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_token_comes_from_the_environment(server_factory, teacher_env, monkeypatch) -> None:
    server = server_factory(token="from-env")
    monkeypatch.setenv("STKD_TOKEN", "from-env")
    with SoftLabelClient([server.address], expected_fingerprint=teacher_env.fingerprint) as c:
        assert _labels(c).size == 40


def _refused(client: SoftLabelClient, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every call of ``client`` fails in the TLS handshake for ``reason``, streams included."""
    with pytest.raises(TeacherUnavailableError) as info:
        client.describe()
    assert_client_refused(info.value, reason)
    caplog.clear()
    with pytest.raises(TeacherUnavailableError, match="after 2 attempts"):
        _labels(client)
    assert_streams_refused(caplog, FAST_FAIL.max_attempts, reason)
    assert client.stats.chunks == 0


def test_tls_with_a_generated_certificate(server_factory, teacher_env, pki: Pki, caplog) -> None:
    server = server_factory(tls=ServerTls(pki.server_cert, pki.server_key), token="t")
    for host in ("127.0.0.1", "localhost"):
        address = f"{host}:{server.port}"
        with SoftLabelClient(
            [address], expected_fingerprint=teacher_env.fingerprint, tls_ca=pki.ca, token="t"
        ) as c:
            assert _labels(c).tolist() == list(range(40))
    # a client trusting another CA cannot connect: it rejects the server's certificate; nor can
    # a plaintext one: the server ends the connection in the handshake. Both have the token.
    capture_client_log(caplog)
    for kwargs, reason in (({"tls_ca": pki.other_ca}, UNTRUSTED), ({}, CLOSED_BY_SERVER)):
        with SoftLabelClient(
            [server.address],
            expected_fingerprint=teacher_env.fingerprint,
            token="t",
            backoff=FAST_FAIL,
            **kwargs,
        ) as c:
            _refused(c, reason, caplog)


def test_mutual_tls_requires_a_client_certificate(
    server_factory, teacher_env, pki: Pki, caplog
) -> None:
    server = server_factory(tls=ServerTls(pki.server_cert, pki.server_key, client_ca=pki.ca))
    with SoftLabelClient(
        [server.address],
        expected_fingerprint=teacher_env.fingerprint,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
    ) as c:
        assert _labels(c).tolist() == list(range(40))
    # trusting the server is not enough: without a client certificate the server ends the
    # handshake
    capture_client_log(caplog)
    with SoftLabelClient(
        [server.address],
        expected_fingerprint=teacher_env.fingerprint,
        tls_ca=pki.ca,
        backoff=FAST_FAIL,
    ) as c:
        _refused(c, CLOSED_BY_SERVER, caplog)


def test_a_closed_port_is_no_handshake_refusal(teacher_env, pki: Pki) -> None:
    """The handshake assertions tell a refused handshake from a server that is not there."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for kwargs in ({"tls_ca": pki.ca}, {}):
        with (
            SoftLabelClient(
                [f"127.0.0.1:{port}"],
                expected_fingerprint=teacher_env.fingerprint,
                backoff=FAST_FAIL,
                **kwargs,
            ) as c,
            pytest.raises(TeacherUnavailableError) as info,
        ):
            c.describe()
        name, _, details = info.value.message.partition(": ")
        assert name == "UNAVAILABLE" and details.endswith("Connection refused"), details
        assert not any(is_handshake_refusal(details, reason) for reason in REASONS)


def test_unsecured_server_binds_loopback_only(server_factory, caplog) -> None:
    server = server_factory(host="0.0.0.0")
    assert server.host == "127.0.0.1"
    assert "127.0.0.1 only" in caplog.text


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="token"):
        TokenAuthInterceptor("")
    with pytest.raises(ConfigError, match="both"):
        ClientTls(cert=Path("c.pem"))
    with pytest.raises(ConfigError, match="cannot read"):
        ServerTls(Path("/nonexistent/cert.pem"), Path("/nonexistent/key.pem")).credentials()
