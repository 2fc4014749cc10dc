"""The directory's Services (agent/proxy/services.py): parsing entry by entry, lookup, the
endpoint catalog, the DNS addresses, and the balancer, with an injected random source and clock."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from agent.dns.names import ServiceAddress
from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.directory import merge
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy
from agent.proxy.services import Balancer, EndpointPort, ServicePort, ServiceTable, parse_services
from agent.proxy.tls import Credentials
from tests.support import issue_identity

TD = "cluster.local"
A_ID, B_ID = f"spiffe://{TD}/ns/shop/sa/orders-a", f"spiffe://{TD}/ns/shop/sa/orders-b"
A_NAME = "orders-a.shop.serviceaccount.identity.linkerd.cluster.local"


def endpoint(address: str, identity: str | None = A_ID, **extra: Any) -> dict[str, Any]:
    return {
        "address": address,
        "ports": {"80": 8080, "6379": 6379},
        "identity": identity,
        "server_name": None,
        "proxy_port": 4143,
        "source": f"pod:shop/{address}",
        **extra,
    }


def service(**extra: Any) -> dict[str, Any]:
    return {
        "name": "orders",
        "namespace": "shop",
        "cluster_ips": ["198.19.0.10", "2001:db8:19::10"],
        "ports": [
            {"port": 80, "name": "http", "protocol": "TCP", "opaque": False},
            {"port": 6379, "name": "redis", "protocol": "TCP", "opaque": True},
            {"port": 53, "name": "dns", "protocol": "UDP", "opaque": False},
        ],
        "endpoints": [endpoint("198.18.5.2"), endpoint("198.18.5.3", B_ID)],
        **extra,
    }


def parse(docs: Any) -> tuple[ServiceTable, list[tuple[str, str]]]:
    rejected: list[tuple[str, str]] = []
    table = parse_services(docs, lambda where, doc, reason: rejected.append((where, reason)))
    return table, rejected


# --- parsing ----------------------------------------------------------------------------------


def test_a_service_parses_with_its_tcp_ports_and_endpoints() -> None:
    table, rejected = parse([service()])
    assert rejected == [] and len(table) == 1
    svc = table.services[0]
    assert svc.cluster_ips == ("198.19.0.10", "2001:db8:19::10")
    assert dict(svc.ports) == {80: False, 6379: True}  # UDP is not proxied
    a = svc.endpoints[0]
    assert (a.address, dict(a.ports), a.identity, a.proxy_port) == (
        "198.18.5.2",
        {80: 8080, 6379: 6379},
        A_ID,
        4143,
    )
    assert a.server_name == A_NAME  # the DNS form of the workload identity, as the catalog


def test_an_identity_in_dns_form_is_kept_as_the_spiffe_id() -> None:
    table, rejected = parse([service(endpoints=[endpoint("198.18.5.2", A_NAME)])])
    assert rejected == [] and table.services[0].endpoints[0].identity == A_ID


@pytest.mark.parametrize(
    ("change", "where", "reason"),
    [
        ({"name": ""}, "services[1]", "name must be a non-empty string"),
        ({"namespace": None}, "services[1]", "namespace must be a non-empty string"),
        ({"cluster_ips": ["198.19.0.300"]}, "services[1]", "does not appear to be an IPv4 or IPv6 address"),
        ({"cluster_ips": "198.19.0.10"}, "services[1]", "at most two addresses"),
        ({"ports": [{"port": 0}]}, "services[1]", "port 0 is not a port number"),
        ({"ports": [{"port": 80, "opaque": "yes"}]}, "services[1]", "must be true or false"),
        ({"endpoints": {}}, "services[1]", "endpoints must be a list"),
        ({"endpoints": [endpoint("198.18.5.2"), endpoint("nope")]}, "services[1].endpoints[1]", "nope"),
        ({"endpoints": [endpoint("198.18.5.2", ports={})]}, "services[1].endpoints[0]", "must map"),
        ({"endpoints": [endpoint("198.18.5.2", ports={"80": 70000})]}, "services[1].endpoints[0]", "70000"),
        (
            {"endpoints": [endpoint("198.18.5.2", ports={"x": 80})]},
            "services[1].endpoints[0]",
            "invalid literal",
        ),
        (
            {"endpoints": [endpoint("198.18.5.2", "spiffe://td/other")]},
            "services[1].endpoints[0]",
            "server_name",
        ),
        ({"endpoints": [endpoint("198.18.5.2", "not an identity")]}, "services[1].endpoints[0]", "not"),
        ({"endpoints": [endpoint("198.18.5.2", proxy_port=True)]}, "services[1].endpoints[0]", "proxy_port"),
        ({"endpoints": ["198.18.5.2"]}, "services[1].endpoints[0]", "indices"),
    ],
)
def test_a_bad_service_or_endpoint_is_rejected_alone(change: dict[str, Any], where: str, reason: str) -> None:
    other = service(name="cart", cluster_ips=["198.19.0.20"])
    table, rejected = parse([other, service(**change)])
    assert len(rejected) == 1 and rejected[0][0] == where and reason in rejected[0][1], rejected
    assert table.lookup("198.19.0.20", 80) is not None  # the rest applies
    if where.endswith("]") and ".endpoints[" in where:  # the service stays, without that endpoint
        svc = table.lookup("198.19.0.10", 80)
        assert svc is not None and all(e.address != "nope" for e in svc.endpoints)


def test_a_cluster_ip_port_taken_by_an_earlier_service_is_rejected() -> None:
    table, rejected = parse([service(), service(name="copy", cluster_ips=["198.19.0.10"])])
    assert rejected == [("services[1]", "198.19.0.10:80 is already shop/orders's")]
    svc = table.lookup("198.19.0.10", 80)
    assert svc is not None and svc.name == "orders"


def test_services_that_are_not_a_list_are_rejected_and_none_is_empty() -> None:
    assert parse({"orders": 1})[1] == [("services", "services must be a list")]
    table, rejected = parse(None)
    assert rejected == [] and len(table) == 0


# --- lookup -----------------------------------------------------------------------------------


def test_lookup_by_cluster_ip_and_port_v4_mapped_like_the_catalog() -> None:
    table, _ = parse([service()])
    for address in ("198.19.0.10", "::ffff:198.19.0.10", "2001:db8:19::10"):
        svc = table.lookup(address, 80)
        assert svc is not None and svc.name == "orders", address
    assert table.lookup("198.19.0.10", 8080) is None
    assert table.lookup("198.19.0.11", 80) is None
    route = table.route("198.19.0.10", 6379)
    assert isinstance(route, ServicePort) and route.opaque and len(route.endpoints) == 2


def test_an_endpoint_address_and_target_port_route_to_that_endpoint() -> None:
    table, _ = parse([service()])
    route = table.route("198.18.5.3", 8080)
    assert isinstance(route, EndpointPort) and route.endpoint.identity == B_ID and not route.opaque
    opaque = table.route("198.18.5.3", 6379)
    assert isinstance(opaque, EndpointPort) and opaque.opaque
    assert table.route("198.18.5.3", 80) is None  # the service port is not the pod's port
    assert table.lookup("198.18.5.3", 8080) is None  # not a Service


def test_only_endpoints_serving_the_port_are_candidates() -> None:
    only_http = endpoint("198.18.5.4", ports={"80": 8080})
    table, _ = parse([service(endpoints=[endpoint("198.18.5.2"), only_http])])
    redis = table.route("198.19.0.10", 6379)
    http = table.route("198.19.0.10", 80)
    assert isinstance(redis, ServicePort) and [e.address for e in redis.endpoints] == ["198.18.5.2"]
    assert isinstance(http, ServicePort) and len(http.endpoints) == 2


def test_endpoint_catalog_has_each_meshed_endpoint_with_its_target_ports() -> None:
    unmeshed = endpoint("198.18.5.9", None)
    table, _ = parse([service(endpoints=[endpoint("198.18.5.2"), unmeshed])])
    catalog = table.endpoint_catalog()
    plain = catalog.lookup("198.18.5.2", 8080)
    assert plain is not None and plain.identity == A_ID and plain.opaque_port is None
    opaque = catalog.lookup("::ffff:198.18.5.2", 6379)
    assert opaque is not None and opaque.opaque_port == 4143
    assert catalog.lookup("198.18.5.2", 80) is None
    assert catalog.lookup("198.18.5.9", 8080) is None  # no identity: not in a catalog of meshed peers


def test_addresses_for_the_dns_stub() -> None:
    table, _ = parse([service(), service(name="headless", cluster_ips=[], ports=[], endpoints=[])])
    assert table.addresses() == [
        ServiceAddress("orders", "shop", ("198.19.0.10", "2001:db8:19::10")),
        ServiceAddress("headless", "shop", ()),
    ]


# --- the directory ----------------------------------------------------------------------------

LOCAL = InboundPolicy(PortPolicy(DefaultPolicy.ALL_UNAUTHENTICATED))


def test_merge_parses_services_and_rejects_only_the_bad_entries() -> None:
    bad_endpoint = service(endpoints=[endpoint("198.18.5.2"), {"address": "198.18.5.3"}])
    doc = {"catalog": [], "policy": {}, "services": [bad_endpoint, {"name": "x"}]}
    directory = merge([], LOCAL, doc)
    assert [r.where for r in directory.rejected] == ["services[0].endpoints[1]", "services[1]"]
    assert "missing 'ports'" in directory.rejected[0].reason
    svc = directory.services.lookup("198.19.0.10", 80)
    assert svc is not None and [e.address for e in svc.endpoints] == ["198.18.5.2"]


def test_a_directory_without_services_has_an_empty_table() -> None:
    assert len(merge([], LOCAL, None).services) == 0
    assert len(merge([], LOCAL, {"catalog": []}).services) == 0


# --- balancing --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def three() -> tuple[ServiceTable, ServicePort]:
    eps = [endpoint(f"198.18.5.{i}", ports={"80": 8080}) for i in (2, 3, 4)]
    table, _ = parse([service(endpoints=eps)])
    route = table.route("198.19.0.10", 80)
    assert isinstance(route, ServicePort)
    return table, route


def test_p2c_picks_the_less_loaded_of_two_distinct_draws() -> None:
    table, route = three()
    balancer = Balancer(random.Random(7))
    first = balancer.pick(table, route)
    assert first is not None
    # Whatever two are drawn next, the one with a connection open loses against an idle one.
    for _ in range(20):
        second = balancer.pick(table, route)
        assert second is not None and second.endpoint.address != first.endpoint.address
        balancer.released(second)


def test_p2c_spreads_open_connections_evenly() -> None:
    table, route = three()
    balancer = Balancer(random.Random(1))
    picks = [balancer.pick(table, route) for _ in range(300)]
    assert all(p is not None for p in picks)
    loads = sorted(balancer.open(("198.18.5." + str(i), 8080)) for i in (2, 3, 4))
    assert sum(loads) == 300 and loads[-1] - loads[0] <= 2, loads


def test_the_same_seed_picks_the_same_endpoints() -> None:
    table, route = three()

    def run() -> list[str]:
        balancer = Balancer(random.Random(42))
        out = []
        for _ in range(30):
            pick = balancer.pick(table, route)
            assert pick is not None
            out.append(pick.endpoint.address)
            if len(out) % 3 == 0:
                balancer.released(pick)
        return out

    assert run() == run()


def test_a_failed_endpoint_is_skipped_for_its_backoff_which_doubles_and_resets() -> None:
    table, route = three()
    clock = Clock()
    balancer = Balancer(random.Random(3), clock)
    bad = balancer.pick(table, route)
    assert bad is not None
    balancer.failed(bad)
    assert balancer.open(bad.key) == 0
    for _ in range(50):  # 1 s back-off: never picked within it
        pick = balancer.pick(table, route)
        assert pick is not None and pick.key != bad.key
        balancer.released(pick)
    clock.now += 1.0  # back-off over: it is a candidate again
    seen = set()
    for _ in range(50):
        pick = balancer.pick(table, route)
        assert pick is not None
        seen.add(pick.key)
        balancer.released(pick)
    assert bad.key in seen
    # Failing again doubles the back-off (2 s), then 4 s ..., capped at 30 s.
    state = balancer.states[bad.key]
    retry = balancer.pick(table, route)
    while retry is not None and retry.key != bad.key:
        balancer.released(retry)
        retry = balancer.pick(table, route)
    assert retry is not None
    balancer.failed(retry)
    assert state.retry_at == clock.now + 2.0
    for _ in range(10):
        state.failures += 1
    balancer.failed(retry)  # released already: the back-off still grows, open stays at 0
    assert state.retry_at == clock.now + 30.0 and balancer.open(bad.key) == 0
    # A success ends it at once.
    clock.now += 30.0
    again = balancer.pick(table, route)
    while again is not None and again.key != bad.key:
        balancer.released(again)
        again = balancer.pick(table, route)
    assert again is not None
    balancer.connected(again)
    assert state.failures == 0 and state.retry_at == 0.0 and not balancer.backing_off


def test_when_every_endpoint_backs_off_they_are_tried_all_the_same() -> None:
    table, route = three()
    balancer = Balancer(random.Random(5), Clock())
    for _ in range(3):  # each failure sends the next pick to another endpoint
        pick = balancer.pick(table, route)
        assert pick is not None
        balancer.failed(pick)
    assert len(balancer.backing_off) == 3
    assert balancer.pick(table, route) is not None


def test_no_endpoint_no_pick() -> None:
    table, _ = parse([service(endpoints=[])])
    route = table.route("198.19.0.10", 80)
    assert isinstance(route, ServicePort)
    assert Balancer(random.Random(0)).pick(table, route) is None


def test_a_release_counts_once() -> None:
    table, route = three()
    balancer = Balancer(random.Random(0))
    pick = balancer.pick(table, route)
    assert pick is not None and balancer.open(pick.key) == 1
    balancer.released(pick)
    balancer.released(pick)
    balancer.failed(pick)
    assert balancer.open(pick.key) == 0


def test_state_survives_a_refresh_for_endpoints_that_stay_and_goes_with_those_that_left() -> None:
    table, route = three()
    clock = Clock()
    balancer = Balancer(random.Random(0), clock)
    picks = [balancer.pick(table, route) for _ in range(6)]  # two open on each
    assert all(p is not None for p in picks)
    failed = next(p for p in picks if p is not None and p.endpoint.address == "198.18.5.2")
    balancer.failed(failed)
    gone = [endpoint("198.18.5.2", ports={"80": 8080}), endpoint("198.18.5.3", ports={"80": 8080})]
    refreshed, _ = parse([service(endpoints=gone)])
    new_route = refreshed.route("198.19.0.10", 80)
    assert isinstance(new_route, ServicePort)
    pick = balancer.pick(refreshed, new_route)
    assert pick is not None and pick.endpoint.address == "198.18.5.3"  # .2 still backs off
    assert ("198.18.5.4", 8080) not in balancer.states
    assert balancer.open(("198.18.5.3", 8080)) == 3 and balancer.open(("198.18.5.2", 8080)) == 1
    # A connection to an endpoint that left ends later: nothing to count down, nothing breaks.
    left = next(p for p in picks if p is not None and p.endpoint.address == "198.18.5.4")
    balancer.released(left)
    assert ("198.18.5.4", 8080) not in balancer.states


# --- the shell reports to the balancer (loopback, real sockets) --------------------------------


def test_the_outbound_shell_backs_off_an_endpoint_that_refused_and_releases_on_close(tmp_path: Path) -> None:
    """Two unmeshed endpoints of one Service on loopback, one with nothing listening: the proxy
    reaches it once, backs it off (the clock stands still) and sends every other call to the
    live one; every connection released when it ends."""

    async def body() -> None:
        server, live = await echo_server()
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        eps = [endpoint("127.0.0.1", None, ports={"80": p}) for p in (dead, live)]
        table, _ = parse([service(cluster_ips=["198.19.0.10"], endpoints=eps)])
        issue_identity(tmp_path / "authority", "shop/web", tmp_path / "a")
        proxy = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            Credentials.load(IdentityStore(tmp_path / "a")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("198.19.0.10", 80),
        )
        proxy.services = table
        proxy.balancer = Balancer(random.Random(2), Clock())
        await proxy.start()
        try:
            answers = [await request(proxy.listening["outbound"][1], b"hi") for _ in range(20)]
            for _ in range(100):  # the last upstream close reaches the balancer on a later turn
                if proxy.balancer.open(("127.0.0.1", live)) == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            await proxy.stop(drain_timeout_s=1)
            server.close()
        assert answers.count(b"") == 1 and answers.count(b"echo:hi") == 19, answers
        assert proxy.stats.failures["outbound_connect"] == 1
        assert proxy.balancer.backing_off == {("127.0.0.1", dead)}
        assert proxy.balancer.open(("127.0.0.1", live)) == 0
        assert proxy.balancer.open(("127.0.0.1", dead)) == 0

    asyncio.run(asyncio.wait_for(body(), 30))


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo:" + await reader.read())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def request(port: int, payload: bytes) -> bytes:
    """Send, half-close, read to EOF; a refused or reset connection reads as b""."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
