"""The metric primitives: exposition, retention of idle series, live bytes."""

from __future__ import annotations

from typing import Any

import pytest

from agent.proxy.http1 import new_accounting
from agent.telemetry import metrics as m
from agent.telemetry import proxy_metrics as pmod
from agent.telemetry.proxy_metrics import LATENCY_BOUNDS_MS, ProxyMetrics
from agent.telemetry.stat import StatWindow


def test_histogram_exposition_is_cumulative_with_inf() -> None:
    fam = m.Family("response_latency_ms", "help", "histogram", (1, 5, 10))
    child = fam.child('direction="inbound"')
    for value in (0.5, 3, 3, 7, 50):
        child.observe(value)
    lines = list(fam.render())
    assert 'response_latency_ms_bucket{direction="inbound",le="1"} 1' in lines
    assert 'response_latency_ms_bucket{direction="inbound",le="5"} 3' in lines
    assert 'response_latency_ms_bucket{direction="inbound",le="10"} 4' in lines
    assert 'response_latency_ms_bucket{direction="inbound",le="+Inf"} 5' in lines
    assert 'response_latency_ms_count{direction="inbound"} 5' in lines
    assert 'response_latency_ms_sum{direction="inbound"} 63.5' in lines


def test_label_values_are_escaped() -> None:
    assert m.labels(("a", 'x"y\\z\n')) == 'a="x\\"y\\\\z\\n"'


@pytest.mark.parametrize("in_use", [True, False], ids=["updated-through-a-reference", "idle"])
def test_idle_series_are_dropped_but_used_ones_stay(monkeypatch: pytest.MonkeyPatch, in_use: bool) -> None:
    now = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    fam = m.Family("request_total", "help", "counter", retain_idle_s=600)
    child = fam.child('direction="inbound"')  # a connection holds this reference
    child.value += 1
    list(fam.render())
    now[0] += 700
    if in_use:
        child.value += 1
    text = "\n".join(fam.render())
    assert ('request_total{direction="inbound"}' in text) is in_use


