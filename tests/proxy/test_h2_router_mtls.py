"""The routed HTTP/2 path with its real upstreams: H2Router's pool opens each endpoint's
connection through originate() (mTLS to that endpoint's own identity), to two inbound proxies on
loopback, each in front of a grpcio server. One gRPC channel (one app connection) is split
across both; an endpoint that proves another identity is never used.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc

from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.h2_router import H2Router, worker_pool
from agent.proxy.http_dispatch import RouterContext
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.relay import Leg
from agent.proxy.routed_detect import RoutedConn
from agent.proxy.routes import EndpointRef, ParentPolicy, RouteTable
from agent.proxy.services import ServiceTable
from agent.proxy.tls import Credentials
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.route_metrics import RouteMetrics
from tests.proxy.test_h2_router import GrpcServer, backend, policy
from tests.support import issue_identity, metric_sum

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
DB = f"spiffe://{TD}/ns/shop/sa/db"
DB_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"


def _settings() -> ListenerSettings:
    return ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0), idle_timeout_s=60.0)


class _App(Leg):
    def __init__(self, proxy: Proxy, ctx: RouterContext, pol: ParentPolicy) -> None:
        super().__init__()
        self.proxy, self.ctx, self.pol = proxy, ctx, pol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pair(H2Router(RoutedConn(self.proxy, self.ctx, self.pol, self, b"", ("198.18.0.10", 8080))))


def _calls(port: int, requests: list[bytes]) -> list[tuple[grpc.StatusCode, bytes | str]]:
    """Unary calls in turn on ONE channel: one HTTP/2 connection to the router."""
    out: list[tuple[grpc.StatusCode, bytes | str]] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary("/demo.Echo/Say")
        for request in requests:
            try:
                out.append((grpc.StatusCode.OK, say(request, timeout=10)))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))  # type: ignore[attr-defined]
    return out


def test_grpc_split_over_mtls_to_each_endpoints_identity(tmp_path: Path) -> None:
    issue_identity(tmp_path / "authority", "shop/web", tmp_path / "a")
    issue_identity(tmp_path / "authority", "shop/db", tmp_path / "b")
    g1, g2 = GrpcServer("g1"), GrpcServer("g2")

    async def main() -> None:
        proxies: list[Proxy] = []
        server: asyncio.AbstractServer | None = None
        try:
            inbound = []
            for g in (g1, g2):
                port = g.port
                b = Proxy(
                    _settings(),
                    Credentials.load(IdentityStore(tmp_path / "b")),
                    InboundPolicy(),
                    Catalog([]),
                    lambda sock, port=port: ("127.0.0.1", port),  # type: ignore[misc]
                )
                await b.start()
                proxies.append(b)
                inbound.append(b.listening["inbound"][1])
            metrics = ProxyMetrics()
            a = Proxy(
                _settings(),
                Credentials.load(IdentityStore(tmp_path / "a")),
                InboundPolicy(),
                Catalog([]),
                lambda sock: ("127.0.0.1", 1),
                metrics=metrics,
            )
            await a.start()
            proxies.append(a)
            e1 = EndpointRef("127.0.0.1", inbound[0], DB, DB_NAME)
            e2 = EndpointRef("127.0.0.1", inbound[1], DB, DB_NAME)
            pol = policy(backend("v1", 1, e1), backend("v2", 1, e2))
            ctx = RouterContext(RouteTable([pol]), ServiceTable.empty(), RouteMetrics(), rng=random.Random(3))
            loop = asyncio.get_running_loop()
            server = await loop.create_server(lambda: _App(a, ctx, pol), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]

            got = await asyncio.to_thread(_calls, port, [b"x%d" % i for i in range(40)])
            assert all(code == grpc.StatusCode.OK for code, _ in got), got
            names = [reply[:2] for _, reply in got]  # type: ignore[index]
            assert names.count(b"g1") + names.count(b"g2") == 40
            assert names.count(b"g1") >= 8 and names.count(b"g2") >= 8  # 50/50: both serve
            assert g1.calls + g2.calls == 40
            pool = worker_pool(a)
            assert pool.status()["connections"] == 2  # one mTLS connection per endpoint
            assert a.stats.opened["outbound:h2_mtls"] == 2
            # The per-request families count the routed calls as the L4 accounting would: the
            # address the app dialled, the endpoint's identity, the gRPC status.
            text = "\n".join(line for f in metrics.families() for line in f.render())
            dialled = 'target_addr="198.18.0.10:8080"'
            assert metric_sum(text, "request_total", 'direction="outbound"', dialled) == 40
            ok = metric_sum(text, "response_total", dialled, 'classification="success"', 'grpc_status="0"')
            assert ok == 40
            assert 'server_id="db.shop.serviceaccount.identity.linkerd.cluster.local"' in text

            # An endpoint that must be web but proves db: refused at the handshake, so the call
            # fails UNAVAILABLE and nothing reaches its server.
            wrong = EndpointRef(
                "127.0.0.1", inbound[0], WEB, "web.shop.serviceaccount.identity.linkerd.cluster.local"
            )
            bad = policy(backend("v1", 1, wrong))
            ctx.apply(RouteTable([pol, bad]), ServiceTable.empty())
            server.close()
            server = await loop.create_server(lambda: _App(a, ctx, bad), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            before = g1.calls
            [(code, details)] = await asyncio.to_thread(_calls, port, [b"y"])
            assert code == grpc.StatusCode.UNAVAILABLE
            assert details == "connection to the backend endpoint failed"
            assert g1.calls == before
        finally:
            if server is not None:
                server.close()
            for p in proxies:
                await p.stop(0.5)

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        g1.stop()
        g2.stop()
