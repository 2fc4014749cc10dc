"""`meshagent stat`: golden metrics from the running agent, like `linkerd viz stat`."""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import click

from agent.config import load_config
from agent.errors import MeshagentError

from .output import emit_json, table


class AgentUnreachable(MeshagentError):
    code = "agent_unreachable"


def admin_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """GET from the local agent's admin server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError as exc:
        raise AgentUnreachable(
            f"the agent's admin server on 127.0.0.1:{port} does not answer ({exc})",
            "is `meshagent run` running? (systemctl status meshagent)",
        ) from None
    finally:
        conn.close()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


@click.command("stat")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="MESHAGENT_CONFIG",
    help="Agent config file (for the admin port) [default: /etc/meshagent/agent.toml].",
)
@click.option(
    "--window",
    type=click.IntRange(5, 120),
    default=60,
    show_default=True,
    help="Seconds of history to compute rates and latencies over.",
)
@click.option(
    "--routes",
    is_flag=True,
    help="Per traffic-policy route and backend instead (as `linkerd viz stat-outbound`).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def stat_cmd(config: Path | None, window: int, routes: bool, as_json: bool) -> None:
    """Success rate, requests per second, latency percentiles and TCP connections, per direction
    and peer identity, over the last WINDOW seconds (HTTP/1 requests; TCP for everything).

    With --routes: per route of the traffic policy the agent enforces (parent, route, then one
    row per backend), success rate, RPS, latency percentiles (from Linkerd's coarse route
    buckets, as viz computes them), the share of timeouts and the retry rate."""
    port = load_config(config, required=config is not None).intercept.admin_port
    status, body = admin_get(port, f"/stat?window={window}")
    doc: dict[str, Any] = json.loads(body)
    if status != 200:
        raise MeshagentError(str(doc.get("error", f"admin server answered {status}")))
    if routes:
        _routes(doc, window, as_json)
        return
    if as_json:
        emit_json(doc)
        return
    rows = doc["rows"]
    if not rows:
        click.echo(f"no traffic through the agent in the last {window}s")
        return
    click.echo(
        table(
            [
                "DIRECTION",
                "PEER IDENTITY",
                "SUCCESS",
                "RPS",
                "LATENCY_P50",
                "LATENCY_P95",
                "LATENCY_P99",
                "TCP_CONN",
            ],
            [
                (
                    r["direction"],
                    r["peer_identity"],
                    _pct(r["success_rate"]),
                    f"{r['rps']:.1f}",
                    _ms(r["latency_p50_ms"]),
                    _ms(r["latency_p95_ms"]),
                    _ms(r["latency_p99_ms"]),
                    r["tcp_open_connections"],
                )
                for r in rows
            ],
        )
    )


def _routes(doc: dict[str, Any], window: int, as_json: bool) -> None:
    rows = doc.get("routes")
    if rows is None:
        raise MeshagentError(
            "this agent does not report routes",
            "it predates traffic policy (#21): upgrade the agent, or use `meshagent stat`",
        )
    if as_json:
        emit_json({"window_s": doc.get("window_s", window), "rows": rows})
        return
    if not rows:
        click.echo(f"no routed requests in the last {window}s")
        return
    click.echo(
        table(
            [
                "SERVICE",
                "ROUTE",
                "TYPE",
                "BACKEND",
                "SUCCESS",
                "RPS",
                "LATENCY_P50",
                "LATENCY_P95",
                "LATENCY_P99",
                "TIMEOUTS",
                "RETRIES",
            ],
            [
                (
                    r["parent"] if r["backend"] is None else "",
                    r["route"] if r["backend"] is None else "",
                    r["type"] if r["backend"] is None else "",
                    "" if r["backend"] is None else f"└─► {r['backend']}",
                    _pct(r["success_rate"]),
                    f"{r['rps']:.1f}",
                    _ms(r["latency_p50_ms"]),
                    _ms(r["latency_p95_ms"]),
                    _ms(r["latency_p99_ms"]),
                    _pct(r["timeouts"]),
                    _pct(r["retries"]),
                )
                for r in rows
            ],
        )
    )
