"""Issue #21's headline case over real sockets: the monolith on a VM (an enrolled meshagent.io
Host) and its replacement in the cluster (a Service whose endpoints, with their pod identities,
come from discovery) share one TrafficSplit 90/10, each upstream mTLS to its own identity.

Everything between the operator's YAML and the routed request is the real code: a real
Authority (registry, enrollment, certificates) validates and stores the TrafficSplit exactly as
`meshagent authority route apply` does (kube_routes.known_refs + parse_routes_file), discovery's
`services` are built from Kubernetes objects by kube_discovery.build_services and handed to the
Authority (set_discovered, as `serve --kubernetes` does; one test runs the controller itself,
list+watch against tests/kube/apiserver.py, a TEST STAND-IN for the API server), the host's
directory is the document render_host_config serves, parsed by the agent's merge() and applied
with Proxy.apply. The app's connections go through a real Proxy's outbound listener to the
inbound listeners of real proxies holding the monolith's host certificate and the pods'
certificates.

The one liberty: enrollment refuses loopback addresses, and a loopback test cannot own
198.18.21.x, so the served document's *endpoint* addresses are translated 198.18.21.N ->
127.0.21.N before the agent reads it (a NAT in front of the listeners; the parent address the
app dials stays 198.18.21.1)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import socket
import ssl
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.authority import kube_discovery, kube_routes
from agent.authority.service import Authority
from agent.authority.storage import HostRecord, Registration
from agent.identity.pki import generate_key, load_certs, make_csr
from agent.identity.store import IdentityStore
from agent.proxy.catalog import Catalog
from agent.proxy.directory import Directory, merge
from agent.proxy.http_dispatch import AttemptResult, RouterContext, dispatch
from agent.proxy.listeners import ListenerSettings, Proxy
from agent.proxy.policy import InboundPolicy
from agent.proxy.routes import parse_routes
from agent.proxy.services import ServiceTable
from agent.proxy.tls import Credentials
from agent.telemetry.proxy_metrics import ProxyMetrics
from agent.telemetry.route_metrics import RouteMetrics
from tests.authority.test_kube_controller import Running, settings, until
from tests.kube.apiserver import start_apiserver
from tests.proxy.test_h1_router_world import Client, HttpServer, _ServerConn
from tests.proxy.test_h2_router import GrpcServer
from tests.proxy.test_http_dispatch import FakeExchange, ok
from tests.support import init_authority, issue_identity, metric_sum

TD = "cluster.local"
MONOLITH = "198.18.21.1"  # the VM's enrolled address: the parent the app dials
PODS = {"billing-v2-a": "198.18.21.2", "billing-v2-b": "198.18.21.3", "billing-v2-c": "198.18.21.4"}
CLUSTER_IP = "198.19.21.10"
V2_ID = f"spiffe://{TD}/ns/shop/sa/billing-v2"
MONOLITH_ID = f"spiffe://{TD}/ns/shop/sa/billing"
WEB_ID = f"spiffe://{TD}/ns/shop/sa/web"

SPLIT = """
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {namespace: shop, name: billing-canary}
spec:
  service: billing            # no Service billing: the enrolled hosts of identity shop/billing
  backends: [{service: billing, weight: 90}, {service: billing-v2, weight: 10}]
---
apiVersion: v1
kind: Service                 # makes billing-v2 known (its ports); its endpoints come from discovery
metadata: {namespace: shop, name: billing-v2}
spec: {ports: [{name: http, port: PORT}]}
"""


# Every proxy of a world shares this test's one event loop (and the GIL with the gRPC threads):
# a busy loop can run an inbound proxy's 1 s detection timer before it runs the agent's
# connect completion that writes the ClientHello, which a real host's proxy (its own process)
# never sees. Detection is not under test here: the pods' proxies wait longer for it.
DETECT_TIMEOUT_S = 10.0


def loopback(address: str) -> str:
    """198.18.21.N -> 127.0.21.N (see the module doc)."""
    assert address.startswith("198.18.21."), address
    return "127.0.21." + address.rpartition(".")[2]


def free_port() -> int:
    """A port free on every address of the world (the monolith and the pods all listen on it,
    as a VM's app and a pod's container would on 8080)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind(("127.0.21.1", 0))
        port: int = probe.getsockname()[1]
        held = [probe]
        try:
            for n in (2, 3, 4):
                s = socket.socket()
                held.append(s)
                s.bind((f"127.0.21.{n}", port))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no common free port")


