"""Generated run security (:mod:`stkd_dist.serving.certs`): the CA and the certificates it issues,
checked with cryptography's own X.509 verifier, and real TLS teacher servers presenting them."""

from __future__ import annotations

import copy
import datetime
import ipaddress
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from stkd_dist.errors import ConfigError
from stkd_dist.serving.auth import ClientTls, ServerTls, bearer
from stkd_dist.serving.certs import (
    CLOCK_SKEW,
    CertificateAuthority,
    IssuedCert,
    RunSecurity,
    generate_token,
    new_run_security,
)
from stkd_dist.serving.client import (
    Backoff,
    ClientOptions,
    SoftLabelClient,
    TeacherRequestError,
    TeacherUnavailableError,
)
from stkd_dist.serving.proto_gen import teacher_pb2 as pb
from stkd_dist.serving.proto_gen import teacher_pb2_grpc as pb_grpc
from stkd_dist.serving.server import TeacherServer
from tests.serving.tls_refusals import (
    CLOSED_BY_SERVER,
    UNTRUSTED,
    WRONG_NAME,
    assert_client_refused,
    assert_rpc_refused,
    assert_streams_refused,
    capture_client_log,
)

DNS_NAME = "stkd-teacher-x-0"
FAST_FAIL = Backoff(max_attempts=2, initial_s=0.01, max_s=0.05)
WINDOWS = [3, 0, 17, 18, 19, 39, 7]  # out of order and with a run: order must be kept
SLACK = datetime.timedelta(minutes=1)


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _verifier(ca_pem: bytes, name: x509.GeneralName) -> object:
    """cryptography's RFC 5280 / CA-B Forum path validator for a server reached by ``name``."""
    store = Store([_load(ca_pem)])
    return PolicyBuilder().store(store).build_server_verifier(name)


# -- unit: the certificates ------------------------------------------------------------------------


