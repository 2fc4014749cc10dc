"""Certificates made the way Linkerd's identity controller makes them, for tests.

linkerd2 `pkg/identity/service.go` (checkCSR) accepts a pod's CSR only with exactly one DNS
name equal to the requested identity, a CommonName empty or equal to it, and no e-mail, IP or
URI SANs; `pkg/tls/ca.go` (IssueEndEntityCrt, createTemplate) copies those names into a
certificate signed ECDSA-with-SHA256, KeyUsage digitalSignature|keyEncipherment (Go marks it
critical), ExtKeyUsage serverAuth+clientAuth, no BasicConstraints, AuthorityKeyIdentifier from
the issuer's SubjectKeyIdentifier, NotBefore backdated by the clock-skew allowance (10s) and a
24h lifetime. The identity is `<sa>.<ns>.serviceaccount.identity.<mesh>.<td>`
(controller/identity/domain.go, TrustDomain.Identity).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_SERIALS = count(2)  # Linkerd's CA counts serial numbers up from 1 (the CA's own)
_CLOCK_SKEW = timedelta(seconds=10)
_LIFETIME = timedelta(hours=24)


def linkerd_name(sa: str, ns: str, trust_domain: str = "cluster.local", mesh: str = "linkerd") -> str:
    return f"{sa}.{ns}.serviceaccount.identity.{mesh}.{trust_domain}"


def linkerd_pod_cert(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    sa: str,
    ns: str,
    trust_domain: str = "cluster.local",
    mesh: str = "linkerd",
) -> tuple[bytes, bytes]:
    """A pod certificate for service account `sa` in `ns`, signed by `issuer_cert`/`issuer_key`:
    one DNS SAN, no URI SAN, EC P-256. Returns (cert PEM, key PEM); the cert PEM is the chain a
    linkerd2-proxy presents, leaf first then the issuer, so `load_cert_chain` takes it as is and
    `x509.load_pem_x509_certificate` reads the leaf."""
    name = linkerd_name(sa, ns, trust_domain, mesh)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(next(_SERIALS))
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + _LIFETIME, issuer_cert.not_valid_after_utc))
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
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
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    )
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass  # Go sets AuthorityKeyId only when the parent has a SubjectKeyId
    cert = builder.sign(issuer_key, hashes.SHA256())
    chain = cert.public_bytes(serialization.Encoding.PEM) + issuer_cert.public_bytes(
        serialization.Encoding.PEM
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


def linkerd_ca(
    common_name: str = "identity.linkerd.cluster.local",
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed EC P-256 CA (as `linkerd install` makes its trust anchor and issuer), for a
    mesh the host does not trust: its own trust anchor and issuer in one."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key