def enroll(
    authority: Authority, identity: str, name: str, address: str, state: Path, port: int
) -> HostRecord:
    """`token create --port http=PORT` then enrollment with `--address`, the key kept in `state`
    (the host's identity store: its proxy serves with that certificate)."""
    registration = Registration(ports=(("http", port, "TCP"),))
    token = authority.create_tokens(
        identity, "https://127.0.0.1:1", timedelta(minutes=5), registration=registration
    )[0]
    key = generate_key()
    result = authority.enroll(token.secret, make_csr(key).decode(), name, [address])
    IdentityStore(state).save(key, load_certs(result.chain_pem), load_certs(result.trust_bundle_pem))
    return result.host


def cluster_objects(port: int, pods: dict[str, str]) -> list[dict[str, Any]]:
    """Service shop/billing-v2 (cluster IP, targetPort `port`), its EndpointSlice listing `pods`
    (name -> address, ready) and the pods (meshed, service account billing-v2), as the
    cluster's own controllers write them."""
    meshed = {"linkerd.io/control-plane-ns": "linkerd"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "billing-v2", "namespace": "shop"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": CLUSTER_IP,
            "clusterIPs": [CLUSTER_IP],
            "selector": {"app": "billing-v2"},
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": port}],
        },
    }
    eslice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "billing-v2-xyz",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "billing-v2"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"},
            }
            for name, address in pods.items()
        ],
    }
    pod_objects = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "billing-v2", **meshed}},
            "spec": {
                "serviceAccountName": "billing-v2",
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": port}]}],
            },
            "status": {"podIP": address, "phase": "Running"},
        }
        for name, address in pods.items()
    ]
    return [service, eslice, *pod_objects]


def discovered(port: int, pods: dict[str, str]) -> list[dict[str, Any]]:
    """What `serve --kubernetes` serves for those objects (the controller's own function)."""
    service, eslice, *pod_objects = cluster_objects(port, pods)
    built = kube_discovery.build_services([service], [eslice], pod_objects, [], [], TD)
    assert built.skipped == [], built.skipped
    return built.services


