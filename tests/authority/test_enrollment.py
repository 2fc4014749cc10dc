"""Enrollment against a real `meshagent authority serve` process on loopback, with the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.authority.tokens import JoinToken, parse_token
from agent.errors import ExitCode
from agent.identity import enroll as flows
from agent.identity.pki import generate_key, key_to_pem, load_certs
from agent.identity.store import IdentityStore
from tests.support import AuthorityProcess, cli_json, run_cli, running_authority

TD = "cluster.local"


def enroll(
    auth: AuthorityProcess, state: Path, *extra: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("enroll", token or auth.token(), "--state-dir", str(state), "--json", *extra)


def openssl_verify(state: Path, ca_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    ident = state / "identity"
    chain = load_certs((ident / "cert.pem").read_bytes())
    untrusted = state / "untrusted.pem"
    untrusted.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:]))
    leaf = state / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca_file or ident / "bundle.pem"),
            "-untrusted",
            str(untrusted),
            "-purpose",
            "sslclient",
            str(leaf),
        ],
        capture_output=True,
        text=True,
    )


def test_enroll_stores_a_verifiable_identity_with_exact_names(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    state = tmp_path / "host"
    proc = enroll(authority, state, "--host-name", "legacy-1", "--address", "198.18.0.10")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["spiffe_id"] == f"spiffe://{TD}/ns/shop/sa/billing"
    assert doc["dns_name"] == f"billing.shop.serviceaccount.identity.linkerd.{TD}"
    for key in ("not_after", "cert_file", "key_file", "bundle_file"):
        assert doc[key]
    assert doc["not_after"].endswith("Z")

    verify = openssl_verify(state)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # The bundle is the authority's anchor, and the anchor verifies the chain too.
    verify_anchor = openssl_verify(state, authority.directory / "trust-bundle.pem")
    assert verify_anchor.returncode == 0

    leaf = load_certs(Path(doc["cert_file"]).read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [doc["spiffe_id"]]
    assert san.get_values_for_type(x509.DNSName) == [doc["dns_name"]]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 24 * 3600 <= lifetime.total_seconds() <= 24 * 3600 + 120

    # Key material on disk: private directory, private key.
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(doc["key_file"]).st_mode) == 0o600
    assert not (state / "pending-key.pem").exists()

    hosts = cli_json("authority", "hosts", "--dir", str(authority.directory))
    assert [(h["host_name"], h["addresses"], h["identity"]) for h in hosts] == [
        ("legacy-1", ["198.18.0.10"], "shop/billing")
    ]
    assert hosts[0]["serial"] == doc["serial"]

    status = cli_json("status", "--state-dir", str(state))
    assert status["serial"] == doc["serial"]
    assert status["authority_url"] == authority.url


def test_the_authority_decides_the_names_not_the_csr(authority: AuthorityProcess) -> None:
    key = generate_key()
    evil = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
                    x509.DNSName("kubernetes.default.svc"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    token = parse_token(authority.token("shop/web"))
    r = httpx.post(
        f"{authority.url}/v1/enroll",
        verify=authority.tls,
        json={
            "token_secret": token.secret,
            "csr": evil.decode(),
            "host_name": "x",
            "addresses": [],
        },
    )
    assert r.status_code == 200, r.text
    leaf = load_certs(r.json()["certificate_chain"].encode())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/web"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["web.shop.serviceaccount.identity.linkerd.cluster.local"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != "admin"


def test_token_replay_is_refused(authority: AuthorityProcess, tmp_path: Path) -> None:
    token = authority.token()
    assert enroll(authority, tmp_path / "a", token=token).returncode == 0
    again = enroll(authority, tmp_path / "b", token=token)
    assert again.returncode == ExitCode.REJECTED
    assert json.loads(again.stdout)["error"]["code"] == "token_used"
    assert "already used" in again.stderr and "hint:" in again.stderr
    assert "Traceback" not in again.stderr


def test_expired_token_is_refused(authority: AuthorityProcess, tmp_path: Path) -> None:
    token = authority.token(ttl="1s")
    import time

    time.sleep(1.5)
    proc = enroll(authority, tmp_path / "a", token=token)
    assert proc.returncode == ExitCode.REJECTED
    assert json.loads(proc.stdout)["error"]["code"] == "token_expired"


def test_wrong_pin_is_refused_before_the_secret_is_sent(authority: AuthorityProcess, tmp_path: Path) -> None:
    real = parse_token(authority.token())
    forged = JoinToken(real.authority_url, "sha256:" + "00" * 32, real.secret).encode()
    proc = enroll(authority, tmp_path / "a", token=forged)
    assert proc.returncode == ExitCode.TRUST
    assert "pin" in proc.stderr
    # The secret never reached the authority: the real token still works.
    assert enroll(authority, tmp_path / "b", token=real.encode()).returncode == 0


def test_malformed_token_is_refused_locally(tmp_path: Path) -> None:
    proc = run_cli("enroll", "ma1.not-a-token", "--state-dir", str(tmp_path / "a"))
    assert proc.returncode == ExitCode.FAILURE
    assert "malformed" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_authority(authority: AuthorityProcess, tmp_path: Path) -> None:
    token = authority.token()
    authority.stop()
    proc = enroll(authority, tmp_path / "a", token=token)
    assert proc.returncode == ExitCode.UNREACHABLE
    assert "cannot reach the authority" in proc.stderr


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (scripts/bootstrap installs it)")
def test_clock_skew_is_refused_before_the_token_is_used(authority: AuthorityProcess, tmp_path: Path) -> None:
    token = authority.token()
    proc = run_cli("enroll", token, "--state-dir", str(tmp_path / "a"), prefix=["faketime", "-f", "-10m"])
    assert proc.returncode == ExitCode.CLOCK, proc.stderr
    assert "behind" in proc.stderr
    assert "timedatectl" in proc.stderr
    assert enroll(authority, tmp_path / "b", token=token).returncode == 0  # token not burned


def test_tampered_csr_is_refused(authority: AuthorityProcess) -> None:
    key = generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
        .sign(key, hashes.SHA256())
    )
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # flip bits in the signature
    import base64

    pem = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    token = parse_token(authority.token())
    r = httpx.post(
        f"{authority.url}/v1/enroll",
        verify=authority.tls,
        json={"token_secret": token.secret, "csr": pem, "host_name": "x", "addresses": []},
    )
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_csr"
    # A refused CSR does not burn the token.
    good = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
        .sign(key, hashes.SHA256())
    )
    r = httpx.post(
        f"{authority.url}/v1/enroll",
        verify=authority.tls,
        json={
            "token_secret": token.secret,
            "csr": good.public_bytes(serialization.Encoding.PEM).decode(),
            "host_name": "x",
            "addresses": [],
        },
    )
    assert r.status_code == 200


def test_renewal_rotates_key_and_revocation_stops_it(authority: AuthorityProcess, tmp_path: Path) -> None:
    state = tmp_path / "host"
    first = json.loads(enroll(authority, state, "--host-name", "legacy-2").stdout)
    old_key = (state / "identity" / "key.pem").read_bytes()
    renewed = cli_json("renew", "--state-dir", str(state))
    assert renewed["serial"] != first["serial"]
    assert (state / "identity" / "key.pem").read_bytes() != old_key  # a new key every time
    assert openssl_verify(state).returncode == 0
    hosts = cli_json("authority", "hosts", "--dir", str(authority.directory))
    assert hosts[0]["serial"] == renewed["serial"] and hosts[0]["last_renewal"]

    revoked = cli_json("authority", "revoke", "legacy-2", "--dir", str(authority.directory))
    assert revoked["revoked"] is True
    proc = run_cli("renew", "--state-dir", str(state), "--json")
    assert proc.returncode == ExitCode.REJECTED
    assert json.loads(proc.stdout)["error"]["code"] == "host_revoked"
    # The current certificate is kept, and status says the renewal failed.
    status = cli_json("status", "--state-dir", str(state))
    assert status["serial"] == renewed["serial"]
    assert status["last_renewal_result"] == "failed" and "host_revoked" in status["last_renewal_detail"]


def test_renewal_needs_possession_of_the_current_key(authority: AuthorityProcess, tmp_path: Path) -> None:
    state = tmp_path / "host"
    assert enroll(authority, state).returncode == 0
    chain = (state / "identity" / "cert.pem").read_text()
    stranger = generate_key()
    from agent.identity.pki import make_csr, sign_possession

    csr = make_csr(generate_key())
    import time

    ts = int(time.time())
    r = httpx.post(
        f"{authority.url}/v1/renew",
        verify=authority.tls,
        json={
            "certificate_chain": chain,
            "csr": csr.decode(),
            "timestamp": ts,
            "signature": sign_possession(stranger, csr, ts),
        },
    )
    assert r.status_code == 403
    assert r.json()["code"] == "possession_failed"


def test_interrupted_enrollment_can_finish_with_the_same_token(
    authority: AuthorityProcess, tmp_path: Path
) -> None:
    """The response was lost after the authority committed: retrying must not need a new token."""
    state = tmp_path / "host"
    state.mkdir(mode=0o700)
    key = generate_key()
    (state / "pending-key.pem").write_bytes(key_to_pem(key))
    token = authority.token()
    from agent.identity.pki import make_csr

    r = httpx.post(
        f"{authority.url}/v1/enroll",
        verify=authority.tls,
        json={
            "token_secret": parse_token(token).secret,
            "csr": make_csr(key).decode(),
            "host_name": "x",
            "addresses": [],
        },
    )
    assert r.status_code == 200  # ... and the host never saw it
    proc = enroll(authority, state, token=token)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["serial"] == format(
        load_certs(r.json()["certificate_chain"].encode())[0].serial_number, "x"
    )
    assert len(cli_json("authority", "hosts", "--dir", str(authority.directory))) == 1


def test_status_without_identity(tmp_path: Path) -> None:
    proc = run_cli("status", "--state-dir", str(tmp_path / "none"))
    assert proc.returncode == ExitCode.NOT_ENROLLED
    assert "meshagent enroll" in proc.stderr


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-processes-one-registry"])
def test_two_hundred_concurrent_enrollments(tmp_path: Path, workers: int) -> None:
    with running_authority(tmp_path / "authority", workers=workers) as authority:
        _two_hundred_concurrent_enrollments(authority, tmp_path)


def _two_hundred_concurrent_enrollments(authority: AuthorityProcess, tmp_path: Path) -> None:
    tokens = run_cli(
        "authority",
        "token",
        "create",
        "--dir",
        str(authority.directory),
        "--identity",
        "shop/fleet",
        "--url",
        authority.url,
        "--count",
        "200",
        check=True,
    ).stdout.split()
    assert len(set(tokens)) == 200

    def one(i: int) -> str:
        ident = flows.enroll(
            tokens[i], IdentityStore(tmp_path / f"h{i}"), host_name=f"host-{i}", addresses=[]
        )
        return ident.summary.serial

    with ThreadPoolExecutor(max_workers=200) as pool:
        serials = list(pool.map(one, range(200)))
    assert len(set(serials)) == 200
    hosts = cli_json("authority", "hosts", "--dir", str(authority.directory))
    assert len(hosts) == 200
    assert {h["host_name"] for h in hosts} == {f"host-{i}" for i in range(200)}
    assert {h["serial"] for h in hosts} == set(serials)


def test_restarted_authority_keeps_its_state(authority: AuthorityProcess, tmp_path: Path) -> None:
    state = tmp_path / "host"
    assert enroll(authority, state).returncode == 0
    pending = authority.token()
    authority.stop()
    authority.start()
    assert cli_json("renew", "--state-dir", str(state))["serial"]
    assert enroll(authority, tmp_path / "other", token=pending).returncode == 0
    assert len(cli_json("authority", "hosts", "--dir", str(authority.directory))) == 2


def test_trust_bundle_rotation_reaches_hosts(authority: AuthorityProcess, tmp_path: Path) -> None:
    """Anchor rotation: a second root is added to the bundle; hosts pick it up at renewal."""
    state = tmp_path / "host"
    assert enroll(authority, state).returncode == 0
    other = tmp_path / "other"
    run_cli("authority", "init", "--dir", str(other), "--trust-domain", TD, check=True)
    bundle = authority.directory / "trust-bundle.pem"
    bundle.write_bytes(bundle.read_bytes() + (other / "trust-bundle.pem").read_bytes())
    renewed = cli_json("renew", "--state-dir", str(state))
    assert renewed["trust_bundle_roots"] == 2
    assert openssl_verify(state).returncode == 0


def test_adopted_issuer_chains_to_the_meshs_anchor(tmp_path: Path) -> None:
    """Adopt an issuer made the way Linkerd's is: the host chains to the existing anchor."""
    d = tmp_path / "pki"
    d.mkdir()

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    ossl(
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=root.linkerd.cluster.local",
        "-days",
        "365",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "ca.crt",
    )
    ossl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "issuer.key")
    ossl(
        "req",
        "-new",
        "-key",
        "issuer.key",
        "-subj",
        "/CN=identity.linkerd.cluster.local",
        "-out",
        "issuer.csr",
    )
    (d / "ext.cnf").write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
    )
    ossl(
        "x509",
        "-req",
        "-in",
        "issuer.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "ext.cnf",
        "-out",
        "issuer.crt",
    )

    # A key that does not belong to the issuer is refused with a reason.
    bad = run_cli(
        "authority",
        "init",
        "--dir",
        str(tmp_path / "bad"),
        "--trust-domain",
        TD,
        "--trust-anchor",
        str(d / "ca.crt"),
        "--issuer-cert",
        str(d / "issuer.crt"),
        "--issuer-key",
        str(d / "ca.key"),
    )
    assert bad.returncode != 0 and "does not match" in bad.stderr

    with running_authority(
        tmp_path / "auth",
        "--trust-anchor",
        str(d / "ca.crt"),
        "--issuer-cert",
        str(d / "issuer.crt"),
        "--issuer-key",
        str(d / "issuer.key"),
    ) as auth:
        state = tmp_path / "host"
        assert enroll(auth, state).returncode == 0
        assert openssl_verify(state, d / "ca.crt").returncode == 0


