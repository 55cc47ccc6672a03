"""Start-up checks of the TLS files a Kafka client will load: caught here, a mistake is one sentence.

librdkafka reads these files only when it builds a client, and a CA bundle that parses but is the
wrong one shows only later, as a failed handshake. What can be known from the files alone is checked
here with Python's own OpenSSL binding: each file exists and holds what it should, the key opens
with its password, and it belongs to the certificate. The private key's path and content never
appear in a message (the path says where a secret lies); the CA's and the certificate's do, since
operators need them to find the wrong file.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

_KEY = "FILTER_KAFKA__SSL_KEY_LOCATION"
_PASSWORD = "FILTER_KAFKA__SSL_KEY_PASSWORD"


def _context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def certificates_problem(path: Path) -> str | None:
    """Why ``path`` is not a PEM file of certificates (a CA bundle, or a client certificate), or None."""
    try:
        _context().load_verify_locations(cafile=str(path))
    except OSError as exc:  # ssl.SSLError is an OSError too, with a reason
        reason = getattr(exc, "reason", None)
        if reason is not None:
            return f"{path} holds no PEM certificate ({reason})"
        return f"{path} cannot be read ({exc.strerror})"
    return None


def key_problem(certificate: Path, key: Path, password: str | None) -> str | None:
    """Why the private key ``key`` cannot serve ``certificate`` (which parses), or None.

    The password is handed over as a callable: with ``None`` OpenSSL would ask for one on the
    terminal when the key is encrypted.
    """
    try:
        _context().load_cert_chain(str(certificate), str(key), password=lambda: (password or "").encode())
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"{_KEY}: the private key does not belong to the certificate {certificate}"
        given = f"with {_PASSWORD}" if password else f"without a password ({_PASSWORD} is not set)"
        return f"{_KEY}: the file holds no PEM private key that opens {given}"
    except OSError as exc:
        return f"{_KEY}: the file cannot be read ({exc.strerror})"
    return None


def broker_certificate_problem(address: str, ca: Path | None, timeout_s: float = 5.0) -> str | None:
    """OpenSSL's reason the certificate at ``address`` (``host:port``) fails verification, or None.

    librdkafka reports every failure as "certificate verify failed"; the operator needs to know which
    one: an unknown CA, another host name, an expired certificate. A handshake of our own, with the
    same CA (or the system's store) and the same host name check, tells. None when it cannot (the
    broker went away, the address does not parse, the handshake fails for another reason).
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            context.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message)
    except (OSError, ValueError):
        return None
    return None
