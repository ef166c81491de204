"""Self-signed certificate for serving the emulator over HTTPS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl


def make_self_signed(directory: str, host: str = "127.0.0.1") -> tuple[str, str]:
    """Generate a self-signed certificate and key for ``host`` and ``localhost``.

    Parameters
    ----------
    directory
        Where ``cert.pem`` and ``key.pem`` are written (mode 0600 for the key).
    host
        IP address put in the certificate's subject alternative names.

    Returns
    -------
    tuple of str
        ``(cert_path, key_path)``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-amlcompute emulator")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address(host)),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def server_ssl_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """Return a server TLS context for the certificate.

    Parameters
    ----------
    cert_path, key_path
        PEM files from :func:`make_self_signed`.

    Returns
    -------
    ssl.SSLContext
        Context for tornado's ``HTTPServer``.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx
