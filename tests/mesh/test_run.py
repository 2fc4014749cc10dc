"""`meshagent run` on two hosts: transparent mTLS between a client and a legacy server."""

from __future__ import annotations

import pytest

from tests.mesh.conftest import PY, Mesh, wait_for

pytestmark = pytest.mark.netns


def _http_server(mesh: Mesh) -> None:
    mesh.b.popen(PY, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", str(mesh.tmp))
    (mesh.tmp / "hello.txt").write_text("hello from the legacy host\n")
    wait_for(
        lambda: mesh.b.run("curl", "-sf", "http://127.0.0.1:8080/hello.txt", check=False).returncode == 0,
        "app up",
    )


def test_client_to_legacy_server_is_mtls_and_strict_policy_refuses_plaintext(mesh: Mesh) -> None:
    _http_server(mesh)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(
        mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"], inbound_policy="all-authenticated"
    )
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)

    got = mesh.a.run("curl", "-sS", "--max-time", "10", "http://198.18.3.2:8080/hello.txt", check=False)
    assert got.returncode == 0, got.stderr + a.log.read_text()[-3000:] + b.log.read_text()[-3000:]
    assert got.stdout == "hello from the legacy host\n"

    # The unmeshed "cluster" host has no identity: b's strict policy refuses it.
    plain = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:8080/hello.txt", check=False)
    assert plain.returncode != 0
    assert "connection.refused" in b.log.read_text()

    # SIGTERM: exit 0, rules gone.
    assert a.stop() == 0
    assert b.stop() == 0
    for host in (mesh.a, mesh.b):
        assert "meshagent" not in host.run("nft", "list", "ruleset").stdout
    # Without the agent (fail open), the app is reached directly again.
    again = mesh.cl.run("curl", "-sS", "--max-time", "5", "http://198.18.2.2:8080/hello.txt", check=False)
    assert again.stdout == "hello from the legacy host\n"