class Headline:
    """The authority, the fleet's proxies and the apps of one headline world."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        init_authority(tmp / "authority")
        self.authority = Authority.open(tmp / "authority")
        self.web = enroll(self.authority, "shop/web", "web-1", "198.18.21.9", tmp / "web", self.port)
        enroll(self.authority, "shop/billing", "billing-vm", MONOLITH, tmp / "billing", self.port)
        issue_identity(tmp / "authority", "shop/billing-v2", tmp / "billing-v2")  # the pods' SA
        issue_identity(tmp / "authority", "shop/impostor", tmp / "impostor")
        self.apps: dict[str, HttpServer] = {}
        self.proxies: list[Proxy] = []
        self.a: Proxy | None = None

    def apply_routes(self) -> None:
        """`meshagent authority route apply -f` (no discovery: the file's Service makes
        billing-v2 known), stored in the registry."""
        hosts = self.authority.registry.list_hosts()
        known = kube_routes.known_refs(self.authority.catalog(hosts), hosts)
        notes: list[str] = []
        text = SPLIT.replace("PORT", str(self.port))
        objects = kube_routes.parse_routes_file(text, known, now=1.0, notes=notes)
        assert any("resolved by discovery" in n for n in notes), notes
        self.authority.registry.put_route_objects(objects)

    def directory(self) -> tuple[Directory, dict[str, Any]]:
        """The web host's directory as served, its endpoint addresses translated (module doc),
        merged by the agent's own code."""
        doc: dict[str, Any] = json.loads(self.authority.render_host_config(self.web).body)
        for service in doc.get("services") or ():
            for ep in service["endpoints"]:
                ep["address"] = loopback(ep["address"])
        for item in doc.get("routes") or ():
            for route in item["routes"]:
                for rule in route["rules"]:
                    for backend in rule["backends"]:
                        for ep in backend.get("endpoints") or ():
                            ep["address"] = loopback(ep["address"])
        directory = merge([], InboundPolicy(), doc)
        assert directory.rejected == (), directory.rejected
        return directory, doc

    async def inbound(self, name: str, identity_dir: str, served: str) -> HttpServer:
        """App `name` behind an inbound proxy with the certificate in `identity_dir`, listening
        at the served address's loopback twin, port `self.port`."""
        app = await HttpServer(name).start()
        self.apps[name] = app
        proxy = Proxy(
            ListenerSettings(
                inbound=(loopback(served), self.port),
                outbound=("127.0.0.1", 0),
                detect_timeout_s=DETECT_TIMEOUT_S,
            ),
            Credentials.load(IdentityStore(self.tmp / identity_dir)),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app.port),
        )
        await proxy.start()
        self.proxies.append(proxy)
        return app

    async def impostor(self, name: str, served: str) -> HttpServer:
        """App `name` serving HTTP/1 over TLS itself at the served address's loopback twin with
        a valid mesh certificate of identity shop/impostor, whatever name the client asks for
        (SNI) and whoever it is: the handshake completes, so only the agent's own check of the
        identity it proved can keep requests from it."""
        app = HttpServer(name)
        store = IdentityStore(self.tmp / "impostor")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(store.cert_file, store.key_file)
        context.load_verify_locations(store.bundle_file)
        context.verify_mode = ssl.CERT_OPTIONAL
        app.server = await asyncio.get_running_loop().create_server(
            lambda: _ServerConn(app), loopback(served), self.port, ssl=context
        )
        self.apps[name] = app
        return app

    async def agent(self, directory: Directory) -> Proxy:
        """The web host's proxy: its app's connections to the monolith's address are routed."""
        a = Proxy(
            ListenerSettings(inbound=("127.0.0.1", 0), outbound=("127.0.0.1", 0)),
            Credentials.load(IdentityStore(self.tmp / "web")),
            InboundPolicy(),
            Catalog([]),
            lambda sock: (MONOLITH, self.port),
            ProxyMetrics(),
        )
        a.apply(directory)
        await a.start()
        self.proxies.append(a)
        self.a = a
        return a

    @property
    def outbound(self) -> int:
        assert self.a is not None
        return self.a.listening["outbound"][1]

    async def load(self, total: int, clients: int = 8) -> collections.Counter[tuple[int, str]]:
        """`total` GETs over `clients` keep-alive app connections: (status, answering app)."""
        seen: collections.Counter[tuple[int, str]] = collections.Counter()

        async def one(n: int) -> None:
            client = await Client.open(self.outbound)
            for _ in range(n):
                resp = await client.request("GET", "/who")
                seen[(resp.status, resp.body.decode() or resp.headers.get("l5d-proxy-error", "?"))] += 1
                if resp.headers.get("connection") == "close":
                    client.close()
                    client = await Client.open(self.outbound)
            client.close()

        await asyncio.gather(*(one(total // clients) for _ in range(clients)))
        return seen

    async def stop(self) -> None:
        for app in self.apps.values():
            await app.stop()
        for p in self.proxies:
            await p.stop(0.2)
        self.authority.registry.close()


def run(tmp: Path, body: Any, timeout: float = 60) -> None:
    async def main() -> None:
        world = Headline(tmp)
        try:
            await asyncio.wait_for(body(world), timeout)
        finally:
            await world.stop()

    asyncio.run(main())


def within(count: int, total: int, share: float, tolerance: float = 0.03) -> bool:
    """`count` of `total` is `share` ± `tolerance` (±3 % at 2,000 and 10 %: 4.5 sigma)."""
    return abs(count / total - share) <= tolerance


def test_the_monolith_and_its_cluster_replacement_share_90_10_each_over_mtls_to_its_identity(
    tmp_path: Path,
) -> None:
    async def body(w: Headline) -> None:
        w.authority.set_discovered(
            discovered(w.port, {"billing-v2-a": PODS["billing-v2-a"], "billing-v2-b": PODS["billing-v2-b"]})
        )
        w.apply_routes()
        directory, doc = w.directory()
        # The served item: one Host parent (the monolith's address), a Host backend with its
        # rendered endpoint, a Service backend by name (its endpoints: the services member).
        [item] = doc["routes"]
        assert item["parent"]["kind"] == "Host" and item["parent"]["addresses"] == [MONOLITH]
        [rule] = item["routes"][0]["rules"]
        host, service = rule["backends"]
        assert (host["weight"], host["ref"]["kind"]) == (90, "Host")
        assert [(e["address"], e["identity"]) for e in host["endpoints"]] == [("127.0.21.1", MONOLITH_ID)]
        assert (service["weight"], service["ref"]["kind"], service.get("endpoints")) == (10, "Service", None)
        [svc] = doc["services"]
        assert sorted((e["address"], e["identity"]) for e in svc["endpoints"]) == [
            ("127.0.21.2", V2_ID),
            ("127.0.21.3", V2_ID),
        ]
        monolith = await w.inbound("monolith", "billing", MONOLITH)
        pod_a = await w.inbound("pod-a", "billing-v2", PODS["billing-v2-a"])
        pod_b = await w.inbound("pod-b", "billing-v2", PODS["billing-v2-b"])
        a = await w.agent(directory)

        seen = await w.load(2000)
        total = sum(seen.values())
        assert total == 2000 and all(status == 200 for status, _ in seen), seen
        by_app = {name: n for (_, name), n in seen.items()}
        assert within(by_app["monolith"], total, 0.9), by_app
        v2 = by_app.get("pod-a", 0) + by_app.get("pod-b", 0)
        assert within(v2, total, 0.1), by_app
        assert by_app["pod-a"] > 0 and by_app["pod-b"] > 0  # P2C spreads over both pods
        # What the apps saw agrees with what the client was answered.
        assert (monolith.requests["/who"], pod_a.requests["/who"], pod_b.requests["/who"]) == (
            by_app["monolith"],
            by_app["pod-a"],
            by_app["pod-b"],
        )
        # Each upstream is mTLS, pooled, to that endpoint's own identity.
        assert (
            a.stats.opened["outbound:http1_mtls"]
            == monolith.connections + pod_a.connections + pod_b.connections
        )
        proven = {(c.remote.rpartition(":")[0], c.spiffe_id) for c in a.peers._open.values()}
        assert proven == {("127.0.21.1", MONOLITH_ID), ("127.0.21.2", V2_ID), ("127.0.21.3", V2_ID)}
        # ... and each upstream's server side saw the client's own identity.
        for upstream in w.proxies[:3]:
            assert {c.spiffe_id for c in upstream.peers._open.values()} == {WEB_ID}
        # The per-request families say the same: the address the app dialled, the identity of
        # the endpoint that answered (what `meshagent stat` and Linkerd's dashboards read).
        assert a.metrics is not None
        text = "\n".join(line for f in a.metrics.families() for line in f.render())
        dialled = f'target_addr="{MONOLITH}:{w.port}"'
        for sa, count in (("billing", by_app["monolith"]), ("billing-v2", v2)):
            server = f'server_id="{sa}.shop.serviceaccount.identity.linkerd.cluster.local"'
            parts = ('direction="outbound"', dialled, 'tls="true"', server, 'status_code="200"')
            assert metric_sum(text, "response_total", *parts) == count, (sa, count)
        print(
            f"HEADLINE share: monolith={by_app['monolith']} pod-a={by_app['pod-a']} pod-b={by_app['pod-b']}"
        )

    run(tmp_path, body)


async def up(w: Headline, pods: dict[str, str], apps: dict[str, str]) -> Proxy:
    """Discovery serves `pods` (name -> address); the split applied; `apps` (app name -> the
    identity store its inbound proxy serves with) started at the pods' addresses; the agent."""
    w.authority.set_discovered(discovered(w.port, pods))
    w.apply_routes()
    await w.inbound("monolith", "billing", MONOLITH)
    for (name, address), store in zip(pods.items(), apps.values(), strict=True):
        if store == "impostor":
            await w.impostor(name, address)
        else:
            await w.inbound(name, store, address)
    directory, _ = w.directory()
    return await w.agent(directory)


def test_a_pod_removed_from_discovery_gives_its_share_to_the_other_without_a_failed_request(
    tmp_path: Path,
) -> None:
    async def body(w: Headline) -> None:
        pods = {"billing-v2-a": PODS["billing-v2-a"], "billing-v2-b": PODS["billing-v2-b"]}
        a = await up(w, pods, {"a": "billing-v2", "b": "billing-v2"})
        pod_b = w.apps["billing-v2-b"]
        load = asyncio.ensure_future(w.load(2000))
        while sum(app.requests["/who"] for app in w.apps.values()) < 600:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        # The pod leaves its EndpointSlice: discovery's next `services`, the next directory.
        w.authority.set_discovered(discovered(w.port, {"billing-v2-a": PODS["billing-v2-a"]}))
        directory, doc = w.directory()
        assert [e["address"] for e in doc["services"][0]["endpoints"]] == ["127.0.21.2"]
        a.apply(directory)
        at_apply = pod_b.requests["/who"]
        seen = await load
        assert set(seen) <= {(200, "billing-v2-a"), (200, "billing-v2-b"), (200, "monolith")}, seen
        assert sum(seen.values()) == 2000
        # Only requests already dispatched to it at the apply (at most one per app connection).
        assert pod_b.requests["/who"] - at_apply <= 8
        before_b = pod_b.requests["/who"]
        # The pod is gone now (scaled down): its pooled connections are never used again.
        await w.proxies[2].stop(0.2)
        seen = await w.load(1000)
        total = sum(seen.values())
        assert set(seen) <= {(200, "billing-v2-a"), (200, "monolith")} and total == 1000, seen
        assert within(seen[(200, "billing-v2-a")], total, 0.1, 0.04), seen  # (sigma 0.95 % at 1,000)
        assert pod_b.requests["/who"] == before_b
        print(f"HEADLINE removal: after={dict(seen)} b_at_apply={at_apply} b_after={before_b}")

    run(tmp_path, body)


def refused_for_identity(a: Proxy) -> int:
    """How many upstream handshakes the agent refused because the peer proved another
    identity than the endpoint's (every outbound TLS failure must be that one)."""
    errors = [e for e in a.stats.last_errors if e["kind"] == "outbound_tls"]
    assert errors and all(
        e["dst"].startswith("127.0.21.4:")
        and e["server_id"] == V2_ID
        and "not valid for 'billing-v2.shop.serviceaccount.identity.linkerd.cluster.local'" in e["reason"]
        for e in errors
    ), errors
    return a.stats.failures["outbound_tls"]


def test_an_endpoint_proving_another_identity_is_never_reached(tmp_path: Path) -> None:
    """Discovery says pod c runs as shop/billing-v2; what answers at its address proves
    shop/impostor (a valid mesh certificate of another identity, any SNI accepted). The agent
    refuses it after the handshake and never sends it a request: the Service's share goes to
    the pod that proves the right identity, and no request fails."""

    async def body(w: Headline) -> None:
        pods = {"billing-v2-a": PODS["billing-v2-a"], "billing-v2-c": PODS["billing-v2-c"]}
        a = await up(w, pods, {"a": "billing-v2", "c": "impostor"})
        seen = await w.load(1000)
        impostor = w.apps["billing-v2-c"]
        assert impostor.requests == collections.Counter() and impostor.connections == 0
        assert set(seen) == {(200, "monolith"), (200, "billing-v2-a")}, seen
        assert within(seen[(200, "billing-v2-a")], 1000, 0.1, 0.04), seen  # (sigma 0.95 % at 1,000)
        refused = refused_for_identity(a)
        proven = {c.spiffe_id for c in a.peers._open.values()}
        assert proven == {MONOLITH_ID, V2_ID}
        print(f"HEADLINE impostor beside a pod: {dict(seen)} handshakes refused={refused}")

    run(tmp_path, body)


def test_a_service_whose_only_endpoint_proves_another_identity_gives_its_share_away(
    tmp_path: Path,
) -> None:
    """The canary's only endpoint proves the wrong identity: never a request to it; its 10 %
    goes to the monolith (Linkerd's RandomAvailable), not one request fails, and the refused
    endpoint is redialled only when its back-off ends (at most one dial per app connection
    before the first refusal, then one per back-off: 1 s, 2 s, 4 s ...)."""

    async def body(w: Headline) -> None:
        a = await up(w, {"billing-v2-c": PODS["billing-v2-c"]}, {"c": "impostor"})
        seen = await w.load(1000)
        impostor = w.apps["billing-v2-c"]
        assert impostor.requests == collections.Counter() and impostor.connections == 0
        assert seen == {(200, "monolith"): 1000}, seen
        refused = refused_for_identity(a)
        assert refused <= 16, refused  # (before the fix: one dial per draw of the canary, ~100)
        print(f"HEADLINE impostor alone: {dict(seen)} handshakes refused={refused}")

    run(tmp_path, body)


def test_a_backend_whose_every_endpoint_sits_out_a_connect_back_off_gives_its_share_away() -> None:
    """What the impostor tests found: a backend whose only endpoint failed to connect (here: the
    canary's pods, unreachable) was still drawn for its 10 %, its endpoint redialled on each draw
    despite the back-off, and a request whose redraws landed on it again failed 502. Linkerd's
    RandomAvailable skips a backend with no ready endpoint: its share goes to the others until
    the back-off ends (a rule with nothing else still tries it, as the L4 balancer does)."""
    now = [1000.0]
    canary = {
        "weight": 10,
        "ref": {"group": "", "kind": "Service", "namespace": "shop", "name": "billing-v2", "port": 8080},
        "endpoints": [{"address": "198.18.21.2", "port": 8080}],
    }
    monolith = {
        "weight": 90,
        "ref": {
            "group": "meshagent.io",
            "kind": "Host",
            "namespace": "shop",
            "name": "billing",
            "port": 8080,
        },
        "endpoints": [{"address": "198.18.21.1", "port": 8080}],
    }
    route = {"group": "", "kind": "default", "namespace": "", "name": "http"}
    parent = {"kind": "Host", "namespace": "shop", "name": "billing", "port": 8080, "addresses": [MONOLITH]}
    doc = [{"parent": parent, "routes": [{**route, "rules": [{"backends": [canary, monolith]}]}]}]
    table = parse_routes(doc, lambda *a: pytest.fail(str(a)), ServiceTable.empty())
    ctx = RouterContext(
        table, ServiceTable.empty(), RouteMetrics(), rng=random.Random(21), clock=lambda: now[0]
    )
    [policy] = table.parents()
    refused = AttemptResult(None, None, "IO", None, connect_failed=True)
    ex = FakeExchange(lambda pick, n: refused if pick.endpoint.address == "198.18.21.2" else ok(200))

    async def requests(n: int) -> None:
        for _ in range(n):
            await dispatch(ctx, policy, policy.rules[0], ex)

    asyncio.run(requests(500))
    assert ex.errors == [] and len(ex.forwarded) == 500
    assert ex.attempts.count("198.18.21.2") == 1  # dialled once, then its share went to the monolith
    now[0] += 1.5  # the back-off (1 s) over: the canary is drawn, and dialled, again
    asyncio.run(requests(200))
    assert ex.attempts.count("198.18.21.2") == 2 and ex.errors == []


def _warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[str, object]]:
    """The warnings logged, with their structured fields (what a failure message should show)."""
    return [
        (r.getMessage(), getattr(r, "fields", None)) for r in caplog.records if r.levelno >= logging.WARNING
    ]


def _grpc_calls(port: int, threads: int, each: int) -> collections.Counter[tuple[str, str]]:
    """`threads` x `each` unary calls sharing ONE channel (one HTTP/2 app connection): (status
    code name, the answering server)."""
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    lock = threading.Lock()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        say = channel.unary_unary("/demo.Echo/Say")

        def run(n: int) -> None:
            for i in range(n):
                try:
                    key = ("OK", say(b"%d" % i, timeout=10).partition(b":")[0].decode())
                except grpc.RpcError as exc:
                    key = (exc.code().name, exc.details())  # type: ignore[attr-defined]
                with lock:
                    seen[key] += 1

        workers = [threading.Thread(target=run, args=(each,)) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    return seen


def test_grpc_calls_on_one_connection_are_split_90_10_each_over_mtls_to_its_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servers = {name: GrpcServer(name) for name in ("monolith", "pod-a", "pod-b")}

    async def body(w: Headline) -> None:
        pods = {"billing-v2-a": PODS["billing-v2-a"], "billing-v2-b": PODS["billing-v2-b"]}
        w.authority.set_discovered(discovered(w.port, pods))
        w.apply_routes()
        for name, store, served in (
            ("monolith", "billing", MONOLITH),
            ("pod-a", "billing-v2", PODS["billing-v2-a"]),
            ("pod-b", "billing-v2", PODS["billing-v2-b"]),
        ):
            port = servers[name].port
            proxy = Proxy(
                ListenerSettings(
                    inbound=(loopback(served), w.port),
                    outbound=("127.0.0.1", 0),
                    detect_timeout_s=DETECT_TIMEOUT_S,
                ),
                Credentials.load(IdentityStore(w.tmp / store)),
                InboundPolicy(),
                Catalog([]),
                lambda sock, port=port: ("127.0.0.1", port),  # type: ignore[misc]
            )
            await proxy.start()
            w.proxies.append(proxy)
        directory, _ = w.directory()
        a = await w.agent(directory)
        seen = await asyncio.to_thread(_grpc_calls, w.outbound, 4, 500)
        total = sum(seen.values())
        assert total == 2000 and {code for code, _ in seen} == {"OK"}, seen
        by = {name: n for (_, name), n in seen.items()}
        assert within(by["monolith"], total, 0.9) and within(
            by.get("pod-a", 0) + by.get("pod-b", 0), total, 0.1
        )
        assert by["pod-a"] > 0 and by["pod-b"] > 0, (by, _warnings(caplog))
        assert {name: s.calls for name, s in servers.items()} == by
        assert a.stats.opened["outbound:routed"] == 1  # all 2,000 calls on one app connection
        proven = {(c.remote.rpartition(":")[0], c.spiffe_id) for c in a.peers._open.values()}
        assert proven == {("127.0.21.1", MONOLITH_ID), ("127.0.21.2", V2_ID), ("127.0.21.3", V2_ID)}
        assert a.stats.opened["outbound:h2_mtls"] == 3  # one pooled h2 connection per endpoint
        print(f"HEADLINE grpc share: {by} opened={dict(a.stats.opened)}")

    try:
        run(tmp_path, body)
    finally:
        for s in servers.values():
            s.stop()


def test_the_controller_discovers_the_pods_from_the_api_and_a_pod_leaving_its_slice_moves_its_share(
    tmp_path: Path,
) -> None:
    """The Service's endpoints as `serve --kubernetes` finds them: the controller's list+watch
    of Services, EndpointSlices and Pods (against tests/kube/apiserver.py, a TEST STAND-IN for
    the Kubernetes API server) feeds the Authority; the EndpointSlice controller then marks pod
    b not ready while 2,000 requests flow, and the next directory moves its share to pod a."""

    def served(w: Headline) -> dict[str, str]:
        return {
            e["address"]: e["identity"]
            for s in w.authority.discovered()
            if s["name"] == "billing-v2"
            for e in s["endpoints"]
        }

    async def body(w: Headline) -> None:
        with start_apiserver(w.tmp / "kubeconfig") as api:
            controller = Running(w.authority, settings(api, discovery=True))
            try:
                pods = {"billing-v2-a": PODS["billing-v2-a"], "billing-v2-b": PODS["billing-v2-b"]}
                for obj in cluster_objects(w.port, pods):
                    api.put(obj)
                both = {PODS["billing-v2-a"]: V2_ID, PODS["billing-v2-b"]: V2_ID}
                await until("both pods discovered with their identity", lambda: served(w) == both)
                w.apply_routes()
                await w.inbound("monolith", "billing", MONOLITH)
                pod_a = await w.inbound("pod-a", "billing-v2", PODS["billing-v2-a"])
                pod_b = await w.inbound("pod-b", "billing-v2", PODS["billing-v2-b"])
                directory, _ = w.directory()
                a = await w.agent(directory)

                load = asyncio.ensure_future(w.load(2000))
                while sum(app.requests["/who"] for app in w.apps.values()) < 600:  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                eps = api.get("EndpointSlice", "billing-v2-xyz", namespace="shop")
                assert eps is not None
                eps["endpoints"][1]["conditions"] = {"ready": False}
                api.put(eps)
                await until("pod b out of the Service", lambda: served(w) == {PODS["billing-v2-a"]: V2_ID})
                directory, _ = w.directory()
                a.apply(directory)
                at_apply = pod_b.requests["/who"]
                seen = await load
                total = sum(seen.values())
                assert total == 2000 and {status for status, _ in seen} == {200}, seen
                by = {name: n for (_, name), n in seen.items()}
                assert within(by["monolith"], total, 0.9), by
                assert pod_b.requests["/who"] - at_apply <= 8
                after_b, after_a = pod_b.requests["/who"], pod_a.requests["/who"]
                more = await w.load(1000)
                assert set(more) <= {(200, "monolith"), (200, "pod-a")}, more
                assert within(more[(200, "pod-a")], 1000, 0.1, 0.04), more
                assert pod_b.requests["/who"] == after_b and pod_a.requests["/who"] > after_a
                print(f"HEADLINE controller: {by} then {dict(more)} b_at_apply={at_apply} b_after={after_b}")
            finally:
                await controller.close()

    run(tmp_path, body)
