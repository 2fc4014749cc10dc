"""Peers that are not meshagent: in-cluster proxies (curl, openssl s_client with mesh certificates)
talking to a meshed legacy host, and an openssl s_server with a mesh certificate as a destination."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.authority.ca import load_authority
from agent.authority.signing import issue_leaf
from agent.identity.certinfo import utcnow
from agent.identity.names import WorkloadIdentity
from agent.identity.pki import certs_to_pem, generate_key, key_to_pem, make_csr
from tests.mesh import apps
from tests.mesh.conftest import Agent, Mesh, wait_for
from tests.support import issue_identity

pytestmark = pytest.mark.netns

B = "198.18.2.2"  # b as the cluster host sees it
LEGACY = "legacy.shop.serviceaccount.identity.linkerd.cluster.local"
TD = "spiffe://cluster.local"


def _cert(mesh: Mesh, identity: str, name: str) -> Path:
    """An authority-issued certificate, as an in-cluster proxy would hold: <dir>/identity/*.pem."""
    state = mesh.tmp / f"peer-{name}"
    issue_identity(mesh.authority_dir, identity, state)
    return state / "identity"


def _expired_cert(mesh: Mesh) -> Path:
    material = load_authority(mesh.authority_dir)
    key = generate_key()
    from cryptography import x509

    csr = x509.load_pem_x509_csr(make_csr(key))
    leaf = issue_leaf(
        material,
        WorkloadIdentity("cluster.local", "shop", "incluster"),
        csr,
        utcnow() - timedelta(days=2),
        timedelta(hours=1),
    )
    d = mesh.tmp / "peer-expired"
    d.mkdir()
    (d / "cert.pem").write_bytes(certs_to_pem([leaf, material.issuer_cert]))
    (d / "key.pem").write_bytes(key_to_pem(key))
    (d / "bundle.pem").write_bytes(material.trust_bundle_file.read_bytes())
    assert leaf.public_bytes(serialization.Encoding.PEM)
    return d


def _curl(mesh: Mesh, ident: Path, port: int = 8080) -> tuple[int, str]:
    proc = mesh.cl.run(
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cert",
        str(ident / "cert.pem"),
        "--key",
        str(ident / "key.pem"),
        "--cacert",
        str(ident / "bundle.pem"),
        "--connect-to",
        f"{LEGACY}:{port}:{B}:{port}",
        f"https://{LEGACY}:{port}/",
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _start_b(mesh: Mesh) -> Agent:
    policy = (
        f'[[inbound.ports]]\nport = 8080\npolicy = "deny"\nallow = ["{TD}/ns/shop/sa/incluster"]\n'
        "[intercept]\n"
    )
    b = mesh.enroll(
        mesh.b,
        "shop/legacy",
        "198.18.2.1",
        ["198.18.3.2", B],
        inbound_policy="all-authenticated",
        extra_config=policy.replace("[intercept]\n", ""),
    )
    b.start()
    return b


def test_in_cluster_clients_with_mesh_certificates(mesh: Mesh) -> None:
    apps.nginx(mesh.b, mesh.tmp, 8080, body="legacy says hi\n")
    b = _start_b(mesh)

    # An in-cluster proxy's identity that the port's allow-list names: served, over mTLS.
    code, out = _curl(mesh, _cert(mesh, "shop/incluster", "incluster"))
    assert (code, out) == (0, "legacy says hi\n")

    # Another valid mesh identity, not on the allow-list: refused, and the log names it.
    code, _ = _curl(mesh, _cert(mesh, "shop/other", "other"))
    assert code != 0
    # The log names the client in both forms: client_id as the metrics label it, and its SPIFFE ID.
    wait_for(lambda: f"spiffe_id={TD}/ns/shop/sa/other" in b.log.read_text(), "refusal logged")
    assert "client_id=other.shop.serviceaccount.identity.linkerd.cluster.local" in b.log.read_text()
    assert "reason=not_authorized" in b.log.read_text()

    # openssl s_client with the allowed identity speaks raw HTTP through B's inbound.
    ident = mesh.tmp / "peer-incluster" / "identity"
    issuer = mesh.tmp / "issuer.pem"  # s_client sends only the leaf unless given the rest
    issuer.write_bytes((mesh.authority_dir / "issuer.crt").read_bytes())
    s_client = mesh.cl.run(
        "openssl",
        "s_client",
        "-quiet",
        "-tls1_3",
        "-connect",
        f"{B}:8080",
        "-servername",
        LEGACY,
        "-cert",
        str(ident / "cert.pem"),
        "-cert_chain",
        str(issuer),
        "-key",
        str(ident / "key.pem"),
        "-CAfile",
        str(ident / "bundle.pem"),
        "-verify_return_error",
        "-verify_hostname",
        LEGACY,
        input="GET / HTTP/1.0\r\n\r\n",
        check=False,
        timeout=20,
    )
    assert "legacy says hi" in s_client.stdout, s_client.stderr

    # Refused at the handshake: an expired certificate, and one from another CA.
    code, _ = _curl(mesh, _expired_cert(mesh))
    assert code != 0
    issue_identity(mesh.tmp / "other-authority", "shop/incluster", mesh.tmp / "peer-foreign")
    code, _ = _curl(mesh, mesh.tmp / "peer-foreign" / "identity")
    assert code != 0
    wait_for(lambda: b.log.read_text().count("tls.handshake_failed") >= 2, "handshake failures logged")
    log = b.log.read_text()
    assert "expired" in log
    assert "unknown ca" in log or "unable to get local issuer" in log or "certificate verify failed" in log

    # The same decisions in linkerd's authorization metrics: each allowed request under the
    # allow-list entry that admitted it, the refused identity once, as a connection.
    text = mesh.cl.run("curl", "-sf", f"http://{B}:4191/metrics").stdout
    server = 'srv_group="",srv_kind="default",srv_name="deny",srv_port="8080"'
    allowed = (
        f'inbound_http_authz_allow_total{{target_addr="{B}:8080",target_ip="{B}",target_port="8080",'
        f'{server},route_group="",route_kind="default",route_name="default",authz_group="",'
        f'authz_kind="allowlist",authz_name="{TD}/ns/shop/sa/incluster",tls="true",'
        'client_id="incluster.shop.serviceaccount.identity.linkerd.cluster.local"} 2'
    )
    assert allowed in text.splitlines(), text
    denied = (
        f'inbound_tcp_authz_deny_total{{target_addr="{B}:8080",target_ip="{B}",target_port="8080",'
        f'{server},tls="true",client_id="other.shop.serviceaccount.identity.linkerd.cluster.local"}} 1'
    )
    assert denied in text.splitlines(), text


def test_openssl_s_server_with_a_mesh_certificate_is_a_valid_destination(mesh: Mesh) -> None:
    """A's agent originates mTLS to a server that is not meshagent; a wrong identity is refused."""
    skip = "[intercept]\ninbound_skip_ports = [9443, 9444]\n"
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b_state = mesh.tmp / "state-b"
    mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2"], extra_config=skip)  # registers b
    right = b_state / "identity"
    wrong = _cert(mesh, "shop/impostor", "impostor")
    issuer = mesh.tmp / "issuer.pem"  # s_server sends only the leaf unless given the rest
    issuer.write_bytes((mesh.authority_dir / "issuer.crt").read_bytes())
    for port, ident in ((9443, right), (9444, wrong)):
        mesh.b.popen(
            "openssl",
            "s_server",
            "-quiet",
            "-tls1_3",
            "-www",
            "-accept",
            str(port),
            "-cert",
            str(ident / "cert.pem"),
            "-cert_chain",
            str(issuer),
            "-key",
            str(ident / "key.pem"),
            "-CAfile",
            str(ident / "bundle.pem"),
            "-Verify",
            "1",
            "-verify_return_error",
        )
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    wait_for(
        lambda: mesh.b.run("sh", "-c", "ss -ltn | grep -q ':9444 '", check=False).returncode == 0,
        "s_server up",
    )

    ok = mesh.a.run("curl", "-sS", "--max-time", "10", "http://198.18.3.2:9443/", check=False)
    assert ok.returncode == 0, ok.stderr + a.log.read_text()[-2000:]
    assert "TLSv1.3" in ok.stdout and "s_server" in ok.stdout

    bad = mesh.a.run("curl", "-sS", "--max-time", "10", "http://198.18.3.2:9444/", check=False)
    assert bad.returncode != 0
    wait_for(
        lambda: "tls.handshake_failed" in a.log.read_text() or "tls.wrong_identity" in a.log.read_text(),
        "wrong identity refused",
        a,
    )
