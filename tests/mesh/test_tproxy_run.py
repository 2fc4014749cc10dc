"""`meshagent run` with `inbound_mode = "tproxy"`: the real agent's inbound listener receives
what TPROXY captures (the kernel hands a diverted connection only to a transparent socket)."""

from __future__ import annotations

import pytest

from agent.netlab import Host
from tests.mesh.conftest import PY, Mesh, wait_for
from tests.support import MESHAGENT, metric_sum

pytestmark = pytest.mark.netns

TD = "cluster.local"
CLIENT = f"web.shop.serviceaccount.identity.linkerd.{TD}"


def test_tproxy_inbound_reaches_the_app_with_the_clients_identity(mesh: Mesh) -> None:
    # The app: both families (http.server binds dual-stack on "::"), its access log kept.
    (mesh.tmp / "hello.txt").write_text("hello from the legacy host\n")
    access = open(mesh.tmp / "app.log", "w")  # noqa: SIM115 - lives as long as the app
    mesh.b.popen(PY, "-m", "http.server", "8080", "--bind", "::", "--directory", str(mesh.tmp), stderr=access)
    wait_for(
        lambda: mesh.b.run("curl", "-sf", "http://127.0.0.1:8080/hello.txt", check=False).returncode == 0,
        "app up",
    )
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1", "2001:db8:3::1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "2001:db8:3::2", "198.18.2.2"])
    b.config.write_text(
        b.config.read_text().replace(
            "[intercept]\n", '[intercept]\ninbound_mode = "tproxy"\nbackend = "nft"\n'
        )
    )
    b.start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    assert "tproxy" in mesh.b.run("nft", "list", "ruleset").stdout  # captured by TPROXY, not NAT

    def get(client: Host, url: str) -> str:
        got = client.run("curl", "-sS", "--max-time", "5", url, check=False)
        logs = a.log.read_text()[-2000:] + b.log.read_text()[-3000:]
        assert got.returncode == 0, f"{url}: {got.stderr}\n{logs}"
        return str(got.stdout)

    # Meshed (mTLS from a's agent, terminated by b's), over IPv4 and IPv6; then a plain client
    # without an identity, admitted by the permissive default policy.
    calls = {
        "meshed4": (mesh.a, "http://198.18.3.2:8080/hello.txt?from=meshed4"),
        "meshed6": (mesh.a, "http://[2001:db8:3::2]:8080/hello.txt?from=meshed6"),
        "plain": (mesh.cl, "http://198.18.2.2:8080/hello.txt?from=plain"),
    }
    for host, url in calls.values():
        assert get(host, url) == "hello from the legacy host\n"

    access.flush()
    seen = (mesh.tmp / "app.log").read_text()
    for name in calls:
        assert f"GET /hello.txt?from={name} " in seen, seen

    metrics = mesh.b.run("curl", "-sf", "http://127.0.0.1:4191/metrics").stdout
    inbound = ('direction="inbound"', 'target_port="8080"')
    assert metric_sum(metrics, "request_total", *inbound, 'tls="true"', f'client_id="{CLIENT}"') == 2
    assert metric_sum(metrics, "request_total", *inbound, 'tls="no_identity"') == 1

    # Without CAP_NET_ADMIN (nor CAP_NET_RAW, which allows it too) the listener cannot be made
    # transparent: the agent says so and exits 1, before any rule would capture a connection.
    assert b.stop() == 0
    denied = mesh.b.run(
        "setpriv",
        "--bounding-set=-net_admin,-net_raw",
        "--inh-caps=-net_admin,-net_raw",
        "--",
        *MESHAGENT,
        "run",
        "--config",
        str(b.config),
        check=False,
    )
    said = denied.stdout + denied.stderr + b.log.read_text()[-2000:]
    assert denied.returncode == 1, said
    assert "CAP_NET_ADMIN" in said and 'inbound_mode = "redirect"' in said, said
    assert "meshagent" not in mesh.b.run("nft", "list", "ruleset").stdout
