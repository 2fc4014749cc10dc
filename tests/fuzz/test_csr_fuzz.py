"""Property tests of the authority's CSR check (agent/authority/signing.py `parse_csr`, fed the
`csr` field of enroll and renew requests): any text is a verified ECDSA P-256 request or a
RejectedError (invalid_csr, unsupported_key), never another exception."""

from __future__ import annotations

import base64
import textwrap

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from agent.authority.signing import parse_csr
from agent.errors import RejectedError

SHA256 = hashes.SHA256()


def csr_der(key: object, sign_hash: hashes.HashAlgorithm | None = SHA256) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host")])
    )
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("x.example")]), critical=False)
    return builder.sign(key, sign_hash).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


P256 = ec.generate_private_key(ec.SECP256R1())
SEEDS = [
    csr_der(P256),
    csr_der(P256, hashes.SHA384()),
    csr_der(ec.generate_private_key(ec.SECP384R1())),
    csr_der(ec.generate_private_key(ec.SECP256K1())),
    csr_der(rsa.generate_private_key(65537, 2048)),
    csr_der(ed25519.Ed25519PrivateKey.generate(), None),
]


def pem(der: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    der = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        i = draw(st.integers(0, len(der) - 1))
        if op == "flip":
            der[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del der[i:]
        elif op == "insert":
            der[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif len(der) > 1:
            del der[i]
        if not der:
            der = bytearray(b"\x30")
    return bytes(der)


texts = st.one_of(
    st.builds(pem, mutated()),
    st.builds(pem, mutated(), st.sampled_from(["NEW CERTIFICATE REQUEST", "CERTIFICATE", "PRIVATE KEY"])),
    st.builds(pem, st.binary(max_size=300)),
    st.sampled_from(SEEDS).map(lambda der: pem(der) + pem(der)),
    st.text(max_size=200),
    st.builds(
        lambda t: "-----BEGIN CERTIFICATE REQUEST-----\n" + t + "\n-----END CERTIFICATE REQUEST-----",
        st.text(max_size=200),
    ),
)


@given(texts)
def test_any_csr_text_is_a_p256_request_or_a_refusal(text: str) -> None:
    try:
        csr = parse_csr(text)
    except RejectedError as exc:
        assert exc.code in ("invalid_csr", "unsupported_key"), exc.code
        return
    assert csr.is_signature_valid
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_the_seeds_are_accepted_or_refused_as_their_keys_say() -> None:
    codes = []
    for der in SEEDS:
        try:
            parse_csr(pem(der))
            codes.append("ok")
        except RejectedError as exc:
            codes.append(exc.code)
    assert codes == ["ok", "ok", *["unsupported_key"] * 4]