def test_issued_certificate_verifies_against_the_ca() -> None:
    ca = CertificateAuthority.create(days=30)
    issued = ca.issue([DNS_NAME, "127.0.0.1", "::1"], days=7)
    cert, ca_cert = _load(issued.cert_pem), _load(ca.cert_pem)
    # the signature, with the CA's public key directly
    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    # full path validation (CA constraints, key usages, serverAuth, validity) for every name
    names: list[x509.GeneralName] = [
        x509.DNSName(DNS_NAME),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        chain = _verifier(ca.cert_pem, name).verify(cert, [])  # type: ignore[attr-defined]
        assert chain[-1] == ca_cert
    # ... and for no other name, nor under another CA
    with pytest.raises(VerificationError):
        _verifier(ca.cert_pem, x509.DNSName("elsewhere")).verify(cert, [])  # type: ignore[attr-defined]
    other = CertificateAuthority.create()
    with pytest.raises(VerificationError):
        _verifier(other.cert_pem, x509.DNSName(DNS_NAME)).verify(cert, [])  # type: ignore[attr-defined]
    # the issuer is named by its key identifier
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_issued_certificate_names_usage_validity_and_key() -> None:
    ca = CertificateAuthority.create(days=30)
    before = datetime.datetime.now(datetime.UTC)
    issued = ca.issue([DNS_NAME, "127.0.0.1", "::1", DNS_NAME], days=7)
    after = datetime.datetime.now(datetime.UTC)
    cert = _load(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DNS_NAME]  # duplicates dropped
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    # valid from a few minutes back (clock skew) to `days` ahead
    assert cert.not_valid_before_utc <= before - CLOCK_SKEW + SLACK
    assert cert.not_valid_before_utc >= before - CLOCK_SKEW - SLACK
    assert before + datetime.timedelta(days=7) - SLACK <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= after + datetime.timedelta(days=7)
    # the key: unencrypted PKCS#8, P-256, and the one the certificate is for
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert b"PRIVATE KEY" not in repr(issued).encode()


def test_certificates_never_outlive_the_ca() -> None:
    ca = CertificateAuthority.create(days=2)
    cert = _load(ca.issue(["127.0.0.1"], days=30).cert_pem)
    assert cert.not_valid_after_utc == _load(ca.cert_pem).not_valid_after_utc


def test_the_ca_is_a_ca() -> None:
    before = datetime.datetime.now(datetime.UTC)
    ca = CertificateAuthority.create(common_name="run 42 CA", days=3)
    cert = _load(ca.cert_pem)
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=run 42 CA"
    cert.verify_directly_issued_by(cert)  # self-signed
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    assert cert.not_valid_before_utc <= before
    assert before + datetime.timedelta(days=3) - SLACK <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc <= before + datetime.timedelta(days=3) + SLACK


def test_the_ca_key_stays_in_the_object() -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(ca)
    with pytest.raises(TypeError, match="not picklable"):
        copy.deepcopy(ca)
    assert "PRIVATE" not in repr(ca)
    assert not any("key" in name for name in dir(ca) if not name.startswith("_"))
    # what clients get pickles fine (it travels to workers) and hides the token in its repr
    security, ca = new_run_security()
    assert pickle.loads(pickle.dumps(security)) == security
    assert security.ca_pem == ca.cert_pem
    assert security.token not in repr(security)


def test_tokens_are_fresh_and_url_safe() -> None:
    tokens = {generate_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert len(token) >= 43  # 32 random bytes
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert new_run_security()[0].token != new_run_security()[0].token


@pytest.mark.parametrize(
    ("call", "where"),
    [
        (lambda ca: ca.issue([]), "names"),
        (lambda ca: ca.issue("127.0.0.1"), "names"),
        (lambda ca: ca.issue(["ok", ""]), "names"),
        (lambda ca: ca.issue(["has space"]), "names"),
        (lambda ca: ca.issue(["ok"], days=0), "days"),
        (lambda ca: CertificateAuthority.create(common_name=""), "common_name"),
        (lambda ca: CertificateAuthority.create(days=-1), "days"),
        (lambda ca: RunSecurity(token="", ca_pem=ca.cert_pem), "token"),
        (lambda ca: RunSecurity(token="t", ca_pem=b"/path/ca.pem"), "ca_pem"),
        (lambda ca: ServerTls(b"/path/cert.pem", Path("k.pem")), "tls.cert"),
        (lambda ca: ClientTls(ca=b""), "tls.ca"),
    ],
)
def test_bad_inputs_name_the_field(call, where: str) -> None:
    ca = CertificateAuthority.create()
    with pytest.raises(ConfigError) as info:
        call(ca)
    assert info.value.where == where


def test_tls_settings_accept_pem_bytes_and_keep_them_out_of_reprs(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue(["127.0.0.1"])
    tls = issued.server_tls()
    assert (tls.cert, tls.key, tls.client_ca) == (issued.cert_pem, issued.key_pem, None)
    assert isinstance(tls.credentials(), grpc.ServerCredentials)
    assert b"PRIVATE" not in repr(tls).encode() and "PEM bytes" in repr(tls)
    client = ClientTls(ca=ca.cert_pem, cert=issued.cert_pem, key=issued.key_pem)
    assert isinstance(client.credentials(), grpc.ChannelCredentials)
    assert "PRIVATE" not in repr(client)
    # paths still work, and still say which file is missing
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    (tmp_path / "key.pem").write_bytes(issued.key_pem)
    assert "cert.pem" in repr(ServerTls(tmp_path / "cert.pem", tmp_path / "key.pem"))
    ServerTls(tmp_path / "cert.pem", tmp_path / "key.pem").credentials()
    with pytest.raises(ConfigError, match="cannot read"):
        ServerTls(tmp_path / "nope.pem", tmp_path / "key.pem").credentials()


# -- integration: real servers ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunPki:
    security: RunSecurity
    ip_cert: IssuedCert
    dns_cert: IssuedCert
    other_ca_pem: bytes


@pytest.fixture(scope="module")
def run_pki() -> RunPki:
    security, ca = new_run_security()
    return RunPki(
        security,
        ca.issue(["127.0.0.1"]),
        ca.issue([DNS_NAME]),
        CertificateAuthority.create().cert_pem,
    )


def _labels(
    client: SoftLabelClient,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = list(client.stream("train", WINDOWS, spread=True))
    assert all(lab.spread is not None for _, lab in parts)
    return (
        np.concatenate([i for i, _ in parts]),
        np.concatenate([lab.prediction for _, lab in parts]),
        np.concatenate([lab.spread for _, lab in parts]),  # type: ignore[misc]
    )


def _served_nothing(server: TeacherServer) -> None:
    """Independent evidence that no call reached the teacher service of ``server``."""
    assert server.active_streams == 0
    assert server.teacher.forward_windows == 0
    for source in ("teacher", "cache"):
        assert server.metrics.value("stkd_serve_windows_total", source=source) == 0
    assert server.metrics.value("stkd_serve_forward_windows_total") == 0


@pytest.mark.integration
def test_generated_tls_serves_the_plaintext_labels(
    server_factory, teacher_env, run_pki: RunPki
) -> None:
    sec = run_pki.security
    plain = server_factory()
    secure = server_factory(tls=run_pki.ip_cert.server_tls(), token=sec.token)
    fp = teacher_env.fingerprint
    with SoftLabelClient([plain.address], expected_fingerprint=fp) as c:
        expected = _labels(c)
    options = ClientOptions(tls_ca_pem=sec.ca_pem, token=sec.token, backoff=FAST_FAIL)
    with SoftLabelClient(
        [f"127.0.0.1:{secure.port}"], expected_fingerprint=fp, options=options
    ) as c:
        assert c.describe().teacher_version == teacher_env.version
        got = _labels(c)
        assert c.stats.endpoints == {f"127.0.0.1:{secure.port}"}
    assert got[0].tolist() == WINDOWS
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)
    # the secure server computed them itself
    assert secure.metrics.value("stkd_serve_windows_total", source="teacher") == len(WINDOWS)


@pytest.mark.integration
@pytest.mark.parametrize("trust", ["plaintext", "other CA"])
def test_clients_without_the_run_ca_fail_the_handshake(
    server_factory, teacher_env, run_pki: RunPki, trust: str, caplog
) -> None:
    secure = server_factory(tls=run_pki.ip_cert.server_tls(), token=run_pki.security.token)
    ca_pem = None if trust == "plaintext" else run_pki.other_ca_pem
    # the client rejects a certificate of another CA; the server ends a plaintext client's
    # connection in the handshake
    reason = CLOSED_BY_SERVER if trust == "plaintext" else UNTRUSTED
    # a wrong token on purpose: a call that got past TLS would be answered UNAUTHENTICATED, so
    # UNAVAILABLE proves the connection was refused before any call reached the server
    options = ClientOptions(tls_ca_pem=ca_pem, token="not-the-token", backoff=FAST_FAIL)
    fp = teacher_env.fingerprint
    capture_client_log(caplog)
    with SoftLabelClient([secure.address], expected_fingerprint=fp, options=options) as c:
        with pytest.raises(TeacherUnavailableError) as info:
            c.describe()
        assert_client_refused(info.value, reason)
        caplog.clear()
        with pytest.raises(TeacherUnavailableError, match="after 2 attempts"):
            list(c.stream("train", WINDOWS))
        assert_streams_refused(caplog, FAST_FAIL.max_attempts, reason)
        assert c.stats.chunks == 0
    _served_nothing(secure)


@pytest.mark.integration
def test_a_wrong_token_over_tls_is_unauthenticated(
    server_factory, teacher_env, run_pki: RunPki
) -> None:
    secure = server_factory(tls=run_pki.ip_cert.server_tls(), token=run_pki.security.token)
    options = ClientOptions(
        tls_ca_pem=run_pki.security.ca_pem, token=generate_token(), backoff=FAST_FAIL
    )
    fp = teacher_env.fingerprint
    with SoftLabelClient([secure.address], expected_fingerprint=fp, options=options) as c:
        with pytest.raises(TeacherRequestError) as info:
            list(c.stream("train", WINDOWS))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details == "invalid token"
        with pytest.raises(TeacherRequestError) as info:
            c.describe()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    _served_nothing(secure)


@pytest.mark.integration
def test_a_certificate_for_a_dns_name_reached_by_ip(
    server_factory, teacher_env, run_pki: RunPki
) -> None:
    sec = run_pki.security
    secure = server_factory(tls=run_pki.dns_cert.server_tls(), token=sec.token)
    address = f"127.0.0.1:{secure.port}"
    creds = grpc.ssl_channel_credentials(root_certificates=sec.ca_pem)
    override = [("grpc.ssl_target_name_override", DNS_NAME)]
    with grpc.secure_channel(address, creds, options=override) as ch:
        info = pb_grpc.TeacherServiceStub(ch).Describe(
            pb.DescribeRequest(), timeout=10, metadata=bearer(sec.token)
        )
    assert info.teacher_version == teacher_env.version
    assert info.dataset_fingerprint == teacher_env.fingerprint
    # without the override the certificate (for DNS_NAME only) does not cover the IP
    with grpc.secure_channel(address, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.TeacherServiceStub(ch).Describe(
                pb.DescribeRequest(), timeout=10, metadata=bearer(sec.token)
            )
        code, details = err.value.code(), err.value.details()  # type: ignore[attr-defined]
        assert_rpc_refused(code, details, WRONG_NAME)


@pytest.mark.integration
def test_the_client_checks_a_dns_certificate_by_the_dns_endpoint_name(
    server_factory, teacher_env
) -> None:
    """``dns:///name:port`` endpoints: the client connects to the resolved IP and checks the
    certificate against ``name`` (the public path to ``Endpoint.tls_name``)."""
    try:
        resolved = {a[4][0] for a in socket.getaddrinfo("localhost", None, socket.AF_INET)}
    except socket.gaierror:
        pytest.skip("localhost does not resolve here")
    if "127.0.0.1" not in resolved:
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    security, ca = new_run_security()
    secure = server_factory(tls=ca.issue(["localhost"]).server_tls(), token=security.token)
    options = ClientOptions(tls_ca_pem=security.ca_pem, token=security.token)
    fp = teacher_env.fingerprint
    with SoftLabelClient(
        f"dns:///localhost:{secure.port}", expected_fingerprint=fp, options=options
    ) as c:
        assert _labels(c)[0].tolist() == WINDOWS
        assert "127.0.0.1:" + str(secure.port) in c.stats.endpoints
