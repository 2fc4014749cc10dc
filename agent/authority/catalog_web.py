"""The service catalog's web page (issue #20): the fleet as a list and a dependency graph, and a
page per host (its card, edges, budget burn chart, changes), plus the same documents as JSON.

Server-rendered HTML: every value that comes from a user (metadata, host names, event details,
the URL) goes through `esc` (html.escape), and links are written only for http(s) URLs. The
graph and the chart are SVG drawn here (a deterministic circle layout), so the page needs no
build tool; its one script (node highlighting) and its stylesheet are static routes, so a strict
Content-Security-Policy (`default-src 'self'`, no inline script or style) holds.

Who may read it: the holder of the Prometheus discovery token (agent/authority/discovery.py), as
a bearer header or through the login form, which sets a cookie holding an HMAC of the token (not
the token): rotating the token logs every browser out. Prometheus is queried in the API's
registry threads (`blocking`), never on the event loop, with a short timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from agent.errors import MeshagentError, RejectedError
from agent.logs import get_logger

from . import discovery, service_catalog, slo
from .prom_query import PromClient, resolve_url
from .service import Authority

log = get_logger("meshagent.authority.catalog_web")

_R = TypeVar("_R")
Blocking = Callable[..., Awaitable[Any]]
Handler = Callable[[Request], Awaitable[Response]]

PROM_TIMEOUT_S = 3.0  # the page waits at most this long per Prometheus query (and stops at the first failure)
COOKIE = "meshagent_catalog"
COOKIE_MAX_AGE_S = 12 * 3600
MAX_LOGIN_BODY = 4096
CHART_SPAN_S = 24 * 3600
CHART_STEP_S = 600
RENDER_SLOTS = 2  # of the API's REGISTRY_THREADS (8)
HOST_ROUTE = "/v1/catalog/hosts/{host_id}"  # (the metrics count requests by route, not per host)

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def esc(value: object) -> str:
    return escape(str(value), quote=True)


# --- who may read it ----------------------------------------------------------------------------


def _token(directory: Path) -> str:
    try:
        return discovery.token_path(directory).read_text().strip()
    except FileNotFoundError:
        return ""


def session_value(token: str, expires: int) -> str:
    """The cookie's value: when it ends and a MAC of that under the discovery token, so the
    cookie never holds the token, is worthless once the token is rotated, and a copied cookie
    stops working when it ends (the browser's Max-Age alone would not stop a copy)."""
    mac = hmac.new(token.encode(), f"meshagent catalog session v2|{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def session_is_valid(cookie: str, token: str, now: float) -> bool:
    """Whether `cookie` is a session this token made that has not ended."""
    expires_text, _, _ = cookie.partition(".")
    if not token or not (expires_text.isascii() and expires_text.isdigit()) or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    return now < expires and hmac.compare_digest(cookie.encode(), session_value(token, expires).encode())


def authorize(directory: Path, request: Request) -> None:
    """Refuse (RejectedError) unless the request carries the discovery token (bearer) or the
    login's cookie."""
    header = request.headers.get("authorization", "")
    cookie = request.cookies.get(COOKIE, "")
    if header or not cookie:
        discovery.authorize(directory, header)  # (its refusals: discovery off, or wrong token)
        return
    if not session_is_valid(cookie, _token(directory), time.time()):
        raise RejectedError(
            "the catalog's session has ended (it is older than 12 hours, the discovery token was "
            "rotated, or the cookie is not ours)",
            code="unauthenticated",
            hint="log in again with the token in the authority directory's prometheus-token file",
        )


def _safe_next(value: str) -> str:
    """Where the login sends the browser: a catalog page of this origin, nothing else."""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith("/catalog") or "\\" in value:
        return "/catalog"
    return value


# --- pages -------------------------------------------------------------------------------------


def _page(title: str, body: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    html = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} - meshagent catalog</title>"
        '<link rel="icon" href="/catalog/static/favicon.svg" type="image/svg+xml">'
        '<link rel="stylesheet" href="/catalog/static/catalog.css">'
        '<script src="/catalog/static/catalog.js" defer></script>'
        f"</head><body>{body}</body></html>\n"
    )
    return Response(
        html,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, **(headers or {})},
    )


