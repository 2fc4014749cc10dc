"""The daemon applies the authority's document entry by entry: one bad entry never freezes it."""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig, IdentitySettings
from agent.daemon import Daemon

CLIENT = "spiffe://cluster.local/ns/shop/sa/web"
GOOD = {"cidr": "198.18.0.20/32", "ports": [5432], "identity": CLIENT, "server_name": "web.shop"}
BAD = {"cidr": "not-an-ip/32", "ports": [], "identity": CLIENT, "server_name": "x"}


def test_a_bad_catalog_entry_does_not_stop_a_deny_policy(tmp_path: Path) -> None:
    daemon = Daemon(AgentConfig(identity=IdentitySettings(state_dir=tmp_path)))
    before = daemon._directory(None)
    assert before.policy.authorize(8080, CLIENT).allowed  # the default: all-unauthenticated

    doc = {"catalog": [BAD, GOOD], "policy": {"ports": {"8080": {"default": "deny", "allow": []}}}}
    directory = daemon._directory(doc)

    assert not directory.policy.authorize(8080, CLIENT).allowed
    assert len(directory.catalog) == 1
    status = daemon.status()["catalog"]
    assert status["rejected_count"] == 1
    assert status["rejected"][0]["where"] == "catalog[0]"
    assert "not-an-ip" in status["rejected"][0]["entry"]
    assert "does not appear to be an IPv4 or IPv6 network" in status["rejected"][0]["reason"]
    # Logged once per distinct entry, not on every refresh.
    daemon._directory(doc)
    assert len(daemon.state.rejected_seen) == 1


def test_a_local_catalog_entry_keeps_its_opaque_port(tmp_path: Path) -> None:
    """`[[outbound.catalog]] opaque_port` reaches the data plane: the endpoint is dialled there
    with Linkerd's transport header (#16); without it, the app's own port."""
    from agent.config import load_config
    from agent.daemon import local_directory

    path = tmp_path / "agent.toml"
    path.write_text(
        "[[outbound.catalog]]\n"
        'cidr = "198.18.9.0/24"\nports = [6379]\n'
        'identity = "cache.data.serviceaccount.identity.linkerd.cluster.local"\nopaque_port = 4143\n'
        "[[outbound.catalog]]\n"
        'cidr = "198.18.8.0/24"\nidentity = "spiffe://cluster.local/ns/shop/sa/web"\n'
    )
    entries, _policy = local_directory(load_config(path))
    by_cidr = {str(e.network): e for e in entries}
    assert by_cidr["198.18.9.0/24"].opaque_port == 4143
    assert by_cidr["198.18.9.0/24"].identity == "spiffe://cluster.local/ns/data/sa/cache"
    assert by_cidr["198.18.8.0/24"].opaque_port is None
