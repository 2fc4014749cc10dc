"""`meshagent stat --routes` (issue #21): the window over the route families computed as
`linkerd viz stat-outbound` does, a route's counts surviving an idle drop, the CLI's table and
JSON, and `meshagent check`'s warning for rejected route entries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from agent.check import routes_result
from agent.cli import stat as stat_cli
from agent.telemetry import metrics as m
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.stat import StatWindow


@dataclass(frozen=True)
class Ref:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section: str = ""


PARENT = Ref("meshagent.io", "Host", "shop", "web-v1", 8080)
DEFAULT = Ref("", "default", "", "http")
ROUTE = Ref("gateway.networking.k8s.io", "HTTPRoute", "shop", "api")
V1 = Ref("meshagent.io", "Host", "shop", "web-v1", 8080)
V2 = Ref("meshagent.io", "Host", "shop", "web-v2", 8080)


def test_route_rows_as_viz_stat_outbound() -> None:
    now = [1000.0]
    pm = ProxyMetrics()
    window = StatWindow(pm, clock=lambda: now[0])
    rm = pm.routes
    # Before the window: not counted.
    rm.route(PARENT, DEFAULT).done(200, None, 0.01)
    now[0] += 30
    window.snapshot()
    now[0] += 10
    route = rm.route(PARENT, DEFAULT)
    for _ in range(16):
        route.done(200, None, 0.01)
    route.done(503, None, 0.3)
    route.done(None, "REQUEST_TIMEOUT", 2.0)
    route.done(None, "FAIL_FAST", 0.001)
    route.done(None, "RESPONSE_HEADERS_TIMEOUT", 0.7)
    for _ in range(5):
        route.retry_request()
    for backend, status, n in ((V1, 200, 14), (V2, 200, 2), (V2, 503, 4)):
        series = rm.backend(PARENT, DEFAULT, backend)
        for _ in range(n):
            series.request()
            series.done(status, None, 0.02)
    rm.route(PARENT, ROUTE).done(200, None, 0.2)
    rows = window.query_routes(10)
    assert [(r["parent"], r["type"], r["route"], r["backend"]) for r in rows] == [
        ("Host shop/web-v1:8080", "HTTPRoute", "shop/api", None),
        ("Host shop/web-v1:8080", "default", "[default]", None),
        ("Host shop/web-v1:8080", "default", "[default]", "Host shop/web-v1:8080"),
        ("Host shop/web-v1:8080", "default", "[default]", "Host shop/web-v2:8080"),
    ]
    default, v1, v2 = rows[1], rows[2], rows[3]
    assert default["requests"] == 20
    assert default["success_rate"] == 16 / 20  # 5xx or any error is a failure
    assert default["rps"] == pytest.approx(2.0)
    assert default["timeouts"] == 2 / 20  # REQUEST_TIMEOUT and RESPONSE_HEADERS_TIMEOUT
    assert default["retries"] == 5 / 25  # retries / (successes + failures + retries)
    # 17 of 20 in the first bucket (≤ 50 ms; FAIL_FAST too): histogram_quantile, Linkerd's bounds.
    assert default["latency_p50_ms"] == pytest.approx(50 * 10 / 17)
    assert default["latency_p99_ms"] == pytest.approx(1000 + 9000 * (19.8 - 19) / 1)
    assert (v1["requests"], v1["success_rate"], v1["retries"]) == (14, 1.0, None)
    assert (v2["requests"], v2["success_rate"]) == (6, 2 / 6)
    assert v2["latency_p50_ms"] == pytest.approx(12.5)  # all in the first bucket (≤ 25 ms): its middle


def test_route_counts_survive_an_idle_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(m.time, "monotonic", lambda: clock[0])
    pm = ProxyMetrics()
    window = StatWindow(pm, clock=lambda: clock[0])
    pm.routes.route(PARENT, DEFAULT).done(200, None, 0.01)
    window.snapshot()  # start: 1 request
    clock[0] += 10
    pm.routes.route(PARENT, DEFAULT).done(200, None, 0.01)
    for family in pm.routes.families():
        family.sweep()  # marks the moved values in use
    clock[0] += 700  # idle past retain_idle_s: the children are dropped
    for family in pm.routes.families():
        family.sweep()
    assert pm.routes.request_statuses.children == {}
    rows = window.query_routes(705)
    assert rows[0]["requests"] == 1  # the request after the window's start, not lost with its child


def _run(monkeypatch: pytest.MonkeyPatch, reply: dict[str, Any], *args: str) -> Any:
    monkeypatch.setattr(stat_cli, "admin_get", lambda port, path: (200, json.dumps(reply).encode()))
    return CliRunner().invoke(stat_cli.stat_cmd, ["--routes", *args])


def test_cli_table_and_json(monkeypatch: pytest.MonkeyPatch) -> None:
    pm = ProxyMetrics()
    window = StatWindow(pm)
    pm.routes.route(PARENT, DEFAULT).done(200, None, 0.01)
    pm.routes.backend(PARENT, DEFAULT, V2).done(200, None, 0.01)
    reply = {"window_s": 60, "rows": [], "routes": window.query_routes(60)}
    table = _run(monkeypatch, reply)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == [
        "SERVICE", "ROUTE", "TYPE", "BACKEND", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99",
        "TIMEOUTS", "RETRIES",
    ]  # fmt: skip
    assert lines[1].split()[:5] == ["Host", "shop/web-v1:8080", "[default]", "default", "100.00%"]
    assert "└─► Host shop/web-v2:8080" in lines[2]
    as_json = _run(monkeypatch, reply, "--json")
    assert json.loads(as_json.output)["rows"] == reply["routes"]
    old = _run(monkeypatch, {"window_s": 60, "rows": []})
    assert old.exit_code != 0 and "does not report routes" in str(old.exception)


def test_check_warns_on_rejected_route_entries() -> None:
    assert routes_result(None).ok
    fine = routes_result({"routes": {"parents": 2, "rejected_count": 0, "rejected": []}})
    assert fine.ok and not fine.warning and "2 destination(s)" in fine.detail
    bad = routes_result(
        {
            "routes": {
                "parents": 1,
                "rejected_count": 2,
                "rejected": [{"where": "routes[3]", "reason": "no parent"}],
            }
        }
    )
    assert bad.ok and bad.warning
    assert "2 route entries" in bad.detail and "routes[3]: no parent" in bad.detail
    assert "route show" in bad.hint
    assert not routes_result({"catalog": {}}).warning


class _Router:
    def status(self) -> dict[str, Any]:
        breakers = [
            {"parent": "p", "backend": "b", "endpoint": f"198.18.0.{i}:80", "state": "shut"}
            for i in range(150)
        ]
        return {
            "parents": 2,
            "connections": 7,
            "breakers": breakers,
            "budgets": [{"parent": "p", "balance": 3.0}],
        }


class _Table:
    def parents(self) -> tuple[int, ...]:
        return (1, 2, 3)


def test_status_routes_section() -> None:
    from types import SimpleNamespace

    from agent.proxy.directory import Rejected
    from agent.status import routes_status

    rejected = [Rejected("catalog[0]", "x", "bad"), Rejected("routes[4].routes[0]", "y", "no rules")]
    d: Any = SimpleNamespace(
        state=SimpleNamespace(rejected=rejected), proxy=SimpleNamespace(router=_Router())
    )
    doc = routes_status(d)
    assert doc["parents"] == 2 and doc["connections"] == 7
    assert doc["rejected_count"] == 1 and doc["rejected"][0]["where"] == "routes[4].routes[0]"
    assert len(doc["breakers"]) == 100 and doc["breakers_count"] == 150  # bounded, counted
    assert doc["budgets"] == [{"parent": "p", "balance": 3.0}]
    # A worker pool: no router in this process, the table it broadcast.
    d.proxy = SimpleNamespace(routes=_Table())
    assert routes_status(d)["parents"] == 3
    d.proxy = None
    assert routes_status(d)["parents"] == 0