def _header(logged_in: bool = True) -> str:
    logout = (
        '<form method="post" action="/catalog/logout" class="logout">'
        '<button type="submit">Log out</button></form>'
        if logged_in
        else ""
    )
    return f'<header><a href="/catalog" class="brand">meshagent service catalog</a>{logout}</header>'


def login_page(message: str, next_path: str = "/catalog", status: int = 401) -> Response:
    body = (
        _header(logged_in=False)
        + '<main class="login"><h1>Log in</h1>'
        + f'<p class="error" id="login-error">{esc(message)}</p>'
        + '<form method="post" action="/catalog/login">'
        + f'<input type="hidden" name="next" value="{esc(_safe_next(next_path))}">'
        + '<label for="token">Discovery token</label> '
        + '<input type="password" id="token" name="token" autocomplete="current-password" required>'
        + ' <button type="submit">Log in</button></form>'
        + "<p>The token is the one Prometheus uses: the <code>prometheus-token</code> file in the "
        + "authority's directory (<code>meshagent authority prometheus-token --dir DIR</code>).</p></main>"
    )
    return _page("Log in", body, status)


def error_page(status: int, message: str, hint: str = "") -> Response:
    body = (
        _header()
        + f'<main><h1>{status}</h1><p class="error" id="page-error">{esc(message)}</p>'
        + (f"<p>{esc(hint)}</p>" if hint else "")
        + "</main>"
    )
    return _page("Error", body, status)


def _prom_note(error: str | None) -> str:
    if not error:
        return ""
    return (
        '<p class="warn" id="prometheus-error">Edges and SLO budgets are unavailable: '
        f"{esc(error)}. Everything else below comes from the registry.</p>"
    )


def _time(value: str | None) -> str:
    return "-" if not value else esc(value[:19].replace("T", " ") + " UTC")


def _host_link(host_id: str | None, text: str) -> str:
    if not host_id:
        return esc(text)
    return f'<a href="/catalog/hosts/{quote(host_id, safe="")}">{esc(text)}</a>'


def _state(state: str) -> str:
    return f'<span class="state state-{esc(state)}">{esc(state.replace("_", " "))}</span>'


