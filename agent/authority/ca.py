"""The authority's key material on disk: trust anchor(s), the issuer, and the API's own CA.

Two separate chains, on purpose:
- the *mesh* chain (trust anchor -> issuer -> host leaves) is what in-cluster proxies trust;
  the issuer may be adopted from an existing mesh (Linkerd's issuer is made this way);
- the *API* chain (api-ca -> api serving cert) only proves "this is the authority" to enrolling
  hosts, which pin api-ca's public key from their join token (as `kubeadm join` does). Keeping it
  apart means the API's certificate is never a mesh identity.

Layout of the authority directory:
    authority.json       settings (trust domain, mesh, certificate lifetimes)
    trust-bundle.pem     the trust anchor(s) hosts must trust; several during anchor rotation
    issuer.crt issuer.key
    api-ca.crt api-ca.key api.crt api.key
    registry.db          tokens and hosts (see storage.py)
    prometheus-token     bearer token for the target list (see discovery.py; made by `authority init`)
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError, MeshagentError
from agent.fsutil import ensure_private_dir, write_atomic
from agent.identity.certinfo import utcnow
from agent.identity.names import (
    DEFAULT_MESH,
    InvalidName,
    validate_host_name,
    validate_mesh,
    validate_trust_domain,
)
from agent.identity.pki import certs_to_pem, generate_key, key_to_pem, load_certs

IssuerKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

DEFAULT_CERT_LIFETIME = timedelta(hours=24)
DEFAULT_MAX_LIFETIME = timedelta(days=7)


class AuthorityDirError(MeshagentError):
    code = "authority_dir_invalid"


@dataclass(frozen=True)
class AuthoritySettings:
    trust_domain: str
    mesh: str = DEFAULT_MESH
    cert_lifetime_s: int = int(DEFAULT_CERT_LIFETIME.total_seconds())
    max_lifetime_s: int = int(DEFAULT_MAX_LIFETIME.total_seconds())

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_mesh(self.mesh)
        if self.cert_lifetime_s < 30:
            raise ConfigError(
                f"certificate lifetime {self.cert_lifetime_s}s is too short",
                "use at least 30s (24h is the default)",
            )
        if self.cert_lifetime_s > self.max_lifetime_s:
            raise ConfigError(
                f"certificate lifetime {self.cert_lifetime_s}s exceeds the maximum {self.max_lifetime_s}s",
                "lower --cert-lifetime or raise --max-lifetime",
            )


@dataclass(frozen=True)
class AuthorityMaterial:
    """Everything the authority signs and serves with, loaded once at start."""

    settings: AuthoritySettings
    trust_bundle: tuple[x509.Certificate, ...]
    issuer_cert: x509.Certificate
    issuer_key: IssuerKey
    api_ca_cert: x509.Certificate
    directory: Path

    @property
    def api_cert_file(self) -> Path:
        return self.directory / "api.crt"

    @property
    def api_key_file(self) -> Path:
        return self.directory / "api.key"

    @property
    def trust_bundle_file(self) -> Path:
        return self.directory / "trust-bundle.pem"

    @property
    def chain_tail(self) -> list[x509.Certificate]:
        """What follows a leaf in the chain hosts present: the issuer (anchors are in the bundle)."""
        return [self.issuer_cert]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: IssuerKey | None,
    lifetime: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    now = utcnow()
    signer_key = issuer_key or key
    issuer_name = issuer_cert.subject if issuer_cert else _name(subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


def _serving_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[str],
) -> x509.Certificate:
    now = utcnow()
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return (
        x509.CertificateBuilder()
        .subject_name(_name("meshagent-authority"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def check_san(san: str) -> str:
    """An IP address or a DNS name (a leading `*.` allowed) for the API's certificate."""
    try:
        return str(ipaddress.ip_address(san))
    except ValueError:
        pass
    try:
        validate_host_name(san.removeprefix("*."))
    except InvalidName:
        raise InvalidName(
            f"--san {san[:80]!r} is neither an IP address nor a DNS name",
            "give a name or address hosts reach the authority at, e.g. --san authority.example.internal",
        ) from None
    return san


def default_sans() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    fqdn = socket.getfqdn()
    if fqdn not in names:
        names.append(fqdn)
    valid = []
    for name in names:  # this host's own names may not be DNS names (an underscore): leave them out
        try:
            valid.append(check_san(name))
        except InvalidName:
            continue
    return valid


def _load_issuer_key(data: bytes, source: str) -> IssuerKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthorityDirError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise AuthorityDirError(f"{source}: issuer key must be ECDSA or RSA")
    return key


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError all mean "no"
        return False
    return True