def test_api_errors_are_json_and_documented(authority: AuthorityProcess) -> None:
    spec = httpx.get(f"{authority.url}/v1/openapi.json", verify=authority.tls).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/enroll", "/v1/renew", "/v1/authority"} <= set(spec["paths"])
    r = httpx.get(f"{authority.url}/v1/nope", verify=authority.tls)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = httpx.post(f"{authority.url}/v1/enroll", verify=authority.tls, content=b"{not json")
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    r = httpx.post(
        f"{authority.url}/v1/enroll",
        verify=authority.tls,
        json={"token_secret": "x" * 43, "csr": "", "host_name": "h", "addresses": []},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_csr"


@pytest.mark.parametrize(
    "args",
    [
        ("--trust-domain", "cluster.local\n"),
        ("--trust-domain", "cluster.local", "--mesh", "linkerd\n"),
        ("--trust-domain", "cluster.local", "--san", "authority.example\n"),
        ("--trust-domain", "cluster.local", "--san", "evil\x1b[31m"),
    ],
    ids=["trust-domain-newline", "mesh-newline", "san-newline", "san-escape"],
)
def test_init_refuses_smuggled_names_and_writes_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = run_cli("authority", "init", "--dir", str(tmp_path / "a"), *args)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "authority.json").exists()


def test_token_create_refuses_an_identity_with_a_newline(tmp_path: Path) -> None:
    init = run_cli(
        "authority", "init", "--dir", str(tmp_path / "a"), "--trust-domain", TD, "--san", "127.0.0.1"
    )
    assert init.returncode == 0, init.stderr
    proc = run_cli(
        "authority", "token", "create", "--dir", str(tmp_path / "a"),
        "--identity", "shop/billing\n", "--url", "https://127.0.0.1:1",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "shop/billing\\n" in proc.stderr  # the input quoted, its newline visible
    assert cli_json("authority", "token", "list", "--dir", str(tmp_path / "a")) == []
