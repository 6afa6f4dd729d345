"""The management node's small certificate authority and the TLS contexts of the agent wire.

Every hop between the management node and host agents is mutual TLS under one CA that the node
makes on its first start (``<data dir>/pki``): the node calls agents, agents push events to the
node, and an agent copies files from another agent. A certificate says who holds it:

* organisational unit ``node`` or ``agent`` (the role: an agent obeys commands only from ``node``);
* common name: for an agent, the address the node reaches it at (``host:port`` of its URL), which
  binds it to that host: the node accepts an event about a host only from that host's agent;
* subject alternative names: the agent's address (IP or DNS name), so a client checks, as TLS does,
  that the server it reached is the one it meant.

A credentials bundle is one PEM file: the private key, the certificate, the CA's certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NODE = "node"
AGENT = "agent"
# the name in the node's certificate that agents check, whatever address they reach it at
NODE_NAME = "nimbostack-node"
ORG = "nimbostack"
LEAF_DAYS = 365
CA_DAYS = 3650


class CredentialsError(Exception):
    """A bundle that is missing, unreadable or not signed as it must be."""


@dataclass(frozen=True)
class Peer:
    role: str
    name: str


def _name(role: str, common: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, common),
    ])


def _alt_names(addresses: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for a in dict.fromkeys(a for a in addresses if a):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(a)))
        except ValueError:
            out.append(x509.DNSName(a))
    return out


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner may read, atomically: a reader sees the old bundle or the new."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Authority:
    """The CA in ``directory`` (made there on first use; its key is 0600 in a 0700 directory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        key_file, cert_file = directory / "ca.key", directory / "ca.crt"
        if key_file.exists() and cert_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            self.cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                              x509.NameAttribute(NameOID.COMMON_NAME, f"{ORG} CA {os.urandom(4).hex()}")])
            now = datetime.datetime.now(datetime.UTC)
            self.cert = (
                x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(self._key, hashes.SHA256())
            )
            write_private(key_file, _pem_key(self._key))
            write_private(cert_file, self.cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, role: str, common: str, addresses: list[str], days: int = LEAF_DAYS) -> bytes:
        """A new key and certificate for ``role``/``common``, as a credentials bundle."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(role, common)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        alt = _alt_names(addresses)
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return _pem_key(key) + cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem

    def node_credentials(self, addresses: list[str]) -> Credentials:
        """The node's own bundle (``node.pem``), made again when it lacks an address it now serves."""
        wanted = [NODE_NAME, "127.0.0.1", *addresses]
        return _bundle(self, self.directory / "node.pem", Peer(NODE, NODE_NAME), wanted)


def agent_bundle(authority: Authority, path: Path, name: str, addresses: list[str]) -> Credentials:
    """The agent bundle at ``path``, issued (again) unless it is this CA's for agent ``name``."""
    return _bundle(authority, path, Peer(AGENT, name), addresses)


def _bundle(authority: Authority, path: Path, peer: Peer, addresses: list[str]) -> Credentials:
    """The bundle at ``path`` if this CA issued it to ``peer`` for ``addresses``; else a new one."""
    try:
        creds = Credentials(path)
        if creds.ca_pem == authority.ca_pem and creds.peer == peer and creds.covers(addresses):
            return creds
    except CredentialsError:
        pass
    write_private(path, authority.issue(peer.role, peer.name, addresses))
    return Credentials(path)


def agent_name(url: str) -> str:
    """The common name of the agent reached at ``url``: its ``host:port``."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


class Credentials:
    """A bundle on disk and the TLS contexts made from it. ``reload`` after the file changed: the
    contexts are the same objects, so a server that holds them hands new connections the new
    certificate."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        self._parse()

    def _parse(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise CredentialsError(f"cannot read {self.path}: {err}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
            serialization.load_pem_private_key(data, None)
        except ValueError as err:
            raise CredentialsError(f"{self.path} is not a credentials bundle: {err}") from None
        cas = [c for c in certs if _is_ca(c)]
        leaves = [c for c in certs if not _is_ca(c)]
        if len(cas) != 1 or len(leaves) != 1:
            raise CredentialsError(f"{self.path}: expected one certificate and the CA's, found {len(certs)}")
        self.cert, self.ca = leaves[0], cas[0]
        if self.cert.issuer != self.ca.subject:
            raise CredentialsError(f"{self.path}: the certificate is not signed by the bundle's CA")
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)

    @property
    def peer(self) -> Peer:
        return Peer(_attr(self.cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
                    _attr(self.cert.subject, NameOID.COMMON_NAME))

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    def covers(self, addresses: list[str]) -> bool:
        try:
            alt = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return not addresses
        have = set(alt.get_values_for_type(x509.DNSName)) | {str(i) for i in alt.get_values_for_type(x509.IPAddress)}
        return all(a in have for a in addresses if a)

    def _load(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.path))
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Asks every client for a certificate of this CA. One signed by another CA (or forged)
        ends the handshake; a client with none gets its connection, so that the server can answer
        it 401 and say what it lacks — it reaches nothing else (``peer_of`` is None)."""
        if self._server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.verify_mode = ssl.CERT_OPTIONAL
            self._server = self._load(ctx)
        return self._server

    def client_context(self) -> ssl.SSLContext:
        """Trusts this CA only and checks the server's name (an agent's address, or NODE_NAME)."""
        if self._client is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
            self._client = self._load(ctx)
        return self._client

    def reload(self) -> None:
        self._parse()
        for ctx in (self._server, self._client):
            if ctx is not None:
                ctx.load_cert_chain(str(self.path))
                ctx.load_verify_locations(cadata=self.ca_pem.decode())


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def peer_of(peercert: dict[str, object] | None) -> Peer | None:
    """Who is at the other end, from ``SSLSocket.getpeercert()`` (already verified against the CA)."""
    if not peercert:
        return None
    fields: dict[str, str] = {}
    for rdn in peercert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            fields.setdefault(key, value)
    if fields.get("organizationName") != ORG:
        return None
    return Peer(fields.get("organizationalUnitName", ""), fields.get("commonName", ""))
