"""Issue host certificates: the authority, not the CSR, decides every name and extension."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import RejectedError
from agent.identity.names import WorkloadIdentity

from .ca import AuthorityMaterial

# Hosts' clocks may lag the authority's a little: backdate so a fresh cert is valid at once.
BACKDATE = timedelta(seconds=60)


def parse_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """A CSR whose signature verifies and whose key is ECDSA P-256, or a refusal saying why."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError:
        raise RejectedError("the CSR is not a PEM certificate request", code="invalid_csr") from None
    if not csr.is_signature_valid:
        raise RejectedError(
            "the CSR's signature does not verify: it was altered or signed by another key",
            code="invalid_csr",
        )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise RejectedError("the CSR's key must be ECDSA P-256", code="unsupported_key")
    return csr


def public_key_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issue_leaf(
    material: AuthorityMaterial,
    identity: WorkloadIdentity,
    csr: x509.CertificateSigningRequest,
    now: datetime,
    lifetime: timedelta | None = None,
) -> x509.Certificate:
    """Sign `csr`'s key for `identity`; lifetime is capped by the maximum and the issuer's expiry."""
    settings = material.settings
    wanted = lifetime or timedelta(seconds=settings.cert_lifetime_s)
    not_after = min(
        now + min(wanted, timedelta(seconds=settings.max_lifetime_s)),
        material.issuer_cert.not_valid_after_utc,
    )
    issuer_pub = material.issuer_key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.dns_name)]))
        .issuer_name(material.issuer_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(identity.dns_name),
                    x509.UniformResourceIdentifier(identity.spiffe_id),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_pub),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .sign(material.issuer_key, hashes.SHA256())
    )
