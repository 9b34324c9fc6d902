"""The main host's private CA and the trunk's server certificate (through `cryptography`).

The CA exists only to sign the trunk certificate; remote hosts pin its SHA-256 fingerprint, which
travels in the join token, so no public CA and no DNS name are needed.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.cli import CliError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
TRUNK_CERT = "trunk.pem"
TRUNK_KEY = "trunk.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "branchpbx"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create(data: Path, public_address: str, *, years: int = 20) -> bytes:
    """Create the CA and the trunk certificate in `data`; return the CA's SHA-256 fingerprint."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("branchpbx main host CA"))
        .issuer_name(_name("branchpbx main host CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * years))
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
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("branchpbx-mainhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(public_address)))
    except ValueError:
        names.append(x509.DNSName(public_address))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("branchpbx-mainhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * years))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(data / CA_KEY, _key_pem(ca_key))
    _write_private(data / TRUNK_KEY, _key_pem(key))
    (data / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (data / TRUNK_CERT).write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return fingerprint(ca_der(data))


def ca_der(data: Path) -> bytes:
    """The CA certificate (DER); CliError naming the file if it is missing or damaged."""
    path = data / CA_CERT
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read the CA certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise CliError(f"the CA certificate {path} is damaged (not a PEM certificate)") from None
    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()
