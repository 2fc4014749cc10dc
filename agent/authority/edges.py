"""Who calls whom: the fleet's dependency edges, worked out by Prometheus from the agents' series.

Two views of the same traffic exist. A host's inbound series (`direction="inbound"`) carry
`client_id`, the caller's mesh identity ("" when the caller sent plain text: no TLS, no identity);
its outbound series carry `server_id`, the callee's ("" for a destination without mesh
identity). Prometheus adds the scraped host's `host_id`. So a call from one meshed host to
another is counted twice, once by each agent; an edge takes exactly one view:

- the callee's inbound view whenever the callee is an enrolled host: it sees every caller (other
  hosts, in-cluster pods, plain-text clients), its latency is the server's, and it is exact about
  which host answered (`host_id`), where the caller's view only knows the callee's identity,
  which several hosts may share;
- the caller's outbound view only when the callee is not an enrolled host (an in-cluster
  identity, or a destination without identity): no agent of ours sees the other side. "Is a
  host" is decided per call by the destination address (`target_ip`): an identity an enrolled
  host AND in-cluster pods serve (a service half migrated: two VMs and three pods under one
  ServiceAccount) gives two edges from a caller host, to the host(s) (their inbound view,
  `dst_host` set) and to the pods (the caller's view of the calls to other addresses,
  `dst_host` None). So a host's registered addresses must be the ones its callers dial (behind
  NAT they are not, and such calls are counted by both views).

`src_host` / `dst_host` are the host ids: exact from `host_id` for the side whose view is taken,
and resolved from the identity for the other side when exactly one enrolled host has it (an
unrevoked one first: a re-enrolled host leaves a revoked record of the same identity; None when
none or several do: the identity is still shown). One host's edges keep its calls seen only by
identity (several hosts share it, src_host None), marked `by_identity`. Plain-text callers of
a host are one edge per callee with src "" (their addresses are not labels, by design:
unbounded cardinality).

Traffic that is not HTTP (a database protocol, the app's own TLS) has no responses: such an edge
comes from the TCP series (`tcp_open_total` over the window, `tcp_open_connections` now) with
its connection count, no request rate, success rate or p99. A refused connection is an
attempt, and shows as one too (its caller's identity, if it had one, and no requests).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from agent.errors import ExitCode, MeshagentError
from agent.identity.names import WorkloadIdentity

from .prom_query import PromClient
from .slo import quote
from .storage import HostRecord


@dataclass(frozen=True)
class Edge:
    src: str  # the caller's mesh DNS identity (`client_id` / the caller host's), "" = no identity
    dst: str  # the callee's mesh DNS identity (`server_id` / the callee host's), "" = no identity
    src_host: str | None  # host ids, when the identity is an enrolled host's
    dst_host: str | None
    requests: float  # responses over the window (Prometheus's increase: extrapolated, not integral)
    rps: float
    success_rate: float | None  # None: no responses in the window (not HTTP, or idle)
    p99_ms: float | None  # None: no response timed in the window
    connections: float = 0.0  # TCP connections opened over the window (HTTP or not)
    # One host's edges only: the caller is that host by identity alone (src_host None: other
    # hosts share the identity, so some of these calls may be theirs)
    by_identity: bool = False

    def to_doc(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "src_host": self.src_host,
            "dst_host": self.dst_host,
            "requests": self.requests,
            "rps": self.rps,
            "success_rate": self.success_rate,
            "p99_ms": self.p99_ms,
            "connections": self.connections,
            "by_identity": self.by_identity,
        }


class WindowInvalid(MeshagentError):
    code = "window_invalid"
    exit_code = ExitCode.USAGE


_WINDOW = re.compile(r"([1-9][0-9]{0,5})(s|m|h|d)")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S: Final = 7 * 86400


def window_seconds(window: str) -> int:
    """Seconds in a window written as Prometheus writes ranges (30s, 5m, 1h, 2d): 10 s .. 7 d."""
    m = _WINDOW.fullmatch(window)
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if not 10 <= seconds <= MAX_WINDOW_S:
        raise WindowInvalid(
            f"window {window!r} is not a duration from 10s to 7d",
            "write it as Prometheus does: 30s, 5m, 1h, 1d",
        )
    return seconds


def dns_identity(trust_domain: str, mesh: str) -> Callable[[HostRecord], str]:
    """`identity_of` for `edges`: a host's identity (the registry keeps NAMESPACE/NAME) in the DNS
    form metrics label peers with; "" for a row that names no identity (it matches no traffic)."""

    def of(host: HostRecord) -> str:
        try:
            return WorkloadIdentity.parse_short(host.identity, trust_domain, mesh).dns_name
        except MeshagentError:
            return ""

    return of


# (view's own host id, peer identity) -> value
_Key = tuple[str, str]
# (view's own host id, peer identity, destination address) -> value: the outbound view, where
# the address tells a call to a host from a call to a pod of the same identity
_AddrKey = tuple[str, str, str]


def _by(prom: PromClient, promql: str, peer: str, at: float) -> dict[_AddrKey, float]:
    out: dict[_AddrKey, float] = {}
    for labels, value in prom.query(promql, at):
        key = (labels.get("host_id", ""), labels.get(peer, ""), labels.get("target_ip", ""))
        out[key] = out.get(key, 0.0) + value
    return out


def _buckets(prom: PromClient, promql: str, peer: str, at: float) -> dict[_AddrKey, dict[float, float]]:
    out: dict[_AddrKey, dict[float, float]] = {}
    for labels, value in prom.query(promql, at):
        key = (labels.get("host_id", ""), labels.get(peer, ""), labels.get("target_ip", ""))
        try:
            le = float(labels.get("le", ""))  # "300", "300.0" (Prometheus 3), "+Inf"
        except ValueError:
            continue
        if math.isfinite(value):
            out.setdefault(key, {})[le] = value
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative `buckets` ({upper bound: rate}), so that
    buckets of several destinations can be summed first: linear interpolation inside the bucket
    the rank falls in (from 0 for the first one), the highest finite bound when it falls in +Inf;
    None without observations."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if not total > 0:
        return None
    rank = q * total
    below, start = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return start if len(bounds) > 1 else None
            if count == below:
                return bound
            return start + (bound - start) * (rank - below) / (count - below)
        below, start = count, bound
    return None


@dataclass(frozen=True)
class _Seen:
    requests: float
    ok: float
    p99: float | None
    connections: float


# Which transport leg carries the peer's identity: inbound, the connection the proxy accepted
# (`peer="src"`); outbound, the one it opened to the destination (`peer="dst"`).
_LEG: Final = {"inbound": "src", "outbound": "dst"}


def _view(
    prom: PromClient,
    direction: str,
    peer: str,
    window: str,
    at: float,
    skip: Callable[[_AddrKey], bool] | None = None,
    narrow: str = "",
) -> dict[_Key, _Seen]:
    """What one direction's series say per (host_id, peer identity) over `window`: responses,
    successes, p99, and TCP connections opened. A pair is seen if it had a response, opened a
    connection, or holds one open now (a quiet pool, or a protocol that is not HTTP). With `skip`,
    the series are read per destination address too, and those `skip` names are left out before
    the pair is summed (its p99 from the summed buckets, as histogram_quantile computes it).
    `narrow`: more matchers (`host_id="h-1"`), so one host's edges do not read the fleet's series."""
    # Only the meshed hosts' series (the discovery endpoint labels them host_id): the cluster's
    # own linkerd-proxies, scraped by the same Prometheus, write the same families without it.
    sel = f'direction="{direction}",host_id!=""' + (f",{narrow}" if narrow else "")
    leg = f'{sel},peer="{_LEG[direction]}"'

    def summed(of: Callable[[str], str], matchers: str, extra: str = "") -> str:
        """`sum by (host_id, peer)` of `of(matchers)`; with `skip`, by destination address too,
        but only for destinations with an identity (the only ones `skip` can name): one sample
        per host for all its calls outside the mesh, not one per address (S3, SaaS APIs:
        thousands of addresses behind DNS would overflow the answer's bound)."""
        if skip is None:
            return f"sum by (host_id, {peer}{extra}) ({of(matchers)})"
        with_id, without_id = of(matchers + f',{peer}!=""'), of(matchers + f',{peer}=""')
        named = f"sum by (host_id, {peer}, target_ip{extra}) ({with_id})"
        unnamed = f"sum by (host_id, {peer}{extra}) ({without_id})"
        return f"{named} or {unnamed}"  # disjoint label sets: `or` keeps both

    def increase(family: str) -> Callable[[str], str]:
        return lambda m: f"increase({family}{{{m}}}[{window}])"

    raw = {
        "total": summed(increase("response_total"), sel),
        "ok": summed(increase("response_total"), f'{sel},classification="success"'),
        "opened": summed(increase("tcp_open_total"), leg),
        "open": summed(lambda m: f"tcp_open_connections{{{m}}}", leg),
    }
    keep = skip or (lambda key: False)
    sums: dict[str, dict[_Key, float]] = {}
    for name, promql in raw.items():
        pairs: dict[_Key, float] = {}
        for (own, other, address), value in _by(prom, promql, peer, at).items():
            if not keep((own, other, address)):
                pairs[(own, other)] = pairs.get((own, other), 0.0) + value
        sums[name] = pairs
    hist: dict[_Key, dict[float, float]] = {}
    bucket_q = summed(lambda m: f"rate(response_latency_ms_bucket{{{m}}}[{window}])", sel, ", le")
    for (own, other, address), buckets in _buckets(prom, bucket_q, peer, at).items():
        if keep((own, other, address)):
            continue
        into = hist.setdefault((own, other), {})
        for le, value in buckets.items():
            into[le] = into.get(le, 0.0) + value
    total, ok, opened, still_open = sums["total"], sums["ok"], sums["opened"], sums["open"]
    out: dict[_Key, _Seen] = {}
    for key in {*total, *opened, *still_open}:
        n, conns = total.get(key, 0.0), opened.get(key, 0.0)
        if not (n > 0 or conns > 0 or still_open.get(key, 0.0) > 0):
            continue  # idle series (nothing in the window) are no edge
        q = quantile(0.99, hist.get(key, {})) if n > 0 else None
        out[key] = _Seen(n, ok.get(key, 0.0), q if q is not None and math.isfinite(q) else None, conns)
    return out


def _address(text: str) -> str:
    """An address as one text: IPv4-mapped IPv6 (a dual-stack socket's view) as IPv4, IPv6
    compressed; anything else as given."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped if mapped is not None else ip)


def edges(
    prom: PromClient,
    hosts: Sequence[HostRecord],
    identity_of: Callable[[HostRecord], str],
    window: str = "5m",
    host_id: str | None = None,
) -> list[Edge]:
    """Every edge with traffic in the last `window` (responses, connections opened, or
    connections open now; the module says which view counts each),
    sorted by (src, dst); with `host_id`, those into or out of that host. `hosts`: the enrolled
    hosts (revoked ones included: their past traffic is still theirs)."""
    seconds = window_seconds(window)
    at = time.time()  # every query of one answer evaluated at the same instant
    by_identity: dict[str, list[HostRecord]] = {}
    for host in hosts:
        by_identity.setdefault(identity_of(host), []).append(host)

    def host_of(identity: str) -> str | None:
        """The one host with `identity`: among unrevoked hosts first (a host re-enrolled under
        its old identity leaves a revoked record behind), else among all."""
        every = by_identity.get(identity, []) if identity else []
        live = [h for h in every if not h.revoked]
        one = live if live else every
        return one[0].id if len(one) == 1 else None

    def edge(src: str, dst: str, src_host: str | None, dst_host: str | None, seen: _Seen) -> Edge:
        n = seen.requests
        # min: a scrape landing between the total's and the successes' query could tip it over 1
        success = min(1.0, seen.ok / n) if n > 0 else None
        return Edge(src, dst, src_host, dst_host, n, n / seconds, success, seen.p99, seen.connections)

    known = {host.id: identity_of(host) for host in hosts}
    # (identity, address) of every live host: an outbound call there was counted by that host's
    # inbound view; a call to the same identity at another address went to an in-cluster pod
    # of the same service (a half-migrated one), which no agent of ours sees from the other side
    served = {(identity_of(h), _address(a)) for h in hosts if not h.revoked for a in h.addresses}

    def to_a_host(key: _AddrKey) -> bool:
        return bool(key[1]) and (key[1], _address(key[2])) in served

    # One host's edges read only its own series and its callees' inbound series naming its
    # identity (its calls to other hosts), not the fleet's.
    inbound: dict[_Key, _Seen] = {}
    outbound_narrow = ""
    mine = ""
    if host_id is None:
        inbound = _view(prom, "inbound", "client_id", window, at)
    else:
        one = f"host_id={quote(host_id)}"
        outbound_narrow = one
        inbound = _view(prom, "inbound", "client_id", window, at, narrow=one)
        mine = next((identity_of(h) for h in hosts if h.id == host_id), "")
        if mine:
            calls = _view(prom, "inbound", "client_id", window, at, narrow=f"client_id={quote(mine)}")
            inbound.update(calls)
    found: list[Edge] = []
    for (callee, client), view in inbound.items():
        found.append(edge(client, known.get(callee, ""), host_of(client), callee or None, view))
    outbound = _view(prom, "outbound", "server_id", window, at, to_a_host, narrow=outbound_narrow)
    for (caller, server), view in outbound.items():
        found.append(edge(known.get(caller, ""), server, caller or None, None, view))
    if host_id is not None:
        # A call the callee saw from this host's identity when other hosts share it (src_host
        # None) is kept, marked: dropping it would hide the host's calls to other hosts.
        found = [
            e if host_id in (e.src_host, e.dst_host) else dataclasses.replace(e, by_identity=True)
            for e in found
            if host_id in (e.src_host, e.dst_host) or (e.src_host is None and bool(mine) and e.src == mine)
        ]
    return sorted(found, key=lambda e: (e.src, e.dst, e.src_host or "", e.dst_host or ""))
