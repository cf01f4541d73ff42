"""Mutual TLS between nodes, keyed by the cluster secret alone.

Every node derives the same cluster CA key from the secret and the cluster name (HKDF, then a
P-256 scalar), so copying the secret file stays the whole set-up: no certificate files. At
start a node makes a fresh key pair and a certificate for it signed by that CA; peers accept
only certificates that chain to the CA, so a node without the secret can neither be admitted
nor read or alter a byte (TLS 1.3 records are authenticated encryption). The HMAC admission
and per-call signatures of `auth` stay as a second, independent check.

Each node builds the CA certificate itself. ECDSA signatures are randomized, so the bytes of
two nodes' CA certificates differ, but chain checks match the issuer by name and verify with
the CA's public key, which every node derives identically.

Rotation: a node may hold several secrets at once, its own first. It accepts certificates
from any of their CAs, and presents a certificate from its own with, for each other secret,
its own CA's key certified by that secret's CA (a cross-certificate): a node that still
holds only the old secret follows that chain to the old CA and accepts it, one that holds
the new one finds the new CA directly.
"""

from __future__ import annotations

import datetime
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# The name every node certificate carries and every client expects (peers are reached by
# IP address, which says nothing a certificate could vouch for; the chain is what counts).
TLS_SERVER_NAME = "exo-tools-node"
CHANNEL_TLS_OPTIONS: list[tuple[str, str]] = [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]

# Fixed validity: far in the past so machines with skewed clocks agree, far in the future so
# nothing expires under a running cluster (revocation is rotating the secret).
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)
_CURVE_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)

# TLS errors gRPC reports when a peer's certificate is not from our secret (or ours not from
# its); matched in a failed call's details to name the likely cause.
_HANDSHAKE_MARKERS = (
    "CERTIFICATE_VERIFY_FAILED",
    "certificate verify failed",
    "UNKNOWN_CA",
    "unknown ca",
    "BAD_CERTIFICATE",
    "bad certificate",
    "Ssl handshake failed",
    "handshake failed",
    "tls: ",
)


def is_handshake_failure(details: str | None) -> bool:
    """Whether a failed call's details describe a refused TLS handshake."""
    return bool(details) and any(marker in (details or "") for marker in _HANDSHAKE_MARKERS)


def _ca_key(secret: bytes, cluster_name: str) -> ec.EllipticCurvePrivateKey:
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=48,  # 384 bits reduced mod a 256-bit order: negligible bias
        salt=b"exo-tools/cluster-ca/v1",
        info=cluster_name.encode(),
    ).derive(secret)
    scalar = int.from_bytes(material, "big") % (_CURVE_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _ca_name(secret: bytes, cluster_name: str) -> x509.Name:
    # The name carries a fingerprint of the secret so two secrets' CAs never share a name
    # (chain building looks issuers up by name before it checks signatures).
    tag = hashlib.sha256(b"exo-tools/ca-name/v1" + secret).hexdigest()[:16]
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "exo-tools"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cluster {cluster_name} CA {tag}"),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    name: x509.Name
    cert_pem: bytes


def _authority(secret: bytes, cluster_name: str) -> _Authority:
    key = _ca_key(secret, cluster_name)
    name = _ca_name(secret, cluster_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(int.from_bytes(hashlib.sha256(name.public_bytes()).digest()[:16], "big"))
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(key=key, name=name, cert_pem=_pem(cert))


def _cross_certificate(subject: _Authority, issuer: _Authority) -> bytes:
    """`subject`'s CA key, certified by `issuer`'s CA."""
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject.name)
        .issuer_name(issuer.name)
        .public_key(subject.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(subject.key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return _pem(cert)


def _node_identity(authority: _Authority, node_id: str) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM) of a fresh node key signed by the cluster CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(authority.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), False
        )
        .sign(authority.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, _pem(cert)


class ClusterTLS:
    """This node's TLS identity and trust, both derived from the secret(s) it trusts."""

    def __init__(self, node_id: str, secrets: Sequence[bytes], cluster_name: str) -> None:
        self.node_id = node_id
        self.cluster_name = cluster_name
        self._lock = threading.Lock()
        self._generation = 0
        self._set(secrets)

    def _set(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("no cluster secret to derive TLS from")
        authorities = [_authority(secret, self.cluster_name) for secret in secrets]
        key_pem, cert_pem = _node_identity(authorities[0], self.node_id)
        chain = cert_pem + b"".join(
            _cross_certificate(authorities[0], other) for other in authorities[1:]
        )
        with self._lock:
            self._key_pem = key_pem
            self._cert_pem = chain
            self._roots_pem = b"".join(authority.cert_pem for authority in authorities)
            self._generation += 1

    def trust(self, secrets: Sequence[bytes]) -> None:
        """Present a certificate from `secrets[0]`, accept peers on any of them. Applies to
        handshakes from now on; connections already up stay up."""
        self._set(secrets)

    @property
    def generation(self) -> int:
        """Bumped on every `trust` call, so channel owners know to rebuild their channels."""
        return self._generation

    def channel_credentials(self) -> grpc.ChannelCredentials:
        with self._lock:
            return grpc.ssl_channel_credentials(
                root_certificates=self._roots_pem,
                private_key=self._key_pem,
                certificate_chain=self._cert_pem,
            )

    def _certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            return grpc.ssl_server_certificate_configuration(
                [(self._key_pem, self._cert_pem)], root_certificates=self._roots_pem
            )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate from the cluster CA and re-read this
        object's trust at every new handshake (so rotation needs no server restart)."""
        served = [0]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each handshake; None keeps the current configuration.
            if served[0] == self._generation:
                return None
            served[0] = self._generation
            return self._certificate_configuration()

        served[0] = self._generation
        # gRPC's stub types the fetcher as never returning None; its docs say None keeps.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._certificate_configuration(), fetcher, require_client_authentication=True
        )


def bind_port(
    server: grpc.Server | grpc.aio.Server, host: str, port: int, tls: ClusterTLS | None, what: str
) -> int:
    """Bind `server` (the control server or the data plane's) to host:port, under the
    cluster's mutual TLS unless it is off; the port bound (OSError naming `what` if none)."""
    address = f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind {what} to {address}")
    return bound