def test_a_quiet_open_connection_keeps_its_series_past_the_idle_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A pooled keep-alive connection that is silent for longer than retain_idle: its children are
    # held, so what it carries later (and its bytes, settled at close) still count.
    now = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    pm = ProxyMetrics()
    conn = pm.connection('direction="inbound",peer="src"')
    http = pm.http('direction="inbound"')
    conn.http = http
    acct = new_accounting(http)

    class Leg:
        rx, tx = 0, 0
        tap: Any = None
        accounting: Any = None
        metrics: Any = None

    client, server = Leg(), Leg()
    client.metrics = conn
    acct.attach(client, server)

    def exchange() -> None:
        client.tap(b"GET / HTTP/1.1\r\n\r\n")
        server.tap(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    exchange()
    list(pm.render([client, server]))
    for _ in range(3):  # half an hour of silence, scraped every ten minutes
        now[0] += 700
        text = "\n".join(pm.render([client, server]))
        assert 'tcp_open_total{direction="inbound",peer="src"} 1' in text
        assert 'request_total{direction="inbound"} 1' in text
    exchange()
    exchange()
    client.rx = 9000
    conn.closed(9000, 120, "")
    acct.closed()
    text = "\n".join(pm.render([]))
    assert 'request_total{direction="inbound"} 3' in text
    assert 'response_total{direction="inbound",status_code="200",classification="success"' in text
    assert 'tcp_read_bytes_total{direction="inbound",peer="src"} 9000' in text
    # Closed and then idle: now they go.
    now[0] += 1300
    list(pm.render([]))
    text = "\n".join(pm.render([]))
    assert "request_total{" not in text and "tcp_read_bytes_total{" not in text


def test_open_connection_bytes_count_before_close() -> None:
    pm = ProxyMetrics()

    class Leg:
        rx, tx = 0, 0
        metrics = pm.connection('direction="inbound",peer="src"')
        accounting = None

    leg = Leg()
    leg.rx, leg.tx = 100, 40
    text = "\n".join(pm.render([leg]))
    assert 'tcp_read_bytes_total{direction="inbound",peer="src"} 100' in text
    assert 'tcp_open_connections{direction="inbound",peer="src"} 1' in text
    leg.metrics.closed(leg.rx, leg.tx, "")
    text = "\n".join(pm.render([]))
    assert 'tcp_read_bytes_total{direction="inbound",peer="src"} 100' in text
    assert 'tcp_close_total{direction="inbound",peer="src",errno=""} 1' in text
    assert 'tcp_open_connections{direction="inbound",peer="src"} 0' in text


def test_open_connections_requests_count_before_close() -> None:
    # The compiled accounting keeps totals in C until drained: a scrape drains the live legs.
    pm = ProxyMetrics()
    acct = new_accounting(pm.http('direction="inbound"'))

    class Leg:
        rx, tx, metrics = 0, 0, None
        tap: Any = None
        accounting: Any = None

    client, server = Leg(), Leg()
    acct.attach(client, server)
    for _ in range(3):
        client.tap(b"GET / HTTP/1.1\r\n\r\n")
        server.tap(b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n")
    text = "\n".join(pm.render([client, server]))
    assert 'request_total{direction="inbound"} 3' in text
    assert 'response_total{direction="inbound",status_code="503",classification="failure"' in text
    assert 'response_latency_ms_count{direction="inbound",status_code="503"} 3' in text
    acct.closed()
    text = "\n".join(pm.render([]))
    assert 'request_total{direction="inbound"} 3' in text  # drained once, not twice


def test_stat_snapshots_include_open_connections_requests() -> None:
    pm = ProxyMetrics()
    base = 'direction="inbound",tls="true",client_id="web.shop.serviceaccount.identity.linkerd.cluster.local"'
    acct = new_accounting(pm.http(base))

    class Leg:
        rx, tx, metrics = 0, 0, None
        tap: Any = None
        accounting: Any = None

    legs = [Leg(), Leg()]
    acct.attach(*legs)
    now = [0.0]
    window = StatWindow(pm, clock=lambda: now[0], settle=lambda: pm.settle(legs))
    for status in (200, 200, 502):
        legs[0].tap(b"GET / HTTP/1.1\r\n\r\n")
        legs[1].tap(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % status)
    now[0] = 10.0
    (row,) = window.query(60)  # the connection is still open: its counts were drained for this
    assert (row["requests"], row["success_rate"]) == (3, 2 / 3)


def test_linkerd_latency_buckets() -> None:
    assert LATENCY_BOUNDS_MS[:6] == (1, 2, 3, 4, 5, 10) and LATENCY_BOUNDS_MS[-1] == 50000
    assert len(LATENCY_BOUNDS_MS) == 25


def test_linkerd_tls_and_destination_labels() -> None:
    assert pmod.tls_accept(None, False, opaque=True) == 'tls="opaque"'  # no sni label: unbounded
    assert pmod.tls_accept(None, False, reason="port_skipped") == (
        'tls="no_identity",no_tls_reason="port_skipped"'
    )
    assert pmod.tls_accept(None, False) == 'tls="no_identity",no_tls_reason="no_tls_from_remote"'
    assert pmod.dst_labels("spiffe://cluster.local/ns/shop/sa/legacy") == (
        'dst_namespace="shop",dst_serviceaccount="legacy"'
    )
    assert pmod.dst_labels("spiffe://cluster.local/workload/x") == ""


def test_stat_window_is_not_thrown_by_a_series_dropped_as_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: now[0])
    pm = ProxyMetrics()
    http = pm.http('direction="inbound",tls="true",client_id="web"')
    one_ms = [1] + [0] * len(LATENCY_BOUNDS_MS)
    http.add(200, 5, [5] + [0] * len(LATENCY_BOUNDS_MS), 5.0)
    http.add(500, 1, one_ms, 1.0)
    list(pm.render([]))
    window = StatWindow(pm, clock=lambda: now[0])
    now[0] += 650
    http.add(500, 1, one_ms, 1.0)
    window.snapshot()  # the window's start: 5 successes, 2 failures
    list(pm.render([]))  # the 200 series, idle for 650 s, is dropped here
    assert not any('status_code="200"' in key for key in pm.response_total.children)
    now[0] += 10
    http.add(500, 2, [2] + [0] * len(LATENCY_BOUNDS_MS), 2.0)
    (row,) = window.query(10)
    assert (row["requests"], row["success_rate"], row["rps"]) == (2, 0.0, 0.2)
    assert row["latency_p99_ms"] is not None and row["latency_p99_ms"] <= 1