def fleet_html(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["hosts"]:
        h = r["host"]
        last = r["last_change"]
        rows.append(
            f'<tr data-host="{esc(h["id"])}">'
            f"<td>{_host_link(h['id'], h['host_name'])}</td>"
            f'<td class="owner">{esc(r["owner_team"] or "-")}</td>'
            f"<td>{esc(r['tier'] or '-')}</td>"
            f"<td>{_state(r['state'])}</td>"
            f'<td class="slo slo-{esc(r["slo_status"])}">{esc(r["slo_status"].replace("_", " "))}</td>'
            f'<td class="budget">{esc(service_catalog.percent(r["budget_remaining"]))}</td>'
            f"<td>{'-' if last is None else _time(last['at']) + ' ' + esc(last['kind'])}</td></tr>"
        )
    table = (
        '<table id="hosts"><thead><tr><th>Host</th><th>Owner</th><th>Tier</th><th>State</th>'
        "<th>SLO</th><th>Budget left (lowest)</th><th>Last change</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="7">No hosts enrolled yet.</td></tr>')
        + "</tbody></table>"
    )
    return (
        _header()
        + "<main><h1>Service catalog</h1>"
        + _prom_note(doc["prometheus_error"])
        + f"<section><h2>Hosts ({len(doc['hosts'])})</h2>{table}</section>"
        + "<section><h2>Dependencies</h2>"
        + graph_svg(doc)
        + '<p class="note">Who calls whom over the last 5 minutes, '
        + "from the agents' metrics in Prometheus.</p>"
        + "</section></main>"
    )


def _label(identity: str, names: Sequence[str]) -> str:
    if names:
        return ", ".join(names)
    if not identity:
        return "(no identity)"
    parts = identity.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else identity


def graph_svg(doc: dict[str, Any]) -> str:
    """The dependency graph: nodes on a circle (sorted by identity, so the same fleet draws the
    same picture), an arrow per edge. Nodes carry data-node=<identity>, edges data-src/data-dst."""
    nodes = doc["nodes"]
    names = {r["host"]["id"]: r["host"]["host_name"] for r in doc["hosts"]}
    n = len(nodes)
    if n == 0:
        return (
            '<svg id="graph" class="graph" viewBox="0 0 400 60" width="400" height="60" role="img" '
            'aria-label="no dependencies"><text x="10" y="35">No hosts or edges yet.</text></svg>'
        )
    radius = 0 if n == 1 else max(120.0, 40.0 * n / math.pi)
    size = 2 * radius + 240
    center = size / 2
    pos: dict[str, tuple[float, float]] = {}
    parts = []
    for i, node in enumerate(nodes):
        angle = 2 * math.pi * i / n - math.pi / 2
        pos[node["identity"]] = (center + radius * math.cos(angle), center + radius * math.sin(angle))
    node_r = 14.0
    for e in doc["edges"]:
        (x1, y1), (x2, y2) = pos[e["src"]], pos[e["dst"]]
        title = (
            f"{_label(e['src'], [])} -> {_label(e['dst'], [])}: {service_catalog.rate_text(e)}, "
            f"success {service_catalog.percent(e['success_rate'], 2)}"
        )
        if (x1, y1) == (x2, y2):  # a workload calling itself: a loop above its node
            shape = (
                f'<path d="M{x1 - 6:.1f},{y1 - node_r:.1f} C{x1 - 30:.1f},{y1 - 60:.1f} '
                f'{x1 + 30:.1f},{y1 - 60:.1f} {x1 + 6:.1f},{y1 - node_r:.1f}" marker-end="url(#arrow)"/>'
            )
        else:
            d = math.hypot(x2 - x1, y2 - y1)
            ux, uy = (x2 - x1) / d, (y2 - y1) / d
            shape = (
                f'<line x1="{x1 + ux * node_r:.1f}" y1="{y1 + uy * node_r:.1f}" '
                f'x2="{x2 - ux * (node_r + 4):.1f}" y2="{y2 - uy * (node_r + 4):.1f}" '
                'marker-end="url(#arrow)"/>'
            )
        parts.append(
            f'<g class="edge" data-src="{esc(e["src"])}" data-dst="{esc(e["dst"])}">'
            f"<title>{esc(title)}</title>{shape}</g>"
        )
    for node in nodes:
        x, y = pos[node["identity"]]
        hosts = node["hosts"]
        label = _label(node["identity"], [names.get(h, h) for h in hosts])
        kind = "host" if hosts else "workload"
        circle = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{node_r:.0f}"/>'
        text = f'<text x="{x:.1f}" y="{y + node_r + 16:.1f}" text-anchor="middle">{esc(label)}</text>'
        inner = f"<title>{esc(node['identity'] or '(no identity)')}</title>{circle}{text}"
        if len(hosts) == 1:
            inner = f'<a href="/catalog/hosts/{quote(hosts[0], safe="")}">{inner}</a>'
        parts.append(
            f'<g class="node {kind}" data-node="{esc(node["identity"])}" '
            f'data-hosts="{esc(" ".join(hosts))}">{inner}</g>'
        )
    return (
        f'<svg id="graph" class="graph" viewBox="0 0 {size:.0f} {size:.0f}" width="{size:.0f}" '
        f'height="{size:.0f}" role="img" aria-label="dependency graph">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>'
        + "".join(parts)
        + "</svg>"
    )


def _links(links: Any) -> str:
    items = []
    for link in links or []:
        title, url = (link.get("title", ""), link.get("url", "")) if isinstance(link, dict) else link
        if urlsplit(str(url)).scheme in ("http", "https"):
            items.append(f'<a href="{esc(url)}" rel="noopener noreferrer">{esc(title)}</a>')
        else:  # (parse_meta takes http(s) only; anything else is shown, never linked)
            items.append(f"{esc(title)}: {esc(url)}")
    return ", ".join(items) or "-"


def _edges_table(edges: list[dict[str, Any]], peer: str, table_id: str) -> str:
    if not edges:
        return f'<p id="{table_id}" class="note">None seen.</p>'
    rows = "".join(
        f'<tr data-src="{esc(e["src"])}" data-dst="{esc(e["dst"])}">'
        f"<td>{_host_link(e[peer + '_host'], e[peer] or '(no identity)')}</td>"
        f"<td>{esc(service_catalog.rate_text(e))}</td>"
        f"<td>{esc(service_catalog.connections_text(e))}</td>"
        f"<td>{esc(service_catalog.percent(e['success_rate'], 2))}</td>"
        f"<td>{'-' if e['p99_ms'] is None else esc(format(e['p99_ms'], 'g')) + ' ms'}</td></tr>"
        for e in edges
    )
    return (
        f'<table id="{table_id}"><thead><tr><th>Peer</th><th>Rate</th><th>Connections</th>'
        "<th>Success</th><th>p99</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _budgets(doc: dict[str, Any], charts: dict[str, list[tuple[float, float]]]) -> str:
    slos = doc["meta"].get("slos") or []
    if not slos:
        return (
            '<p class="note">No SLOs set '
            "(<code>meshagent authority host set HOST --slo availability=99.9</code>).</p>"
        )
    by_name = {b["slo"]["name"]: b for b in doc["budgets"]}
    out = []
    for s in slos:
        b = by_name.get(s["name"])
        cells = (
            [
                service_catalog.percent(b["sli"], 3),
                service_catalog.percent(b["remaining"]),
                "-" if b["burn_1h"] is None else f"{b['burn_1h']:.2f}x",
                "-" if b["burn_6h"] is None else f"{b['burn_6h']:.2f}x",
                service_catalog.duration_text(b["exhaustion_s"]),
                b["status"].replace("_", " "),
            ]
            if b
            else ["-", "-", "-", "-", "-", "unknown"]
        )
        out.append(
            f'<tr data-slo="{esc(s["name"])}"><td>{esc(service_catalog.slo_text(s))}</td>'
            + "".join(f"<td>{esc(c)}</td>" for c in cells)
            + "</tr>"
        )
    table = (
        '<table id="budgets"><thead><tr><th>SLO</th><th>SLI</th><th>Budget left</th><th>Burn 1h</th>'
        "<th>Burn 6h</th><th>Exhausted in</th><th>Status</th></tr></thead><tbody>"
        + "".join(out)
        + "</tbody></table>"
    )
    return table + "".join(chart_svg(name, points) for name, points in charts.items())


def chart_svg(name: str, points: list[tuple[float, float]]) -> str:
    """The budget burn rate over the last CHART_SPAN_S (1.0: spending the budget exactly over
    the SLO window; above it, faster)."""
    w, h, pad = 640.0, 160.0, 30.0
    head = (
        f'<figure class="chart" data-slo="{esc(name)}">'
        f"<figcaption>{esc(name)}: burn rate, last 24 h</figcaption>"
    )
    if not points:
        return head + '<p class="note">No data yet.</p></figure>'
    t0, t1 = points[0][0], points[-1][0]
    top = max(2.0, max(v for _, v in points) * 1.1)
    span = max(t1 - t0, 1.0)

    def xy(t: float, v: float) -> tuple[float, float]:
        return pad + (t - t0) / span * (w - 2 * pad), h - pad - min(v, top) / top * (h - 2 * pad)

    one = h - pad - 1.0 / top * (h - 2 * pad)
    at = [xy(t, v) for t, v in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in at)
    # A young host has a point or two, and a line needs two: few points are also drawn as dots.
    dots = "".join(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in at if len(at) < 3)
    return (
        head + f'<svg class="burn" viewBox="0 0 {w:.0f} {h:.0f}" width="{w:.0f}" height="{h:.0f}" role="img" '
        f'aria-label="{esc(name)} burn rate">'
        f'<line class="axis" x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}"/>'
        f'<line class="one" x1="{pad}" y1="{one:.1f}" x2="{w - pad}" y2="{one:.1f}"/>'
        f'<text x="2" y="{one + 4:.1f}">1x</text><text x="2" y="{pad:.1f}">{top:.1f}x</text>'
        f'<polyline class="series" points="{line}"/>{dots}</svg></figure>'
    )


def host_html(doc: dict[str, Any], charts: dict[str, list[tuple[float, float]]]) -> str:
    host, meta = doc["host"], doc["meta"]
    facts = [
        ("Owner", meta.get("owner_team") or "-", "owner"),
        ("Contact", meta.get("owner_contact") or "-", "contact"),
        ("Description", meta.get("description") or "-", "description"),
        ("System", meta.get("system") or "-", "system"),
        ("Tier", meta.get("tier") or "-", "tier"),
        ("Identity", host["identity"] or host["workload"], "identity"),
        ("Host id", host["id"], "host-id"),
        ("Addresses", ", ".join(host["addresses"]) or "-", "addresses"),
        ("Enrolled", _time(host["enrolled_at"]), "enrolled"),
    ]
    dl = "".join(
        f'<dt>{esc(k)}</dt><dd id="{key}">{v if key == "enrolled" else esc(v)}</dd>' for k, v, key in facts
    )
    state = f'<span class="state state-{esc(doc["state"])}">{esc(doc["state_text"] or doc["state"])}</span>'
    dl += f'<dt>State</dt><dd id="state">{state}</dd>'
    dl += f'<dt>Links</dt><dd id="links">{_links(meta.get("links"))}</dd>'
    changes = "".join(
        f'<tr data-kind="{esc(c["kind"])}"><td>{_time(c["at"])}</td><td>{esc(c["kind"])}</td>'
        f'<td>{esc(c["actor"])}</td><td class="detail">{esc(c["detail"])}</td></tr>'
        for c in doc["changes"]
    )
    changes_html = (
        '<table id="changes"><thead><tr><th>When</th><th>What</th><th>Who</th><th>Detail</th></tr></thead>'
        f"<tbody>{changes}</tbody></table>"
        if changes
        else '<p id="changes" class="note">None recorded.</p>'
    )
    return (
        _header()
        + f'<main><p><a href="/catalog">Fleet</a> / {esc(host["host_name"])}</p>'
        + f'<h1 id="host-name">{esc(host["host_name"])}</h1>'
        + _prom_note(doc["prometheus_error"])
        + f'<dl class="card">{dl}</dl>'
        + f"<section><h2>SLOs and error budget ({esc(doc['slo_status'])})</h2>"
        + f"{_budgets(doc, charts)}</section>"
        + "<section><h2>Called by</h2>"
        + _edges_table(doc["edges_in"], "src", "edges-in")
        + "</section><section><h2>Calls</h2>"
        + _edges_table(doc["edges_out"], "dst", "edges-out")
        + f"</section><section><h2>Recent changes</h2>{changes_html}</section></main>"
    )


# --- static files ------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2433; background: #f7f8fa; }
header { display: flex; justify-content: space-between; align-items: center; padding: 0.6em 1.2em;
  background: #1d2433; }
header a.brand { color: #fff; font-weight: 600; text-decoration: none; }
main { padding: 1em 1.5em; max-width: 1200px; }
table { border-collapse: collapse; background: #fff; margin: 0.5em 0 1em; }
th, td { border: 1px solid #d8dce3; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #eef0f4; }
.warn { background: #fff4d6; border: 1px solid #e6c35c; padding: 0.5em 0.8em; }
.error { color: #a11; }
.note { color: #5a6275; }
.state-healthy { color: #17702f; } .state-not_ready, .state-revoked { color: #a11; }
.state-silent, .state-expiring { color: #8a5a00; }
.slo-exhausted, .slo-burning { color: #a11; font-weight: 600; } .slo-ok { color: #17702f; }
dl.card { display: grid; grid-template-columns: max-content auto; gap: 0.3em 1em; background: #fff;
  padding: 0.8em; border: 1px solid #d8dce3; }
dt { font-weight: 600; } dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
td.detail { white-space: pre-wrap; overflow-wrap: anywhere; }
svg.graph { background: #fff; border: 1px solid #d8dce3; max-width: 100%; height: auto; }
.node circle { fill: #4a7bd0; stroke: #1d2433; } .node.workload circle { fill: #9aa3b5; }
.node text { font-size: 12px; fill: #1d2433; }
.edge line, .edge path { stroke: #5a6275; stroke-width: 1.5; fill: none; }
marker path { fill: #5a6275; }
.graph.focus .edge { opacity: 0.15; } .graph.focus .edge.lit { opacity: 1; }
.graph.focus .edge.lit line, .graph.focus .edge.lit path { stroke: #d0554a; stroke-width: 2.5; }
svg.burn { background: #fff; border: 1px solid #d8dce3; }
.burn .axis { stroke: #5a6275; } .burn .one { stroke: #e6a23c; stroke-dasharray: 4 3; }
.burn .series { fill: none; stroke: #d0554a; stroke-width: 2; } .burn .point { fill: #d0554a; }
.burn text { font-size: 10px; }
form.logout button { background: none; color: #fff; border: 1px solid #fff; cursor: pointer; }
.login input[type=password] { width: 24em; }
"""

# Hovering a node lights the edges that touch it (the only script: the page works without it).
JS = """
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var graph = document.getElementById("graph");
  if (!graph) { return; }
  var edges = graph.querySelectorAll("g.edge");
  graph.querySelectorAll("g.node").forEach(function (node) {
    var id = node.getAttribute("data-node");
    node.addEventListener("mouseenter", function () {
      graph.classList.add("focus");
      edges.forEach(function (e) {
        var lit = e.getAttribute("data-src") === id || e.getAttribute("data-dst") === id;
        e.classList.toggle("lit", lit);
      });
    });
    node.addEventListener("mouseleave", function () { graph.classList.remove("focus"); });
  });
});
"""

FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="4" cy="8" r="3" fill="#4a7bd0"/>'
    '<circle cx="12" cy="4" r="3" fill="#4a7bd0"/><circle cx="12" cy="12" r="3" fill="#4a7bd0"/></svg>'
)

STATIC = {
    "catalog.css": (CSS, "text/css; charset=utf-8"),
    "catalog.js": (JS, "text/javascript; charset=utf-8"),
    "favicon.svg": (FAVICON, "image/svg+xml"),
}


# --- the routes ----------------------------------------------------------------------------------


class CatalogWeb:
    """The catalog's routes: JSON (`/v1/catalog...`, errors as the API's) and pages (`/catalog...`)."""

    def __init__(
        self, authority: Authority, blocking: Blocking, refusals: Callable[[Handler, str], Handler]
    ) -> None:
        self.authority = authority
        self.directory = authority.material.directory
        self.blocking = blocking
        self.refusals = refusals
        # At most this many catalog renders hold registry threads at once: a page waits on
        # Prometheus (up to PROM_TIMEOUT_S a query), and the threads are the hosts' too.
        self._slots = asyncio.Semaphore(RENDER_SLOTS)

    def _prom(self) -> PromClient | None:
        url = resolve_url(self.directory)  # (read per request: `serve --prometheus` may record it later)
        return PromClient(url, timeout_s=PROM_TIMEOUT_S) if url else None

    # (These run in the registry threads: the registry and Prometheus are both waited on.)

    def _fleet_doc(self) -> dict[str, Any]:
        prom = self._prom()
        try:
            return service_catalog.fleet_doc(service_catalog.fleet_view(self.authority, prom))
        finally:
            if prom is not None:
                prom.close()

    def _card_doc(self, ref: str) -> dict[str, Any]:
        return self._card_and_charts(ref, charts=False)[0]

    def _card_and_charts(
        self, ref: str, charts: bool = True
    ) -> tuple[dict[str, Any], dict[str, list[tuple[float, float]]]]:
        prom = self._prom()
        try:
            card = service_catalog.host_card(self.authority, prom, ref)
            history: dict[str, list[tuple[float, float]]] = {}
            if charts and prom is not None and card.prometheus_error is None:
                for s in card.meta.slos:
                    try:
                        history[s.name] = slo.burn_history(prom, card.host.id, s, CHART_SPAN_S, CHART_STEP_S)
                    except MeshagentError as exc:
                        log.warning(
                            "catalog.chart_failed", host_id=card.host.id, slo=s.name, error=exc.message
                        )
                        break
            return service_catalog.card_doc(card), history
        finally:
            if prom is not None:
                prom.close()

    async def _render(self, fn: Callable[..., _R], *args: Any) -> _R:
        async with self._slots:
            result: _R = await self.blocking(fn, *args)
            return result

    # JSON ---------------------------------------------------------------------------------------

    async def api_fleet(self, request: Request) -> Response:
        authorize(self.directory, request)
        return JSONResponse(await self._render(self._fleet_doc), headers={"cache-control": "no-store"})

    async def api_host(self, request: Request) -> Response:
        authorize(self.directory, request)
        doc = await self._render(self._card_doc, request.path_params["host_id"])
        return JSONResponse(doc, headers={"cache-control": "no-store"})

    # pages --------------------------------------------------------------------------------------

    async def _guarded(self, request: Request, render: Callable[[], Awaitable[Response]]) -> Response:
        try:
            authorize(self.directory, request)
            return await render()
        except MeshagentError as exc:
            if exc.code == "unauthenticated":
                return login_page(exc.message, request.url.path)
            status = {"not_found": 404, "discovery_disabled": 404, "registry_unavailable": 503}.get(
                exc.code, 400
            )
            return error_page(status, exc.message, exc.hint)
        except Exception as exc:  # as the API's handlers: one log line, never a traceback per request
            log.error(
                "catalog.page_failed",
                path=request.url.path,
                error_type=type(exc).__name__,
                error=str(exc)[:200],
            )
            return error_page(500, "the authority failed to render this page", "see the authority's log")

    async def fleet_page(self, request: Request) -> Response:
        async def render() -> Response:
            return _page("Fleet", fleet_html(await self._render(self._fleet_doc)))

        return await self._guarded(request, render)

    async def host_page(self, request: Request) -> Response:
        async def render() -> Response:
            doc, charts = await self._render(self._card_and_charts, request.path_params["host_id"])
            return _page(doc["host"]["host_name"], host_html(doc, charts))

        return await self._guarded(request, render)

    async def login_form(self, request: Request) -> Response:
        return login_page("", request.query_params.get("next", "/catalog"), status=200)

    async def login(self, request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return error_page(413, "the login form is larger than it can be")
        try:
            form = parse_qs(body.decode(errors="replace"), max_num_fields=8)
        except ValueError:  # more fields than the form has
            return error_page(400, "the login form has fields it does not have")
        token = (form.get("token") or [""])[0].strip()
        next_path = _safe_next((form.get("next") or ["/catalog"])[0])
        try:
            discovery.authorize(self.directory, token)
        except MeshagentError as exc:
            log.info(
                "catalog.login_refused", code=exc.code, client=request.client.host if request.client else ""
            )
            if exc.code == "discovery_disabled":
                return error_page(404, exc.message, exc.hint)
            return login_page("That is not the authority's discovery token.", next_path)
        response = RedirectResponse(next_path, status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            session_value(token, int(time.time()) + COOKIE_MAX_AGE_S),
            max_age=COOKIE_MAX_AGE_S,
            path="/",
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/catalog/login", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    async def static(self, request: Request) -> Response:
        found = STATIC.get(request.path_params["name"])
        if found is None:
            return error_page(404, "no such file")
        text, media_type = found
        headers = {**SECURITY_HEADERS, "cache-control": "public, max-age=3600"}
        return Response(text, media_type=media_type, headers=headers)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/catalog", self.refusals(self.api_fleet, "/v1/catalog"), methods=["GET"]),
            Route("/v1/catalog/hosts/{host_id}", self.refusals(self.api_host, HOST_ROUTE), methods=["GET"]),
            Route("/catalog", self.fleet_page, methods=["GET"]),
            Route("/catalog/hosts/{host_id}", self.host_page, methods=["GET"]),
            Route("/catalog/login", self.login_form, methods=["GET"]),
            Route("/catalog/login", self.login, methods=["POST"]),
            Route("/catalog/logout", self.logout, methods=["POST"]),
            Route("/catalog/static/{name}", self.static, methods=["GET"]),
        ]
