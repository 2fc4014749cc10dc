"""linkerd-proxy's metric families, named, typed, labelled and bucketed as the proxy does, so
dashboards and queries written for Linkerd work for meshed hosts unchanged.

Facts from linkerd/linkerd2-proxy (linkerd/metrics/src/latency.rs, transport-metrics,
http/metrics, app/core/src/transport/labels.rs): latency buckets 1..50000 ms; transport label
sets per leg (`peer="src"` for accepted connections, `peer="dst"` for the proxy's own);
`tls="true",client_id=...` inbound and `tls="true",server_id=...` outbound, otherwise
`tls="no_identity",no_tls_reason=...`; classification `failure` for 5xx. Two families the
current proxy dropped but dashboards still query are kept: `tcp_connection_duration_ms` and
`identity_cert_expiration_timestamp_seconds` (alongside today's `control_identity_cert_*`).

Recording: a connection resolves its children once (`connection()`), then the relay only adds
integers; bytes of open connections are read from the live legs at scrape time, and the compiled
HTTP accounting's totals are drained from them then (`settle`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any, Final, Protocol, TypedDict

from .metrics import LABEL_CACHE_SIZE, Family, HistogramChild, join, labels
from .route_metrics import RouteMetrics

LATENCY_BOUNDS_MS: Final = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)  # fmt: skip


# linkerd's default gRPC failure codes (client-policy grpc::Codes::default): UNKNOWN,
# DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE, DATA_LOSS.
GRPC_FAILURES: Final = frozenset({2, 4, 7, 13, 14, 15})


# A worker's metrics as plain data (pickled to the supervisor, merged by agent/telemetry/merge.py):
# counters and gauges as (key, value), histograms as (key, bucket counts, sum, count).
CounterSample = tuple[str, float]
HistogramSample = tuple[str, list[int], float, int]


class FamilyDump(TypedDict):
    kind: str  # counter | gauge | histogram
    samples: list[Any]  # CounterSample | HistogramSample: every child the worker still has
    dropped: list[Any]  # children this dump's sweep dropped as idle, at their final value


MetricsDump = dict[str, FamilyDump]  # by family name


def sample(key: str, child: Any, extra: float = 0.0) -> CounterSample | HistogramSample:
    if isinstance(child, HistogramChild):
        return (key, list(child.counts), child.sum, child.count)
    return (key, child.value + extra)


class LiveLeg(Protocol):
    @property
    def rx(self) -> int: ...
    @property
    def tx(self) -> int: ...
    @property
    def metrics(self) -> Any: ...
    @property
    def accounting(self) -> Any: ...


@lru_cache(maxsize=LABEL_CACHE_SIZE)  # the same few per connection: see metrics.labels
def target(host: str, port: int) -> str:
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return labels(("target_addr", addr), ("target_ip", host), ("target_port", str(port)))


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def tls_accept(client_id: str | None, mtls: bool, opaque: bool = False, reason: str = "") -> str:
    """Server-side `tls` labels (inbound accepted connections, inbound HTTP). `opaque`: the app's
    own TLS (a ClientHello naming another server); `reason`: why there is no TLS, when it is not
    the remote's choice (`port_skipped`: detection is off there). Cached: every argument is one
    the agent chose or verified (never the remote's SNI: a cache would keep each one alive)."""
    if mtls:
        return labels(("tls", "true"), ("client_id", client_id or ""))
    if opaque:
        # The app's own TLS, passed through. linkerd adds `sni`: left out, as `authority` is,
        # because any client can put anything there and every value would be a new series.
        return labels(("tls", "opaque"))
    return labels(("tls", "no_identity"), ("no_tls_reason", reason or "no_tls_from_remote"))


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def tls_connect(server_id: str | None) -> str:
    """Client-side `tls` labels (outbound connections to destinations, outbound HTTP)."""
    if server_id:
        return labels(("tls", "true"), ("server_id", server_id))
    return labels(("tls", "no_identity"), ("no_tls_reason", "not_provided_by_service_discovery"))


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def server_labels(port: int, policy_name: str) -> str:
    """linkerd's `srv_*` labels on inbound series: a port's policy is a default Server."""
    server = (("srv_group", ""), ("srv_kind", "default"), ("srv_name", policy_name))
    return labels(*server, ("srv_port", str(port)))


# Every inbound request takes the one default route, as under linkerd's default policies.
DEFAULT_ROUTE = labels(("route_group", ""), ("route_kind", "default"), ("route_name", "default"))


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def authz_labels(rule: str, default_policy: bool) -> str:
    """linkerd's `authz_*` labels: a default policy (`authz_kind="default"`) or the allow-list
    entry that admitted the client (`authz_kind="allowlist"`, named by its pattern)."""
    kind = "default" if default_policy else "allowlist"
    return labels(("authz_group", ""), ("authz_kind", kind), ("authz_name", rule))


@lru_cache(maxsize=LABEL_CACHE_SIZE)
def dst_labels(spiffe_id: str) -> str:
    """linkerd's `dst_namespace` / `dst_serviceaccount` on outbound series, from the identity the
    catalog expects at the destination (`spiffe://TD/ns/NS/sa/NAME`); "" if it has another shape."""
    parts = spiffe_id.split("/")
    if len(parts) != 7 or parts[3] != "ns" or parts[5] != "sa":
        return ""
    return labels(("dst_namespace", parts[4]), ("dst_serviceaccount", parts[6]))


LOOPBACK = labels(("tls", "no_identity"), ("no_tls_reason", "loopback"))


class ConnMetrics:
    """One leg's transport children, resolved when the leg opens. The leg holds them (and its
    connection's `HttpMetrics`, if any) until it closes: `keep` tells the families they are in
    use, so a quiet but open connection's series are never dropped as idle."""

    __slots__ = ("base", "http", "opened", "opened_at", "owner", "read", "write")

    def __init__(self, owner: ProxyMetrics, base: str) -> None:
        self.owner = owner
        self.base = base
        self.opened_at = time.monotonic()
        self.opened = owner.tcp_open_total.child(base)
        self.opened.value += 1
        owner.tcp_open_connections.child(base).value += 1
        self.read = owner.tcp_read_bytes_total.child(base)
        self.write = owner.tcp_write_bytes_total.child(base)
        self.http: HttpMetrics | None = None

    def keep(self, now: float) -> None:
        """Mark every child this open connection will still update as in use (at scrape time)."""
        self.opened.touched = self.read.touched = self.write.touched = now
        if self.http is not None:
            self.http.keep(now)

    def closed(self, rx: int, tx: int, errno: str) -> None:
        o = self.owner
        self.read.value += rx
        self.write.value += tx
        o.tcp_open_connections.child(self.base).value -= 1
        with_errno = join(self.base, labels(("errno", errno)))
        o.tcp_close_total.child(with_errno).value += 1
        o.tcp_connection_duration_ms.child(with_errno).observe((time.monotonic() - self.opened_at) * 1000)


class HttpMetrics:
    """One connection's HTTP children. Status-dependent children are resolved once per status
    code the connection sees (a keep-alive connection pays the label work once, not per request).
    `authz` (inbound only) is the `inbound_http_authz_allow_total` child: the connection was
    authorized once, and linkerd counts every request it carries."""

    __slots__ = ("authz", "base", "by_status", "owner", "requests")

    def __init__(self, owner: ProxyMetrics, base: str, authz_key: str | None = None) -> None:
        self.owner = owner
        self.base = base
        self.requests = owner.request_total.child(base)
        self.authz = owner.http_authz_allow.child(authz_key) if authz_key is not None else None
        self.by_status: dict[int | tuple[int, int], tuple[Any, Any]] = {}

    def keep(self, now: float) -> None:
        self.requests.touched = now
        if self.authz is not None:
            self.authz.touched = now
        for response, latency in self.by_status.values():
            response.touched = now
            if latency is not None:
                latency.touched = now

    def _children(self, status: int, grpc: int | None = None) -> tuple[Any, Any]:
        """The response counter and latency histogram for `status` (none for 0), and for a gRPC
        response its `grpc` code, which classifies it instead, resolved once."""
        o = self.owner
        if status == 0:
            key = join(
                self.base,
                labels(("classification", "failure"), ("grpc_status", ""), ("error", "unclassified")),
            )
            children = o.response_total.child(key), None
        else:
            code = labels(("status_code", str(status)))
            if grpc is None:
                klass, grpc_status = ("failure" if 500 <= status <= 599 else "success"), ""
            else:
                klass, grpc_status = ("failure" if grpc in GRPC_FAILURES else "success"), str(grpc)
            response = o.response_total.child(
                join(
                    self.base,
                    code,
                    labels(("classification", klass), ("grpc_status", grpc_status), ("error", "")),
                )
            )
            children = response, o.response_latency_ms.child(join(self.base, code))
        self.by_status[status if grpc is None else (status, grpc)] = children
        return children

    def exchange(self, method: bytes, status: int, latency_s: float, grpc: int | None = None) -> None:
        """One finished exchange (the Python accountings' callback; the method is not a label;
        `grpc`: a gRPC response's status code)."""
        self.requests.value += 1
        if self.authz is not None:
            self.authz.value += 1
        key = status if grpc is None else (status, grpc)
        response, latency = self.by_status.get(key) or self._children(status, grpc)
        response.value += 1
        if latency is not None:  # HistogramChild.observe, inline: this runs for every request
            # Whole milliseconds, truncated, as linkerd records them (via nanoseconds: 1.001 - 1.0
            # is 0.00099999... in floats, and must still be 1 ms).
            ms = round(latency_s * 1e9) // 1_000_000
            latency.counts[bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
            latency.sum += ms
            latency.count += 1

    def add(self, status: int, count: int, buckets: list[int] | None, sum_ms: float) -> None:
        """`count` exchanges that ended with `status`, their latencies already bucketed (the
        compiled accounting's drain; buckets None for status 0)."""
        self.requests.value += count
        if self.authz is not None:
            self.authz.value += count
        response, latency = self.by_status.get(status) or self._children(status)
        response.value += count
        if latency is not None and buckets is not None:
            counts = latency.counts
            for i, n in enumerate(buckets):
                counts[i] += n
            latency.sum += sum_ms
            latency.count += count


class ProxyMetrics:
    def __init__(self) -> None:
        f = Family
        self.request_total = f("request_total", "Total count of HTTP requests.", "counter")
        self.response_total = f("response_total", "Total count of HTTP responses.", "counter")
        self.response_latency_ms = f(
            "response_latency_ms",
            "Elapsed times between a request's headers being received and its response stream completing",
            "histogram",
            LATENCY_BOUNDS_MS,
        )
        self.tcp_open_total = f("tcp_open_total", "Total count of opened connections", "counter")
        self.tcp_open_connections = f("tcp_open_connections", "Number of currently-open connections", "gauge")
        self.tcp_read_bytes_total = f(
            "tcp_read_bytes_total", "Total count of bytes read from peers", "counter"
        )
        self.tcp_write_bytes_total = f(
            "tcp_write_bytes_total", "Total count of bytes written to peers", "counter"
        )
        self.tcp_close_total = f("tcp_close_total", "Total count of closed connections", "counter")
        self.tcp_connection_duration_ms = f(
            "tcp_connection_duration_ms", "Connection lifetimes", "histogram", LATENCY_BOUNDS_MS
        )
        self.http_authz_allow = f(
            "inbound_http_authz_allow_total",
            "The total number of inbound HTTP requests that were authorized",
            "counter",
        )
        self.authz_allow = f(
            "inbound_tcp_authz_allow_total",
            "The total number of inbound TCP connections that were authorized",
            "counter",
        )
        self.authz_deny = f(
            "inbound_tcp_authz_deny_total",
            "The total number of inbound TCP connections that were denied",
            "counter",
        )
        self.tls_failures = f(
            "meshagent_tls_handshake_failures_total",
            "TLS handshakes that failed, by direction and reason",
            "counter",
        )
        self.refused = f(
            "meshagent_connections_refused_total",
            "Connections the proxy refused, by direction and reason (policy denials, direct-port "
            "and transport-header refusals, loops, handshake limits)",
            "counter",
        )
        self.revoked_closed = f(
            "meshagent_revoked_connections_closed_total",
            "Open connections the proxy closed because the authority revoked the peer, by direction",
            "counter",
            retain_idle_s=None,
        )
        self.tls_resumed = f(
            "meshagent_tls_resumed_total",
            "TLS handshakes that resumed a session (no certificate exchange), by direction",
            "counter",
            retain_idle_s=None,
        )
        self.cert_expiry = f(
            "identity_cert_expiration_timestamp_seconds",
            "Time when the this proxy's current mTLS identity certificate will expire "
            "(in seconds since the UNIX epoch).",
            "gauge",
            retain_idle_s=None,
        )
        self.control_cert_expiry = f(
            "control_identity_cert_expiration_timestamp_seconds",
            "Time when this proxy's current mTLS identity certificate will expire "
            "(in seconds since the UNIX epoch).",
            "gauge",
            retain_idle_s=None,
        )
        # Linkerd's outbound HTTP route families (issue #21): listed in families() so worker
        # dumps, the supervisor's merge and StatWindow see them.
        self.routes = RouteMetrics()

    def families(self) -> list[Family]:
        return [
            self.request_total,
            self.response_total,
            self.response_latency_ms,
            self.tcp_open_total,
            self.tcp_close_total,
            self.tcp_open_connections,
            self.tcp_read_bytes_total,
            self.tcp_write_bytes_total,
            self.tcp_connection_duration_ms,
            self.http_authz_allow,
            self.authz_allow,
            self.authz_deny,
            self.tls_failures,
            self.refused,
            self.revoked_closed,
            self.tls_resumed,
            self.cert_expiry,
            self.control_cert_expiry,
            *self.routes.families(),
        ]

    def connection(self, base: str) -> ConnMetrics:
        return ConnMetrics(self, base)

    def http(self, base: str, authz_key: str | None = None) -> HttpMetrics:
        return HttpMetrics(self, base, authz_key)

    def set_cert_expiry(self, not_after_unix: float) -> None:
        self.cert_expiry.child("").value = not_after_unix
        self.control_cert_expiry.child("").value = not_after_unix

    def settle(self, legs: Iterable[LiveLeg]) -> None:
        """Bring in what open connections' HTTP accounting kept back (see `HttpMetrics.add`)."""
        for leg in legs:
            accounting = leg.accounting
            if accounting is not None:
                accounting.drain()  # both legs share one: the second drain finds nothing

    def _live_bytes(self, legs: list[LiveLeg]) -> tuple[dict[str, float], dict[str, float]]:
        """Settle open connections, mark their children in use (before any sweep: these are
        held), and sum their not-yet-counted bytes read and written per label set."""
        self.settle(legs)
        now = time.monotonic()
        read: dict[str, float] = {}
        write: dict[str, float] = {}
        for leg in legs:
            m = leg.metrics
            if m is not None:
                m.keep(now)
                read[m.base] = read.get(m.base, 0.0) + leg.rx
                write[m.base] = write.get(m.base, 0.0) + leg.tx
        return read, write

    def render(self, legs: Iterable[LiveLeg]) -> Iterator[str]:
        read, write = self._live_bytes(list(legs))
        for family in self.families():
            if family is self.tcp_read_bytes_total:
                yield from family.render(lambda key: read.get(key, 0.0))
            elif family is self.tcp_write_bytes_total:
                yield from family.render(lambda key: write.get(key, 0.0))
            else:
                yield from family.render()

    def dump(self, legs: Iterable[LiveLeg]) -> MetricsDump:
        """Every family but the certificate-expiry gauges (the supervisor's own) as plain data,
        for a worker's `snapshot` reply: what `render` would show, after the same idle sweep."""
        read, write = self._live_bytes(list(legs))
        out: MetricsDump = {}
        for family in self.families():
            if family is self.cert_expiry or family is self.control_cert_expiry:
                continue
            dropped = family.sweep()
            live = (
                read
                if family is self.tcp_read_bytes_total
                else write
                if family is self.tcp_write_bytes_total
                else None
            )
            out[family.name] = {
                "kind": family.kind,
                "samples": [
                    sample(key, c, live.get(key, 0.0) if live is not None else 0.0)
                    for key, c in family.children.items()
                ],
                "dropped": [sample(key, c) for key, c in dropped],
            }
        return out
