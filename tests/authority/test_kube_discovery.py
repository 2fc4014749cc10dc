"""kube_discovery.build_services: the hosts' Services from the cluster's objects, case by case."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from agent.authority.kube_discovery import Discovered, Skipped, build_services, parse_opaque_ports

TD = "cluster.local"


def service(
    name: str = "orders",
    ns: str = "shop",
    ips: list[str] | None = None,
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    kind: str = "ClusterIP",
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": {
            "type": kind,
            "clusterIPs": ["198.19.0.10"] if ips is None else ips,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
            if ports is None
            else ports,
        },
    }


def endpoint(
    address: str, pod: str | None = None, ready: bool | None = True, kind: str = "Pod", ns: str | None = None
) -> dict[str, Any]:
    doc: dict[str, Any] = {"addresses": [address]}
    if ready is not None:
        doc["conditions"] = {"ready": ready}
    if pod is not None:
        doc["targetRef"] = {"kind": kind, "name": pod, **({"namespace": ns} if ns else {})}
    return doc


def eslice(
    endpoints: list[dict[str, Any]],
    name: str = "orders-abc",
    service_name: str = "orders",
    ns: str = "shop",
    address_type: str = "IPv4",
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def pod(
    name: str,
    ns: str = "shop",
    sa: str | None = "orders",
    meshed: bool = True,
    proxy_port: int | None = None,
) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]
    if proxy_port is not None:
        containers.append(
            {"name": "linkerd-proxy", "ports": [{"name": "linkerd-proxy", "containerPort": proxy_port}]}
        )
    spec: dict[str, Any] = {"containers": containers}
    if sa is not None:
        spec["serviceAccountName"] = sa
    labels = {"linkerd.io/control-plane-ns": "linkerd"} if meshed else {}
    return {"metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec}


def build(
    services: list[Any],
    slices: list[Any] = (),  # type: ignore[assignment]
    pods: list[Any] = (),  # type: ignore[assignment]
    namespaces: list[Any] = (),  # type: ignore[assignment]
    workloads: list[Any] = (),  # type: ignore[assignment]
) -> Discovered:
    return build_services(services, slices, pods, namespaces, workloads, TD)


def only(result: Discovered) -> dict[str, Any]:
    assert len(result.services) == 1, result
    return result.services[0]


def test_a_meshed_pod_endpoint_has_its_service_accounts_identity() -> None:
    result = build(
        [service()], [eslice([endpoint("198.18.5.2", "orders-7d9")])], [pod("orders-7d9", proxy_port=4143)]
    )
    assert result.services == [
        {
            "name": "orders",
            "namespace": "shop",
            "cluster_ips": ["198.19.0.10"],
            "ports": [{"port": 80, "name": "http", "protocol": "TCP", "opaque": False}],
            "endpoints": [
                {
                    "address": "198.18.5.2",
                    "ports": {"80": 8080},
                    "identity": "spiffe://cluster.local/ns/shop/sa/orders",
                    "server_name": "orders.shop.serviceaccount.identity.linkerd.cluster.local",
                    "proxy_port": 4143,
                    "source": "pod:shop/orders-7d9",
                }
            ],
        }
    ]
    assert result.skipped == [] and result.notes == []


def test_the_proxy_port_comes_from_the_proxy_container() -> None:
    env_pod = pod("a")
    env_pod["spec"]["containers"].append(
        {
            "name": "linkerd-proxy",
            "env": [{"name": "LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "value": "[::]:4999"}],
        }
    )
    native = pod("b")
    native["spec"]["initContainers"] = [
        {"name": "linkerd-proxy", "ports": [{"name": "linkerd-proxy", "containerPort": 4200}]}
    ]
    result = build(
        [service()],
        [eslice([endpoint("198.18.5.1", "a"), endpoint("198.18.5.2", "b"), endpoint("198.18.5.3", "c")])],
        [env_pod, native, pod("c")],
    )
    assert [e["proxy_port"] for e in only(result)["endpoints"]] == [4999, 4200, 4143]


def test_a_service_without_endpoints_is_served_empty() -> None:
    result = build([service()])
    assert only(result)["endpoints"] == []
    result = build([service()], [eslice([])])
    assert only(result)["endpoints"] == []


def test_an_endpoint_without_service_account_uses_default() -> None:
    result = build([service()], [eslice([endpoint("198.18.5.2", "p")])], [pod("p", sa=None)])
    assert only(result)["endpoints"][0]["identity"] == "spiffe://cluster.local/ns/shop/sa/default"


@pytest.mark.parametrize(
    ("pods", "ref", "note"),
    [
        ([], "p", "pod not found"),
        ([pod("p", meshed=False)], "p", "pod not meshed"),
        (
            [
                {
                    **pod("p"),
                    "metadata": {
                        "name": "p",
                        "namespace": "shop",
                        "labels": {"linkerd.io/control-plane-ns": "other"},
                    },
                }
            ],
            "p",
            "control plane 'other'",
        ),
        ([], None, "without a Pod or ExternalWorkload"),
    ],
)
def test_endpoints_without_identity_are_served_plaintext_with_a_note(
    pods: list[Any], ref: str | None, note: str
) -> None:
    result = build([service()], [eslice([endpoint("198.18.5.2", ref)])], pods)
    (ep,) = only(result)["endpoints"]
    assert (ep["identity"], ep["server_name"], ep["proxy_port"]) == (None, None, None)
    assert ep["ports"] == {"80": 8080}
    assert len(result.notes) == 1 and note in result.notes[0].reason, result.notes
    assert ep["source"] == (f"pod:shop/{ref}" if ref else "endpointslice:shop/orders-abc")
    assert result.skipped == []


def test_not_ready_endpoints_are_left_out_unset_ready_counts_as_ready() -> None:
    result = build(
        [service()],
        [eslice([endpoint("198.18.5.1", "p", ready=False), endpoint("198.18.5.2", "p", ready=None)])],
        [pod("p")],
    )
    assert [e["address"] for e in only(result)["endpoints"]] == ["198.18.5.2"]


def test_dual_stack_service_and_slices() -> None:
    result = build(
        [service(ips=["198.19.0.10", "2001:db8::a"])],
        [
            eslice([endpoint("2001:db8::5:2", "p")], name="orders-v6", address_type="IPv6"),
            eslice([endpoint("198.18.5.2", "p")], name="orders-v4"),
        ],
        [pod("p")],
    )
    svc = only(result)
    assert svc["cluster_ips"] == ["198.19.0.10", "2001:db8::a"]
    assert [e["address"] for e in svc["endpoints"]] == ["198.18.5.2", "2001:db8::5:2"]
    assert {e["identity"] for e in svc["endpoints"]} == {"spiffe://cluster.local/ns/shop/sa/orders"}


def test_headless_service_has_no_cluster_ip() -> None:
    assert only(build([service(ips=["None"])]))["cluster_ips"] == []
    headless = service()
    del headless["spec"]["clusterIPs"]
    headless["spec"]["clusterIP"] = "None"
    assert only(build([headless]))["cluster_ips"] == []


def test_ports_are_matched_by_name_and_a_single_unnamed_port_matches() -> None:
    two = service(
        ports=[
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "grpc", "port": 9090, "protocol": "TCP"},
        ]
    )
    # Slice ports in another order, with other numbers: the name decides.
    sl = eslice(
        [endpoint("198.18.5.2", "p")],
        ports=[
            {"name": "grpc", "port": 19090, "protocol": "TCP"},
            {"name": "http", "port": 8080, "protocol": "TCP"},
        ],
    )
    assert only(build([two], [sl], [pod("p")]))["endpoints"][0]["ports"] == {"80": 8080, "9090": 19090}

    unnamed = service(ports=[{"port": 80}])
    sl = eslice([endpoint("198.18.5.2", "p")], ports=[{"port": 8080}])
    svc = only(build([unnamed], [sl], [pod("p")]))
    assert svc["ports"] == [{"port": 80, "name": "", "protocol": "TCP", "opaque": False}]
    assert svc["endpoints"][0]["ports"] == {"80": 8080}


def test_a_slice_whose_ports_match_nothing_is_skipped() -> None:
    sl = eslice([endpoint("198.18.5.2", "p")], ports=[{"name": "metrics", "port": 9100}])
    result = build([service()], [sl], [pod("p")])
    assert only(result)["endpoints"] == []
    assert [s.source for s in result.skipped] == ["endpointslice:shop/orders-abc"]


def test_non_tcp_ports_skipped_and_reported_udp_only_service_left_out() -> None:
    mixed = service(
        ports=[
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
    )
    result = build([mixed])
    assert only(result)["ports"] == [{"port": 53, "name": "dns-tcp", "protocol": "TCP", "opaque": False}]
    assert result.skipped == [Skipped("service:shop/orders", "port 53/UDP: only TCP is served")]
    result = build([service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])])
    assert result.services == [] and Skipped("service:shop/orders", "no TCP port") in result.skipped


def test_external_name_and_fqdn_slices_are_skipped() -> None:
    result = build([service(kind="ExternalName", ips=[])])
    assert result.services == [] and "ExternalName" in result.skipped[0].reason
    result = build([service()], [eslice([{"addresses": ["db.example.com"]}], address_type="FQDN")])
    assert only(result)["endpoints"] == [] and "FQDN" in result.skipped[0].reason


def test_opaque_ports_from_the_service_else_the_namespace() -> None:
    ports = [{"name": "mysql", "port": 3306}, {"name": "x", "port": 4050}, {"name": "http", "port": 80}]
    ns = [{"metadata": {"name": "shop", "annotations": {"config.linkerd.io/opaque-ports": "80"}}}]

    def opaque(svc: dict[str, Any]) -> dict[int, bool]:
        return {p["port"]: p["opaque"] for p in only(build([svc], namespaces=ns))["ports"]}

    on_service = service(ports=ports, annotations={"config.linkerd.io/opaque-ports": "3306,4000-4100"})
    assert opaque(on_service) == {3306: True, 4050: True, 80: False}
    by_name = service(ports=ports, annotations={"config.linkerd.io/opaque-ports": "mysql, "})
    assert opaque(by_name) == {3306: True, 4050: False, 80: False}
    assert opaque(service(ports=ports)) == {3306: False, 4050: False, 80: True}  # the namespace's
    # Present and empty on the Service: it decides (no opaque port), as in Linkerd.
    assert opaque(service(ports=ports, annotations={"config.linkerd.io/opaque-ports": ""})) == {
        3306: False,
        4050: False,
        80: False,
    }


def test_opaque_port_parser_ignores_what_linkerd_ignores() -> None:
    assert parse_opaque_ports("3306,4000-4100,", {}) == ([(3306, 3306), (4000, 4100)], [])
    assert parse_opaque_ports("x, 9-1, 70000, 1-2-3, 25", {"db": 5432}) == (
        [(25, 25)],
        ["x", "9-1", "70000", "1-2-3"],
    )
    result = build([service(annotations={"config.linkerd.io/opaque-ports": "nope,80"})])
    assert only(result)["ports"][0]["opaque"] is True
    assert any("'nope' ignored" in s.reason for s in result.skipped)


def test_external_workload_endpoints_carry_their_mesh_tls() -> None:
    ew = {
        "metadata": {"name": "vm-1", "namespace": "shop"},
        "spec": {
            "meshTLS": {
                "identity": "spiffe://cluster.local/ns/shop/sa/billing",
                "serverName": "billing.shop.serviceaccount.identity.linkerd.cluster.local",
            },
            "ports": [{"name": "linkerd-proxy", "port": 4199}, {"name": "http", "port": 8080}],
        },
    }
    bad = copy.deepcopy(ew)
    bad["metadata"]["name"] = "vm-2"
    bad["spec"]["meshTLS"]["identity"] = "billing.shop.serviceaccount.identity.linkerd.cluster.local"
    sl = eslice(
        [
            endpoint("198.18.7.1", "vm-1", kind="ExternalWorkload"),
            endpoint("198.18.7.2", "vm-2", kind="ExternalWorkload"),
            endpoint("198.18.7.3", "vm-3", kind="ExternalWorkload"),
        ]
    )
    result = build([service()], [sl], workloads=[ew, bad])
    (ep,) = only(result)["endpoints"]
    assert ep == {
        "address": "198.18.7.1",
        "ports": {"80": 8080},
        "identity": "spiffe://cluster.local/ns/shop/sa/billing",
        "server_name": "billing.shop.serviceaccount.identity.linkerd.cluster.local",
        "proxy_port": 4199,
        "source": "externalworkload:shop/vm-1",
    }
    reasons = {s.source: s.reason for s in result.skipped}
    assert "not a SPIFFE ID" in reasons["endpointslice:shop/orders-abc#1"]
    assert "not found" in reasons["endpointslice:shop/orders-abc#2"]


def test_the_same_address_in_two_slices_is_one_endpoint() -> None:
    a = eslice([endpoint("198.18.5.2", "p")], name="orders-a")
    b = eslice([endpoint("198.18.5.2", "p")], name="orders-b")
    assert len(only(build([service()], [a, b], [pod("p")]))["endpoints"]) == 1


MALFORMED: list[tuple[str, str, Any]] = [
    ("service", "not an object", "text"),
    ("service", "no metadata", {"spec": {}}),
    ("service", "name not a string", {"metadata": {"name": 7, "namespace": "shop"}, "spec": {}}),
    ("service", "ports not a list", {**service(), "spec": {"ports": {"a": 1}}}),
    ("service", "port a string", service(ports=[{"port": "80"}])),
    ("service", "port a bool", service(ports=[{"port": True}])),
    ("service", "port out of range", service(ports=[{"port": 0}])),
    ("service", "bad cluster IP", service(ips=["300.1.1.1"])),
    ("service", "cluster IP not a string", service(ips=[5])),
    ("service", "three cluster IPs", service(ips=["198.19.0.1", "198.19.0.2", "198.19.0.3"])),
    ("slice", "endpoints not a list", {**eslice([]), "endpoints": "x"}),
    ("slice", "no address type", {k: v for k, v in eslice([]).items() if k != "addressType"}),
    ("slice", "slice port not a number", eslice([], ports=[{"name": "http", "port": "8080"}])),
    ("endpoint", "address not an IP", eslice([endpoint("not-an-ip", "p")])),
    ("endpoint", "v6 address in a v4 slice", eslice([endpoint("2001:db8::1", "p")])),
    ("endpoint", "ready not a bool", eslice([{"addresses": ["198.18.5.9"], "conditions": {"ready": "yes"}}])),
    (
        "endpoint",
        "targetRef name missing",
        eslice([{"addresses": ["198.18.5.9"], "targetRef": {"kind": "Pod"}}]),
    ),
    ("endpoint", "targetRef not an object", eslice([{"addresses": ["198.18.5.9"], "targetRef": "p"}])),
    ("endpoint", "addresses not a list", eslice([{"addresses": "198.18.5.9"}])),
    ("pod", "pod with a bad service account", pod("bad", sa="Not_A_Name")),
    (
        "pod",
        "pod spec not an object",
        {
            "metadata": {
                "name": "bad",
                "namespace": "shop",
                "labels": {"linkerd.io/control-plane-ns": "linkerd"},
            },
            "spec": [],
        },
    ),
]


@pytest.mark.parametrize(("where", "what", "obj"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_a_malformed_object_is_skipped_with_a_reason_and_the_rest_is_served(
    where: str, what: str, obj: Any
) -> None:
    good_service = service(name="ok")
    good_slice = eslice([endpoint("198.18.5.2", "p")], name="ok-1", service_name="ok")
    services, slices, pods = [good_service], [good_slice], [pod("p")]
    if where == "service":
        services.append(obj)
    elif where == "pod":
        pods.append(obj)
        slices.append(eslice([endpoint("198.18.5.3", "bad")]))
        services.append(service())
    else:
        slices.append(obj)
        services.append(service())
    result = build(services, slices, pods)
    assert result.skipped, what
    ok = next(s for s in result.services if s["name"] == "ok")
    assert [e["address"] for e in ok["endpoints"]] == ["198.18.5.2"]


def test_mangled_objects_never_raise() -> None:
    """Every field of every input replaced, one at a time, by values of the wrong type."""
    rng = random.Random(17)
    base = (
        [service(annotations={"config.linkerd.io/opaque-ports": "80"})],
        [eslice([endpoint("198.18.5.2", "p"), endpoint("198.18.7.1", "vm", kind="ExternalWorkload")])],
        [pod("p", proxy_port=4143)],
        [{"metadata": {"name": "shop", "annotations": {"config.linkerd.io/opaque-ports": "1-9"}}}],
        [
            {
                "metadata": {"name": "vm", "namespace": "shop"},
                "spec": {"meshTLS": {"identity": "spiffe://x/y", "serverName": "y.x"}},
            }
        ],
    )
    wrong = [None, 0, -1, True, "", "x", [], {}, [None], {"a": None}, 1.5, 2**70]

    def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        found = [prefix]
        if isinstance(obj, dict):
            for k, v in obj.items():
                found += paths(v, (*prefix, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                found += paths(v, (*prefix, i))
        return found

    count = 0
    for target in range(len(base)):
        for path in paths(base[target])[1:]:
            for value in rng.sample(wrong, 4):
                inputs = copy.deepcopy(base)
                holder: Any = inputs[target]
                for key in path[:-1]:
                    holder = holder[key]
                holder[path[-1]] = value
                build_services(*inputs, TD)  # must not raise
                count += 1
    assert count > 200


def test_output_order_does_not_depend_on_input_order() -> None:
    services = [service(name=f"s{i}", ns=f"n{i % 3}") for i in range(9)]
    slices = [
        eslice(
            [endpoint(f"198.18.{i}.{j}", f"p{i}-{j}", ns=f"n{i % 3}") for j in range(5)],
            name=f"s{i}-x",
            service_name=f"s{i}",
            ns=f"n{i % 3}",
        )
        for i in range(9)
    ]
    pods = [pod(f"p{i}-{j}", ns=f"n{i % 3}", meshed=j % 2 == 0) for i in range(9) for j in range(5)]
    first = build(services, slices, pods)
    rng = random.Random(3)
    for _ in range(3):
        for items in (services, slices, pods):
            rng.shuffle(items)
        again = build(services, slices, pods)
        assert again.services == first.services and again.notes == first.notes


def test_five_thousand_endpoints() -> None:
    """The size issue #17 names: 50 Services of 100 endpoints each (slices of 100, as the
    EndpointSlice controller cuts them)."""
    services, slices, pods = [], [], []
    for s in range(50):
        services.append(service(name=f"svc-{s}", ips=[f"198.19.{s}.1"]))
        eps = []
        for e in range(100):
            name = f"svc-{s}-{e}"
            pods.append(pod(name, sa=f"sa-{s}"))
            eps.append(endpoint(f"198.18.{s}.{e + 1}", name))
        slices.append(eslice(eps, name=f"svc-{s}-x", service_name=f"svc-{s}"))
    result = build(services, slices, pods)
    assert sum(len(s["endpoints"]) for s in result.services) == 5000
    assert result.skipped == [] and result.notes == []
    assert (
        result.services[7]["endpoints"][3]["identity"]
        == f"spiffe://{TD}/ns/shop/sa/sa-{int(result.services[7]['name'][4:])}"
    )


def test_the_agents_parser_takes_what_discovery_writes() -> None:
    """The contract both sides code against (interfaces §1/§3): nothing the builder writes is
    rejected by agent/proxy/services.py."""
    from agent.proxy.services import parse_services

    services = [
        service(),
        service(
            name="dual",
            ips=["198.19.0.11", "2001:db8::b"],
            annotations={"config.linkerd.io/opaque-ports": "80"},
        ),
        service(name="headless", ips=["None"]),
    ]
    slices = [
        eslice(
            [
                endpoint("198.18.5.2", "p"),
                endpoint("198.18.5.3", "plain"),
                endpoint("198.18.5.4"),
                endpoint("198.18.5.5", "gone"),
            ]
        ),
        eslice([endpoint("198.18.6.2", "p")], name="dual-4", service_name="dual"),
        eslice([endpoint("2001:db8::6:2", "p")], name="dual-6", service_name="dual", address_type="IPv6"),
        eslice([endpoint("198.18.8.2", "p")], name="headless-1", service_name="headless"),
    ]
    result = build(services, slices, [pod("p"), pod("plain", meshed=False)])
    rejected: list[Any] = []
    table = parse_services(result.services, lambda *reason: rejected.append(reason))
    assert rejected == [] and len(table) == 3
    found = table.lookup("2001:db8::b", 80)
    assert found is not None and found.ports == {80: True} and len(found.endpoints) == 2


def test_without_annotations_linkerds_default_opaque_ports_apply() -> None:
    ports = [{"name": "mysql", "port": 3306}, {"name": "http", "port": 80}]
    svc = only(build([service(ports=ports)]))
    assert {p["port"]: p["opaque"] for p in svc["ports"]} == {3306: True, 80: False}
    custom = build_services([service(ports=ports)], [], [], [], [], TD, default_opaque_ports="80")
    assert {p["port"]: p["opaque"] for p in only(custom)["ports"]} == {3306: False, 80: True}


def test_target_ports_that_skip_the_proxy_lose_the_identity_only_when_all_do() -> None:
    two = service(ports=[{"name": "http", "port": 80}, {"name": "admin", "port": 9000}])
    sl = eslice(
        [endpoint("198.18.5.1", "all"), endpoint("198.18.5.2", "some")],
        ports=[{"name": "http", "port": 8080}, {"name": "admin", "port": 9990}],
    )
    every, some = pod("all"), pod("some")
    every["metadata"]["annotations"] = {"config.linkerd.io/skip-inbound-ports": "8000-8999,9990"}
    some["metadata"]["annotations"] = {"config.linkerd.io/skip-inbound-ports": "9990"}
    result = build([two], [sl], [every, some])
    identities = {e["source"]: e["identity"] for e in only(result)["endpoints"]}
    assert identities == {"pod:shop/all": None, "pod:shop/some": "spiffe://cluster.local/ns/shop/sa/orders"}
    assert [n.source for n in result.notes] == ["pod:shop/all", "pod:shop/some"]
