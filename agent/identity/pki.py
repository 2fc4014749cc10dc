"""Keys, CSRs and certificates: the few X.509 operations both sides need, on `cryptography`.

Private keys are ECDSA P-256 (see DESIGN.md, Decisions). Nothing here touches the disk or the
network; `store.py` and `client.py` do.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from agent.errors import MeshagentError
from agent.identity.certinfo import CertSummary

PrivateKey = ec.EllipticCurvePrivateKey


class PkiError(MeshagentError):
    code = "invalid_certificate"


def generate_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"private key is not a readable unencrypted PEM key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PkiError("private key is not ECDSA P-256", "only P-256 keys are supported")
    return key


def make_csr(key: PrivateKey, common_name: str = "meshagent") -> bytes:
    """A CSR (PEM) signed by `key`. Its names are advisory: the authority decides the real ones."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_certs(data: bytes) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order; an empty or unreadable blob is an error."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate list: {exc}") from None
    if not certs:
        raise PkiError("no certificate found in PEM data")
    return certs


def certs_to_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def spki_pin(cert: x509.Certificate) -> str:
    """`sha256:<hex>` of the SubjectPublicKeyInfo, as `kubeadm join` pins its CA."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    pub = cert.public_key()
    return (
        isinstance(pub, ec.EllipticCurvePublicKey)
        and pub.public_numbers() == key.public_key().public_numbers()
    )


def summarize(cert: x509.Certificate) -> CertSummary:
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        assert isinstance(san, x509.SubjectAlternativeName)
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return CertSummary(
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        spiffe_ids=uris,
        dns_names=dns,
        issuer=cert.issuer.rfc4514_string(),
    )


# --- proof of possession ---------------------------------------------------------------------
# A renewal is signed by the *current* key over the new CSR and a timestamp. The certificate it
# yields binds the new CSR's key, which only the host holds; a replay could still supersede the
# host's record and token, so the authority answers each request once (storage.renew).


def possession_message(csr_pem: bytes, timestamp: int) -> bytes:
    return b"meshagent-renew-v1\n" + str(timestamp).encode() + b"\n" + hashlib.sha256(csr_pem).digest()


def sign_message(key: PrivateKey, message: bytes) -> str:
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def verify_message(cert: x509.Certificate, message: bytes, signature: str) -> bool:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        return False
    try:
        pub.verify(base64.b64decode(signature), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_possession(key: PrivateKey, csr_pem: bytes, timestamp: int) -> str:
    return sign_message(key, possession_message(csr_pem, timestamp))


def verify_possession(cert: x509.Certificate, csr_pem: bytes, timestamp: int, signature: str) -> bool:
    return verify_message(cert, possession_message(csr_pem, timestamp), signature)
