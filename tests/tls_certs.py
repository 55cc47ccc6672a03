"""Certificates for the TLS tests, made on the spot: a CA, certificates it signs, and the ones it must refuse.

Everything a TLS check can meet: a server certificate for 127.0.0.1 signed by the trusted CA, a
client certificate for mutual TLS (its key also encrypted), a server certificate signed by a CA the
client does not trust, one for another host name, and one that has expired. EC P-256 keys: made in
milliseconds, and accepted by every OpenSSL librdkafka is built with.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_PASSWORD = "client-key-passphrase"
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA clients are told to trust
    server: Pair  # 127.0.0.1 and localhost, signed by ``ca``
    client: Pair  # mutual TLS: signed by ``ca``
    client_encrypted_key: Path  # the client key, encrypted with KEY_PASSWORD
    other_ca: Path  # a CA nobody was told to trust
    untrusted_server: Pair  # 127.0.0.1, signed by ``other_ca``
    untrusted_client: Pair  # signed by ``other_ca``
    wrong_host_server: Pair  # signed by ``ca``, for broker.example.com only
    expired_server: Pair  # signed by ``ca``, 127.0.0.1, expired yesterday


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class _Authority:
    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, directory: Path, stem: str, hosts: list[str], client: bool = False, expired: bool = False
    ) -> tuple[Pair, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pair = Pair(_write_cert(directory / f"{stem}.crt", cert), _write_key(directory / f"{stem}.key", key))
        return pair, key


def make_pki(directory: Path) -> Pki:
    """Write every certificate and key into ``directory`` (PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    trusted, other = _Authority("filter-worker test CA"), _Authority("someone else's CA")
    loopback = ["127.0.0.1", "localhost"]
    client, client_key = trusted.issue(directory, "client", [], client=True)
    return Pki(
        ca=_write_cert(directory / "ca.crt", trusted.cert),
        server=trusted.issue(directory, "server", loopback)[0],
        client=client,
        client_encrypted_key=_write_key(directory / "client-encrypted.key", client_key, KEY_PASSWORD),
        other_ca=_write_cert(directory / "other-ca.crt", other.cert),
        untrusted_server=other.issue(directory, "untrusted-server", loopback)[0],
        untrusted_client=other.issue(directory, "untrusted-client", [], client=True)[0],
        wrong_host_server=trusted.issue(directory, "wrong-host-server", ["broker.example.com"])[0],
        expired_server=trusted.issue(directory, "expired-server", loopback, expired=True)[0],
    )
