"""Generated certificates: a private CA per run and server certificates for its teacher replicas.

A run that starts its own teacher replicas needs no user-supplied PKI to keep them private: the
driver creates a :class:`CertificateAuthority` and a bearer token (:func:`new_run_security`),
issues each replica a server certificate for the names/addresses it is reached by
(:meth:`CertificateAuthority.issue`), and hands the clients only a :class:`RunSecurity` (the
token and the CA certificate, as PEM bytes: see
:attr:`~stkd_dist.serving.client_options.ClientOptions.tls_ca_pem`).

The CA's private key stays in the driver's :class:`CertificateAuthority`: it is not exposed and
the object refuses to be pickled, so it cannot reach a Ray worker or a log by accident. Nothing is
written to disk; the certificates live as long as the run.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stkd_dist.errors import ConfigError
from stkd_dist.serving.auth import ServerTls

# certificates start this long before "now": a replica whose clock runs behind the driver's
# would otherwise reject (or be rejected with) a certificate that is "not yet valid"
CLOCK_SKEW = datetime.timedelta(minutes=5)
# X.509 caps a subject's common name at 64 characters (RFC 5280 ub-common-name)
_MAX_CN = 64


def generate_token() -> str:
    """A fresh bearer token: 32 random bytes, URL-safe base64 (safe in gRPC metadata)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedCert:
    """A server certificate and its private key, both PEM (the key unencrypted PKCS#8).

    ``key_pem`` is left out of the repr so that logging the object does not leak the key.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    def server_tls(self) -> ServerTls:
        """Server TLS settings presenting this certificate (no client certificates required)."""
        return ServerTls(self.cert_pem, self.key_pem)


@dataclass(frozen=True)
class RunSecurity:
    """What a run's clients need to reach its replicas: the bearer token and the CA certificate
    (PEM) the replicas' certificates are signed by. Safe to ship to workers; the token is left
    out of the repr so that logging the object does not leak it."""

    token: str = field(repr=False)
    ca_pem: bytes

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigError("the token must not be empty", where="token")
        if b"-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ConfigError("expected a PEM certificate", where="ca_pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"must be a whole number of days >= 1, got {days!r}", where="days")


def _general_name(name: str) -> x509.GeneralName:
    """An IPAddress entry for a literal address (gRPC checks IP targets against those only), else
    a DNSName entry."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not name.isascii() or any(c.isspace() for c in name):
        # TLS matches ASCII (IDNA A-label) host names only: a certificate naming anything else
        # would be issued fine and then fail every handshake
        raise ConfigError(f"not a host name or IP address: {name!r}", where="names")
    return x509.DNSName(name)


class CertificateAuthority:
    """A run's private CA: an ECDSA P-256 key and a self-signed CA certificate.

    Make one with :meth:`create`. The private key never leaves the object: there is no accessor,
    and pickling raises :class:`TypeError` (ship :attr:`cert_pem` or a :class:`RunSecurity`
    instead).
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self._cert = cert
        self._key = key
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        # issued certificates name the CA key they were signed by (AuthorityKeyIdentifier), so a
        # verifier picks the right CA even when it trusts several
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    @classmethod
    def create(cls, common_name: str = "stkd run CA", days: int = 30) -> CertificateAuthority:
        """A new CA valid from a few minutes ago (:data:`CLOCK_SKEW`) for ``days`` days.

        Raises:
            ConfigError: an empty or over-long ``common_name``, or ``days`` < 1.
        """
        if not common_name or len(common_name) > _MAX_CN:
            raise ConfigError(
                f"must be 1 to {_MAX_CN} characters, got {common_name!r}", where="common_name"
            )
        _check_days(days)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            # path_length=0: this CA signs server certificates only, never another CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate (PEM): what clients trust."""
        return self._cert_pem

    def issue(self, names: Sequence[str], days: int = 30) -> IssuedCert:
        """A server certificate for ``names`` (host names and/or IP addresses) and a new key.

        Valid from a few minutes ago for ``days`` days, but never past the CA's own expiry: a
        certificate outliving its issuer would fail verification from then on anyway, and a
        shorter stated lifetime does not mislead.

        Raises:
            ConfigError: no names, a name that is neither a host name nor an IP address, or
                ``days`` < 1.
        """
        # a bare string is a Sequence[str] too: issuing for its single characters is never meant
        if isinstance(names, str | bytes) or not names:
            raise ConfigError("give a non-empty list of host names or IP addresses", "names")
        if any(not isinstance(n, str) or not n for n in names):
            raise ConfigError(f"every name must be a non-empty string, got {names!r}", "names")
        _check_days(days)
        san = list(dict.fromkeys(_general_name(n) for n in names))  # duplicates dropped
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(days=days), self._cert.not_valid_after_utc)
        # the subject name is informational (TLS checks the SAN); CNs are capped at 64 chars
        cn = names[0] if len(names[0]) <= _MAX_CN else "stkd teacher"
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,  # ECDHE-ECDSA handshakes sign with the server key
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def __reduce__(self) -> NoReturn:
        # pickle, copy and Ray's cloudpickle all go through here: refusing keeps the CA key on
        # the driver instead of in an object store, a task's arguments or a checkpoint
        raise TypeError(
            "a CertificateAuthority holds the run's CA private key and is not picklable; "
            "send its cert_pem (or a RunSecurity) to workers, and issue certificates on the driver"
        )

    def __repr__(self) -> str:
        subject = self._cert.subject.rfc4514_string()
        return f"CertificateAuthority({subject}, until {self._cert.not_valid_after_utc:%Y-%m-%d})"


def new_run_security(
    common_name: str = "stkd run CA", days: int = 30
) -> tuple[RunSecurity, CertificateAuthority]:
    """A fresh token and CA for a run: the :class:`RunSecurity` for clients, and the CA (keep it
    on the driver) to issue the replicas' certificates with."""
    ca = CertificateAuthority.create(common_name, days)
    return RunSecurity(token=generate_token(), ca_pem=ca.cert_pem), ca