def _check_issuer(issuer: x509.Certificate, key: IssuerKey, anchors: list[x509.Certificate]) -> None:
    """The adopted issuer must be a CA, match its key, and be signed by one of the anchors."""
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise AuthorityDirError("the issuer certificate is not a CA (basicConstraints CA:TRUE missing)")
    if issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise AuthorityDirError("the issuer key does not match the issuer certificate")
    if any(_issued_by(issuer, anchor) for anchor in anchors):
        return
    raise AuthorityDirError(
        "the issuer certificate is not signed by any certificate in the trust anchor file",
        "pass the mesh's trust anchor (e.g. Linkerd's ca.crt) with --trust-anchor",
    )


def init_authority(
    directory: Path,
    settings: AuthoritySettings,
    sans: list[str],
    adopt: tuple[Path, Path, Path] | None = None,
    now: datetime | None = None,
) -> AuthorityMaterial:
    """Create the authority directory. `adopt` = (trust anchor, issuer cert, issuer key) files."""
    sans = [check_san(s) for s in sans]  # before anything is written
    if (directory / "authority.json").exists():
        raise AuthorityDirError(
            f"{directory} already holds an authority",
            "use another --dir, or remove the directory to start over (this invalidates all hosts)",
        )
    ensure_private_dir(directory)
    if adopt is None:
        anchor_key = generate_key()
        anchor = _ca_cert(f"root.{settings.trust_domain}", anchor_key, None, None, timedelta(days=3650), None)
        issuer_key: IssuerKey = generate_key()
        assert isinstance(issuer_key, ec.EllipticCurvePrivateKey)
        issuer = _ca_cert(
            f"identity.{settings.mesh}.{settings.trust_domain}",
            issuer_key,
            anchor,
            anchor_key,
            timedelta(days=365),
            0,
        )
        anchors = [anchor]
        # The anchor's key is not kept: only the issuer signs. A new anchor means a new init.
    else:
        anchor_file, issuer_file, key_file = adopt
        anchors = load_certs(anchor_file.read_bytes())
        issuer = load_certs(issuer_file.read_bytes())[0]
        issuer_key = _load_issuer_key(key_file.read_bytes(), str(key_file))
        _check_issuer(issuer, issuer_key, anchors)

    api_ca_key = generate_key()
    api_ca = _ca_cert("meshagent-authority-ca", api_ca_key, None, None, timedelta(days=3650), 0)
    api_key = generate_key()
    api_cert = _serving_cert(api_key, api_ca, api_ca_key, sans)

    write_atomic(directory / "trust-bundle.pem", certs_to_pem(anchors), 0o644)
    write_atomic(directory / "issuer.crt", certs_to_pem([issuer]), 0o644)
    write_atomic(directory / "issuer.key", _key_pem(issuer_key))
    write_atomic(directory / "api-ca.crt", certs_to_pem([api_ca]), 0o644)
    write_atomic(directory / "api-ca.key", key_to_pem(api_ca_key))
    write_atomic(directory / "api.crt", certs_to_pem([api_cert, api_ca]), 0o644)
    write_atomic(directory / "api.key", key_to_pem(api_key))
    # Written last: its presence marks a complete directory.
    write_atomic(directory / "authority.json", json.dumps(asdict(settings), indent=2).encode(), 0o644)
    return load_authority(directory)


def _key_pem(key: IssuerKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_settings(directory: Path) -> AuthoritySettings:
    path = directory / "authority.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AuthorityDirError(
            f"{directory} is not an authority directory (no authority.json)",
            f"create one with: meshagent authority init --dir {directory} --trust-domain cluster.local",
        ) from None
    except (OSError, ValueError) as exc:
        raise AuthorityDirError(f"{path}: unreadable ({exc})") from None
    return AuthoritySettings(**raw)


def load_authority(directory: Path) -> AuthorityMaterial:
    settings = load_settings(directory)
    try:
        bundle = tuple(load_certs((directory / "trust-bundle.pem").read_bytes()))
        issuer = load_certs((directory / "issuer.crt").read_bytes())[0]
        issuer_key = _load_issuer_key((directory / "issuer.key").read_bytes(), "issuer.key")
        api_ca = load_certs((directory / "api-ca.crt").read_bytes())[0]
    except OSError as exc:
        raise AuthorityDirError(f"{directory}: {exc.strerror}: {exc.filename}") from None
    return AuthorityMaterial(
        settings=settings,
        trust_bundle=bundle,
        issuer_cert=issuer,
        issuer_key=issuer_key,
        api_ca_cert=api_ca,
        directory=directory,
    )


class TrustBundleFile:
    """The trust bundle as served to hosts, re-read when the file changes.

    Anchor rotation is an edit of trust-bundle.pem (add the new root, later drop the old one);
    the running authority hands the new bundle out at the next enrollment or renewal.
    """

    def __init__(self, path: Path, initial: tuple[x509.Certificate, ...]) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._pem = certs_to_pem(initial)

    def pem(self) -> bytes:
        try:
            st = self._path.stat()
        except OSError:
            return self._pem  # keep serving the last good bundle
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._pem = certs_to_pem(load_certs(self._path.read_bytes()))
                self._stamp = stamp
            except (OSError, MeshagentError):
                pass  # a half-edited file: keep the last good bundle
        return self._pem
