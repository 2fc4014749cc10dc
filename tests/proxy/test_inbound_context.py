"""Proxy.inbound_context: built once and reused per connection, rebuilt when the identity,
the policy or the listeners change."""

from __future__ import annotations

from pathlib import Path

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.tls import Credentials
from tests.support import issue_identity


def test_the_context_is_reused_until_identity_or_policy_change(tmp_path: Path) -> None:
    issue_identity(tmp_path / "authority", "shop/web", tmp_path / "web")
    issue_identity(tmp_path / "authority", "shop/db", tmp_path / "db")
    proxy = Proxy(
        ListenerSettings(),
        Credentials.load(IdentityStore(tmp_path / "web")),
        InboundPolicy(),
        Catalog([]),
        lambda sock: ("127.0.0.1", 1),
    )
    first = proxy.inbound_context()
    assert first.our_name == "web.shop.serviceaccount.identity.linkerd.cluster.local"
    assert proxy.inbound_context() is first  # per connection: no rebuild
    proxy.credentials = Credentials.load(IdentityStore(tmp_path / "db"))
    second = proxy.inbound_context()
    assert second is not first
    assert second.our_name == "db.shop.serviceaccount.identity.linkerd.cluster.local"
    assert proxy.inbound_context() is second
    proxy.policy = InboundPolicy()
    third = proxy.inbound_context()
    assert third is not second and third.policy is proxy.policy
    proxy.listening["inbound"] = ("127.0.0.1", 4143)
    fourth = proxy.inbound_context()
    assert fourth is not third and fourth.proxy_port == 4143
