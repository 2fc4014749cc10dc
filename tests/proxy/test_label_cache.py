"""The label strings children are keyed by are memoized (metrics.LABEL_CACHE_SIZE): the same
text as before, escaped, handed out as one object per distinct label set, and bounded."""

from __future__ import annotations

from agent.telemetry.metrics import LABEL_CACHE_SIZE, join, labels
from agent.telemetry.proxy_metrics import ProxyMetrics, authz_labels, target, tls_accept, tls_connect


def test_memoized_labels_are_the_same_text_and_still_escaped() -> None:
    assert labels(("a", "1"), ("b", 'x"y\\z\n')) == 'a="1",b="x\\"y\\\\z\\n"'
    assert join('a="1"', "", 'b="2"') == 'a="1",b="2"'
    assert target("fd00::1", 8080) == 'target_addr="[fd00::1]:8080",target_ip="fd00::1",target_port="8080"'
    assert tls_accept("web.shop", True) == 'tls="true",client_id="web.shop"'
    assert tls_accept(None, False, reason="port_skipped") == 'tls="no_identity",no_tls_reason="port_skipped"'
    assert tls_connect(None) == 'tls="no_identity",no_tls_reason="not_provided_by_service_discovery"'
    assert authz_labels("default:deny", True) != authz_labels("default:deny", False)
    # one object per label set: a child lookup with it finds the key by identity
    assert join(target("10.0.0.1", 80), tls_connect("x")) is join(target("10.0.0.1", 80), tls_connect("x"))


def test_the_caches_are_bounded_by_distinct_label_sets() -> None:
    for i in range(LABEL_CACHE_SIZE + 50):
        host = f"10.1.{i // 256}.{i % 256}"
        join(labels(("direction", "outbound")), target(host, 443))
    for cached in (labels, join, target):
        assert cached.cache_info().currsize <= LABEL_CACHE_SIZE
    # evicted entries are rebuilt with the same text
    assert target("10.1.0.0", 443) == 'target_addr="10.1.0.0:443",target_ip="10.1.0.0",target_port="443"'


def test_connections_with_the_same_labels_share_one_child() -> None:
    m = ProxyMetrics()
    base = join(labels(("direction", "inbound"), ("peer", "src")), target("10.0.0.9", 80))
    a = m.connection(base)
    b = m.connection(join(labels(("direction", "inbound"), ("peer", "src")), target("10.0.0.9", 80)))
    assert a.opened is b.opened and a.opened.value == 2
    a.closed(10, 20, "")
    b.closed(1, 2, "")
    text = "\n".join(m.render([]))
    assert (
        'tcp_close_total{direction="inbound",peer="src",target_addr="10.0.0.9:80",'
        'target_ip="10.0.0.9",target_port="80",errno=""} 2'
    ) in text
    assert 'tcp_read_bytes_total{direction="inbound",peer="src",target_addr="10.0.0.9:80",' in text


def test_a_scrape_leaves_the_label_caches_as_they_were() -> None:
    """Exposition builds each histogram bucket's labels once per scrape: through the cache, a
    scrape would fill it with one-off strings and push out the per-connection label sets."""
    m = ProxyMetrics()
    for i in range(40):
        dst = join(labels(("direction", "outbound")), target(f"10.2.0.{i}", 80), tls_connect(None))
        m.connection(dst).closed(1, 1, "")
    # Misses, not sizes: an earlier test may have filled the caches, and a full cache keeps its size.
    misses = [c.cache_info().misses for c in (labels, join, target)]
    text = "\n".join(m.render([]))
    assert 'le="+Inf"' in text and 'target_ip="10.2.0.39"' in text
    assert [c.cache_info().misses for c in (labels, join, target)] == misses
