"""The directory refresh's two rules that need no authority: when to ask again, and which
Services to keep when the authority leaves them out."""

from __future__ import annotations

from agent.daemon import carry_services, poll_pause
from agent.identity.client import HostConfigFetch

DOC = {"catalog": [], "policy": {}, "generated_at": 1.0}
SERVICES = [
    {"name": "orders", "namespace": "shop", "cluster_ips": ["198.19.0.10"], "ports": [], "endpoints": []}
]


def test_when_to_ask_again() -> None:
    assert poll_pause(HostConfigFetch(DOC, '"abc"', False), 30.0) == 0.0  # long poll at once
    assert poll_pause(HostConfigFetch(None, '"abc"', True), 30.0) == 0.0  # 304: poll again
    assert poll_pause(HostConfigFetch(None, '"abc"', True, retry_after_s=7.0), 30.0) == 7.0
    # No ETag (an older authority, a proxy that strips it): once an interval, never a tight loop.
    assert poll_pause(HostConfigFetch(DOC, None, False), 30.0) == 30.0


def test_services_left_out_are_kept() -> None:
    last = {**DOC, "services": SERVICES}
    assert carry_services(dict(DOC), last)["services"] == SERVICES  # authority just restarted
    assert carry_services({**DOC, "services": []}, last)["services"] == []  # "none" is news
    assert "services" not in carry_services(dict(DOC), None)  # nothing to keep


def test_a_reload_applies_the_cache_unless_the_last_fetch_is_newer() -> None:
    from agent.daemon import newest

    cached, fetched = {**DOC, "generated_at": 5.0}, {**DOC, "generated_at": 9.0}
    assert newest(cached, fetched) is fetched  # the cache's write failed or is under way
    assert newest(fetched, cached) is fetched  # a newer cache (written since) wins
    by_hand = {"catalog": [], "policy": {}}  # an operator's file, no generated_at: as at start
    assert newest(by_hand, by_hand) is by_hand
    assert newest(None, fetched) is fetched and newest(cached, None) is cached
