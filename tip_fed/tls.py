"""Local certificate authority, TLS certificates and node keys for loopback and LAN deployments.

Private keys are written with owner-only permissions (0600) and never logged. Certificates carry
``subjectAltName`` entries for the hosts they serve (``127.0.0.1`` and ``localhost`` by default),
which both grpcio and Flower's HTTPS links require.

A seller's certificate can also carry its **seller id** (:func:`seller_name`, as a DNS name in
its ``subjectAltName``). A buyer that dials a seller with that name as the TLS target name (see
``ClientTLS(bind_seller_id=True)``) then knows from the handshake itself that the peer holds a
key the CA certified for that seller id: a seller cannot answer for another.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tip_fed.errors import ConfigError
from tip_fed.files import write_private

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
VALID_DAYS = 365
_DNS_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


@dataclass(frozen=True)
class CertPaths:
    """A certificate and its private key on disk (PEM)."""

    cert: Path
    key: Path


def read_tls_file(path: str | Path, what: str = "TLS") -> bytes:
    """A certificate or key file's bytes; a ConfigError naming ``what`` (a flag, say) and the file if unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what} file {path}: {exc.strerror}; create files with 'tip-fed tls init DIR'"
        ) from exc


def seller_name(seller_id: str) -> str:
    """The DNS name that stands for ``seller_id`` in certificates and as the buyer's TLS target name.

    A seller id that is already a lowercase DNS name (``digits-4``, ``hospital-07``) is used as it
    is; any other id maps to ``id-<sha256 of the id>`` so that ids differing only in case or in
    characters DNS does not allow never share a name.
    """
    if not seller_id:
        raise ConfigError("a seller id must not be empty")
    if len(seller_id) <= 253 and _DNS_NAME.fullmatch(seller_id):
        return seller_id
    return "id-" + hashlib.sha256(seller_id.encode()).hexdigest()[:60]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tip_fed"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def create_ca(directory: str | Path, name: str = "tip_fed local CA") -> CertPaths:
    """Create a self-signed CA (``ca.crt``, ``ca.key``) in ``directory``."""
    d = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    paths = CertPaths(d / "ca.crt", d / "ca.key")
    d.mkdir(parents=True, exist_ok=True)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths.key, _key_pem(key))
    return paths


def issue_cert(
    ca: CertPaths,
    directory: str | Path,
    name: str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    client: bool = False,
    seller_id: str | None = None,
) -> CertPaths:
    """Issue ``<name>.crt``/``<name>.key`` signed by ``ca`` for server (default) or client use.

    With ``seller_id`` the server certificate also names that seller: ``DNS:seller_name(seller_id)``
    among its subject alternative names, the name the buyer verifies.
    """
    if client and seller_id is not None:
        raise ConfigError("a seller id belongs in a seller's server certificate, not in a client certificate")
    if not name or "/" in name:
        raise ConfigError(f"certificate name {name!r} must be a plain file name")
    try:
        ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA at {ca.cert} / {ca.key}: {exc}; create one with create_ca()") from exc
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if not client:
        names = [*hosts, seller_name(seller_id)] if seller_id is not None else list(hosts)
        builder = builder.add_extension(_san(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    d = Path(directory)
    paths = CertPaths(d / f"{name}.crt", d / f"{name}.key")
    d.mkdir(parents=True, exist_ok=True)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(paths.key, _key_pem(key))
    return paths


def create_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """EC P-384 key pair in OpenSSH format (``name`` and ``name.pub``), as Flower SuperNode auth expects."""
    d = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = d / name, d / f"{name}.pub"
    write_private(priv_path, private)
    pub_path.write_bytes(public + b"\n")
    return priv_path, pub_path
