"""Linkerd and SMI policy objects mapped onto meshagent's per-port policy (issue #17): the
mappings Linkerd's policy controller defines, and every refusal with the field it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.authority.kube_objects import WorkloadPort
from agent.authority.kube_policy import (
    MAX_BYTES,
    ClusterSettings,
    Grant,
    HostView,
    KubePolicyError,
    combine,
    host_policy,
    host_ports,
    identity_pattern,
    identity_policies,
    parse_policy,
)
from agent.authority.storage import PolicyRecord
from agent.identity.names import WorkloadIdentity
from agent.proxy.policy import DefaultPolicy, InboundPolicy, PortPolicy

FIXTURES = Path(__file__).parent / "policy_fixtures"
TD = "cluster.local"
CLUSTER = ClusterSettings(TD)
S = f"spiffe://{TD}"


def host(ns: str, name: str, labels: dict[str, str] | None = None, **ports: int) -> HostView:
    return HostView(
        WorkloadIdentity(TD, ns, name),
        labels or {},
        tuple(WorkloadPort(n.replace("_", "-"), p) for n, p in ports.items()),
    )


BILLING = host("shop", "billing", {"app": "billing"}, http=8080, metrics=9100)


# --- mappings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "h", "default", "expected"),
    [
        (
            "linkerd_billing.yaml",
            BILLING,
            "all-unauthenticated",
            [
                (0, "all-unauthenticated", ()),  # ports no Server selects: the cluster default
                (5432, "all-authenticated", ()),  # accessPolicy all-authenticated, no AuthorizationPolicy
                (8080, "deny", (f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/*")),  # named port http
                (9100, "audit", (f"{S}/ns/monitoring/sa/prometheus",)),  # audit + a ServiceAccount ref
            ],
        ),
        # No default given: the host's own default is left alone (no port-0 record).
        ("linkerd_billing.yaml", BILLING, None, None),
        # matchExpressions In [billing, ledger]: the db Server only; billing's named ports are absent.
        (
            "linkerd_billing.yaml",
            host("shop", "ledger", {"app": "ledger"}, http=8080),
            None,
            [(5432, "all-authenticated", ())],
        ),
        # A Server whose named port the host lacks skips it (index.rs: `continue`).
        (
            "linkerd_billing.yaml",
            host("shop", "billing", {"app": "billing"}),
            None,
            [(5432, "all-authenticated", ())],
        ),
        # Servers select workloads of their own namespace only.
        ("linkerd_billing.yaml", host("other", "billing", {"app": "billing"}, http=8080), None, []),
        (
            "linkerd_namespace.yaml",
            host("legacy", "erp", {"tier": "erp"}, health=8081),
            "deny",
            [
                (0, "deny", ()),
                # erp-health: accessPolicy deny, but the Namespace policy and an empty
                # requiredAuthenticationRefs one target it: the empty one admits anyone.
                (8081, "all-unauthenticated", ()),
                # erp: v1beta3's default accessPolicy (deny) + the Namespace-wide policy's identityRefs.
                (8443, "deny", (f"{S}/ns/legacy/sa/reports", f"{S}/ns/shop/sa/api", f"{S}/ns/finance/sa/*")),
            ],
        ),
        (
            "smi_traffic_target.yaml",
            host("data", "pg", {}, postgres=5432),
            None,
            [
                (0, "deny", (f"{S}/ns/ops/sa/dba",)),  # TCPRoute without matches: every port
                # SMI is additive: the port's own target's sources and the every-port target's.
                (5432, "deny", (f"{S}/ns/ops/sa/dba", f"{S}/ns/shop/sa/orders", f"{S}/ns/data/sa/migrator")),
            ],
        ),
        ("smi_traffic_target.yaml", host("data", "replica"), None, []),
    ],
    ids=[
        "billing",
        "billing-no-default",
        "ledger-expression",
        "named-port-missing",
        "other-namespace",
        "namespace-target",
        "smi",
        "smi-other-sa",
    ],
)
def test_fixture_mappings(
    file: str, h: HostView, default: str | None, expected: list[tuple[int, str, tuple[str, ...]]] | None
) -> None:
    policy = parse_policy((FIXTURES / file).read_text(), ClusterSettings(TD, default_policy=default))
    got = [(r.port, r.default.value, r.allow) for r in host_ports(policy, h)]
    if expected is None:  # the same as with a default, minus port 0
        with_default = parse_policy((FIXTURES / file).read_text(), ClusterSettings(TD, default_policy="deny"))
        expected = [(r.port, r.default.value, r.allow) for r in host_ports(with_default, h) if r.port]
    assert got == expected


def test_records_drive_the_proxy_as_linkerd_would() -> None:
    """The records, loaded as the hosts load them, admit exactly whom Linkerd would."""
    policy = parse_policy((FIXTURES / "linkerd_billing.yaml").read_text(), CLUSTER)
    records = host_policy(policy, BILLING)
    assert all(r.identity == "shop/billing" for r in records)
    inbound = InboundPolicy(
        ports={r.port: PortPolicy(DefaultPolicy(r.default_policy), r.allow) for r in records}
    )
    web, pay, rogue = f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/pay", f"{S}/ns/shop/sa/rogue"
    assert inbound.authorize(8080, web, TD).allowed
    assert inbound.authorize(8080, pay, TD).allowed
    assert inbound.authorize(8080, rogue, TD).reason == "not_authorized"
    assert inbound.authorize(8080, None, TD).reason == "unauthenticated"
    assert inbound.authorize(5432, rogue, TD).allowed
    assert inbound.authorize(5432, None, TD).reason == "unauthenticated"
    prom = inbound.authorize(9100, f"{S}/ns/monitoring/sa/prometheus", TD)
    assert prom.allowed and prom.audit == ""
    audited = inbound.authorize(9100, None, TD)
    assert audited.allowed and audited.audit == "unauthenticated"


def test_the_oldest_server_wins_a_port_then_the_name() -> None:
    def server(name: str, created: str, access: str) -> str:
        stamp = f"\n  creationTimestamp: '{created}'" if created else ""
        return f"""---
apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata:
  namespace: shop
  name: {name}{stamp}
spec:
  externalWorkloadSelector: {{}}
  port: 8080
  accessPolicy: {access}
"""

    text = server("a", "2026-05-01T00:00:00Z", "deny") + server(
        "b", "2026-01-01T00:00:00Z", "all-authenticated"
    )
    [result] = host_ports(parse_policy(text, CLUSTER), BILLING)
    assert (result.source, result.default) == ("Server shop/b", DefaultPolicy.ALL_AUTHENTICATED)
    text = server("b", "", "deny") + server("a", "", "all-authenticated")
    [result] = host_ports(parse_policy(text, CLUSTER), BILLING)
    assert result.source == "Server shop/a"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("*", ("", True)),
        ("web.shop.serviceaccount.identity.linkerd.cluster.local", (f"{S}/ns/shop/sa/web", False)),
        (f"{S}/ns/shop/sa/web", (f"{S}/ns/shop/sa/web", False)),
        ("*.shop.serviceaccount.identity.linkerd.cluster.local", (f"{S}/ns/shop/sa/*", False)),
        ("*.serviceaccount.identity.linkerd.cluster.local", (f"{S}/ns/*/sa/*", False)),
        ("*.identity.linkerd.cluster.local", (f"{S}/ns/*/sa/*", False)),
        ("*.linkerd.cluster.local", (f"{S}/ns/*/sa/*", False)),
        (
            "*.shop.serviceaccount.identity.linkerd.other.example",
            ("spiffe://other.example/ns/shop/sa/*", False),
        ),
    ],
)
def test_identity_patterns(value: str, expected: tuple[str, bool]) -> None:
    assert identity_pattern(value, CLUSTER) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("*.*.serviceaccount.identity.linkerd.cluster.local", "Linkerd matches only a leading '*.'"),
        ("web.*.serviceaccount.identity.linkerd.cluster.local", "is not its whole first label"),
        (f"{S}/ns/shop/sa/*", "Linkerd compares SPIFFE IDs exactly"),
        ("spiffe://cluster.local/web", "is not a workload SPIFFE ID"),
        ("web.shop.serviceaccount.identity.istio.cluster.local", "names the mesh 'istio'"),
        ("*.local", "has no exact SPIFFE equivalent"),
        ("*.cluster.local", "has no exact SPIFFE equivalent"),
        ("example.com", "is not a mesh identity name"),
    ],
)
def test_identity_patterns_refused(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        identity_pattern(value, CLUSTER)
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("grants", "audit", "expected"),
    [
        ([], False, (DefaultPolicy.DENY, ())),
        ([], True, (DefaultPolicy.AUDIT, ())),
        (
            [Grant("a", anyone=True), Grant("b", patterns=("spiffe://x/ns/a/sa/b",))],
            True,
            (DefaultPolicy.ALL_UNAUTHENTICATED, ()),
        ),
        (
            [Grant("a", any_identity=True), Grant("b", patterns=(f"{S}/ns/a/sa/b",))],
            False,
            (DefaultPolicy.ALL_AUTHENTICATED, ()),
        ),
        # Another trust domain's identity is not covered by meshagent's all-authenticated.
        (
            [Grant("a", any_identity=True), Grant("b", patterns=("spiffe://x/ns/a/sa/b",))],
            False,
            (DefaultPolicy.DENY, (f"{S}/*", "spiffe://x/ns/a/sa/b")),
        ),
        ([Grant("a", any_identity=True)], True, (DefaultPolicy.AUDIT, (f"{S}/*",))),
        (
            [Grant("a", patterns=("p1", "p2")), Grant("b", patterns=("p2", "p3"))],
            False,
            (DefaultPolicy.DENY, ("p1", "p2", "p3")),
        ),
    ],
    ids=["none", "audit-only", "anyone-wins", "any-identity", "foreign-td", "audit-any-identity", "union"],
)
def test_combine(grants: list[Grant], audit: bool, expected: tuple[DefaultPolicy, tuple[str, ...]]) -> None:
    assert combine(grants, audit, TD) == expected


@pytest.mark.parametrize(
    ("selector", "labels", "selected"),
    [
        ("{}", {}, True),
        ("{matchLabels: {app: billing}}", {"app": "billing", "x": "y"}, True),
        ("{matchLabels: {app: billing}}", {"app": "web"}, False),
        ("{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}", {}, True),
        ("{matchExpressions: [{key: app, operator: NotIn, values: [web]}]}", {"app": "web"}, False),
        ("{matchExpressions: [{key: app, operator: Exists}]}", {"app": ""}, True),
        ("{matchExpressions: [{key: app, operator: DoesNotExist}]}", {"app": "x"}, False),
        (
            "{matchLabels: {app: billing}, matchExpressions: [{key: tier, operator: In, values: [db]}]}",
            {"app": "billing"},
            False,
        ),
    ],
)
def test_external_workload_selector(selector: str, labels: dict[str, str], selected: bool) -> None:
    text = f"""apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {{namespace: shop, name: s}}
spec: {{externalWorkloadSelector: {selector}, port: 80, accessPolicy: deny}}
"""
    got = host_ports(parse_policy(text, CLUSTER), host("shop", "billing", labels))
    assert bool(got) == selected


# --- refusals: each names the object and field; nothing is applied -------------------------------

SERVER = """apiVersion: policy.linkerd.io/v1beta3
kind: Server
metadata: {namespace: shop, name: web}
spec: {externalWorkloadSelector: {matchLabels: {app: billing}}, port: http}
"""
MTLS = """apiVersion: policy.linkerd.io/v1alpha1
kind: MeshTLSAuthentication
metadata: {namespace: shop, name: clients}
spec: {identities: ["web.shop.serviceaccount.identity.linkerd.cluster.local"]}
"""


CLIENTS = "{kind: MeshTLSAuthentication, group: policy.linkerd.io, name: clients}"


def ap(refs: str, target: str = "{group: policy.linkerd.io, kind: Server, name: web}") -> str:
    return f"""apiVersion: policy.linkerd.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{namespace: shop, name: allow-web}}
spec: {{targetRef: {target}, requiredAuthenticationRefs: {refs}}}
"""


def doc(*parts: str) -> str:
    return "---\n" + "---\n".join(parts)


REFUSALS = [
    (
        doc(
            SERVER,
            MTLS,
            ap(f"[{CLIENTS}, {{kind: Foo, name: x}}]"),
        ),
        'AuthorizationPolicy shop/allow-web: spec.requiredAuthenticationRefs[1].kind "Foo" is not supported '
        "(use MeshTLSAuthentication or ServiceAccount)",
    ),
    (
        doc(SERVER, ap("[{kind: NetworkAuthentication, group: policy.linkerd.io, name: office}]")),
        'AuthorizationPolicy shop/allow-web: spec.requiredAuthenticationRefs[0].kind "NetworkAuthentication" '
        "(shop/office, which is not in this file) cannot be honoured",
    ),
    (
        doc(SERVER, ap("[]", "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}")),
        'AuthorizationPolicy shop/allow-web: spec.targetRef.kind "HTTPRoute": '
        "routes are not supported yet (#21)",
    ),
    (
        doc(SERVER, ap("[]", "{kind: Namespace, name: other}")),
        'spec.targetRef.name "other": a policy cannot target another namespace',
    ),
    (doc(ap("[]")), 'spec.targetRef.name "web": no Server shop/web in this file'),
    (
        doc(SERVER, ap("[{kind: MeshTLSAuthentication, group: policy.linkerd.io, name: nope}]")),
        'spec.requiredAuthenticationRefs[0].name "nope": no valid MeshTLSAuthentication shop/nope',
    ),
    (
        doc(
            SERVER,
            MTLS,
            ap(f"[{CLIENTS}, {{kind: ServiceAccount, name: web}}]"),
        ),
        "spec.requiredAuthenticationRefs[1] is a second identity requirement",
    ),
    (
        doc(ap("[]", "{group: policy.linkerd.io, kind: ServerThing, name: web}")),
        'spec.targetRef.kind "ServerThing" is not supported (use Server or Namespace)',
    ),
    (
        doc(SERVER.replace("port: http", "port: http, accessPolicy: cluster-authenticated")),
        'Server shop/web: spec.accessPolicy "cluster-authenticated" cannot be honoured',
    ),
    (
        doc(SERVER.replace("port: http", "port: http, accessPolicy: cluster-unauthenticated")),
        'spec.accessPolicy "cluster-unauthenticated" cannot be honoured',
    ),
    (
        doc(SERVER.replace("port: http", "port: http, accessPolicy: allow")),
        'spec.accessPolicy "allow" is not one of',
    ),
    (
        doc(SERVER.replace("port: http", "port: http, podSelector: {}")),
        "Server shop/web: spec must have exactly one of podSelector and externalWorkloadSelector",
    ),
    (doc(SERVER.replace("port: http", "port: 0")), "Server shop/web: spec.port 0 is not a port number"),
    (
        doc(SERVER.replace("port: http", "port: HTTP_1")),
        "Server shop/web: spec.port port name 'HTTP_1' is not a valid port name",
    ),
    (
        doc(SERVER.replace("port: http", "port: http, proxyProtocol: QUIC")),
        'spec.proxyProtocol "QUIC" is not one of',
    ),
    (
        doc(SERVER.replace("v1beta3", "v1beta1")),
        'Server shop/web: apiVersion "policy.linkerd.io/v1beta1" is not supported for Server '
        "(use policy.linkerd.io/v1beta2 or policy.linkerd.io/v1beta3)",
    ),
    (
        doc(SERVER.replace("v1beta3", "v1beta2").replace("port: http", "port: http, accessPolicy: deny")),
        "spec.accessPolicy is not a field of policy.linkerd.io/v1beta2",
    ),
    (
        doc(SERVER.replace("{app: billing}", "{app: [billing]}")),
        "spec.externalWorkloadSelector.matchLabels.app must map a string to a string",
    ),
    (
        doc(
            SERVER.replace("{matchLabels: {app: billing}}", "{matchExpressions: [{key: app, operator: In}]}")
        ),
        "spec.externalWorkloadSelector.matchExpressions[0].values must not be empty for operator In",
    ),
    (
        doc(
            SERVER.replace(
                "{matchLabels: {app: billing}}", "{matchExpressions: [{key: app, operator: Like}]}"
            )
        ),
        'matchExpressions[0].operator "Like" is not one of',
    ),
    (doc(SERVER.replace("namespace: shop, ", "")), "Server None/web: metadata.namespace is required"),
    (doc(SERVER, SERVER), "Server shop/web: metadata.name is given twice"),
    (
        doc(MTLS.replace('["web.shop', '["*.*.shop')),
        "MeshTLSAuthentication shop/clients: spec.identities[0] "
        '"*.*.shop.serviceaccount.identity.linkerd.cluster.local" has a wildcard',
    ),
    (doc(MTLS.replace("identities: [", "identities: [], x: [")), "spec.identities must not be empty"),
    (
        doc(MTLS.replace("identities:", "identityRefs: [{kind: ServiceAccount, name: a}], identities:")),
        "spec must have exactly one of identities and identityRefs",
    ),
    (
        doc(
            MTLS.replace(
                'identities: ["web.shop.serviceaccount.identity.linkerd.cluster.local"]',
                "identityRefs: [{kind: Pod, name: a}]",
            )
        ),
        'spec.identityRefs[0].kind "Pod" is not supported (use ServiceAccount or Namespace)',
    ),
    (
        doc(
            MTLS.replace(
                'identities: ["web.shop.serviceaccount.identity.linkerd.cluster.local"]',
                "identityRefs: [{kind: Namespace, name: a, namespace: b}]",
            )
        ),
        "spec.identityRefs[0].namespace must not be set",
    ),
    (
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: NetworkAuthentication\n"
        "metadata: {namespace: shop, name: office}\n"
        "spec: {networks: [{cidr: 10.0.0.0/8, except: [10.1.0.0/33]}]}\n",
        'NetworkAuthentication shop/office: spec.networks[0].except[0] "10.1.0.0/33" is not an IP network',
    ),
    (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: shop, name: c}\n",
        'ConfigMap shop/c: kind "ConfigMap" is not a policy object meshagent reads',
    ),
    (
        "apiVersion: policy.linkerd.io/v1beta1\nkind: ServerAuthorization\n"
        "metadata: {namespace: shop, name: c}\n",
        'kind "ServerAuthorization" is not read: use AuthorizationPolicy',
    ),
    (
        "apiVersion: policy.linkerd.io/v1beta3\nkind: HTTPRoute\nmetadata: {namespace: shop, name: c}\n",
        'kind "HTTPRoute" routes are not supported yet (#21)',
    ),
    ("- a\n- b\n", "document 1: is not a Kubernetes object"),
    ("a: [\n", "not valid YAML"),
    ("x: &a {k: v}\ny: *a\n", "aliases are not accepted"),
    ("[" * 3000, "not valid YAML: maximum recursion depth"),  # deep nesting: refused, not a crash
]

SMI_RULES = """apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {namespace: data, name: t}
spec:
  destination: {kind: ServiceAccount, name: pg}
  rules: RULES
  sources: SOURCES
"""
ROUTE = (
    "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {namespace: data, name: r}\n"
    "spec: {matches: {ports: [5432]}}\n"
)


def tt(rules: str = "[{kind: TCPRoute, name: r}]", sources: str = "[{kind: ServiceAccount, name: a}]") -> str:
    return SMI_RULES.replace("RULES", rules).replace("SOURCES", sources)


REFUSALS += [
    (
        doc(ROUTE, tt("[{kind: HTTPRouteGroup, name: g}]")),
        'TrafficTarget data/t: spec.rules[0].kind "HTTPRouteGroup" is not supported',
    ),
    (doc(tt()), 'TrafficTarget data/t: spec.rules[0].name "r": no TCPRoute data/r in this file'),
    (doc(ROUTE, tt(sources="[]")), "TrafficTarget data/t: spec.sources must not be empty"),
    (
        doc(ROUTE, tt(sources="[{kind: Group, name: a}]")),
        'spec.sources[0].kind "Group" is not supported (use ServiceAccount)',
    ),
    (
        doc(ROUTE, tt().replace("name: pg}", "name: pg, port: 80}")),
        "TrafficTarget data/t: spec.rules match no port of spec.destination.port",
    ),
    (
        doc(ROUTE.replace("[5432]", "[70000]"), tt()),
        'TCPRoute data/r: spec.matches.ports[0] "70000" is not a port number',
    ),
]


@pytest.mark.parametrize(("text", "says"), REFUSALS, ids=[f"r{i}" for i in range(len(REFUSALS))])
def test_refusals_name_the_object_and_field(text: str, says: str) -> None:
    with pytest.raises(KubePolicyError) as info:
        parse_policy(text, CLUSTER)
    assert any(says in p for p in info.value.problems), info.value.problems
    assert "nothing was applied" in info.value.message


def test_one_bad_object_refuses_the_whole_file() -> None:
    good = (FIXTURES / "linkerd_billing.yaml").read_text()
    bad = doc(
        SERVER.replace("name: web", "name: bad").replace(
            "port: http", "port: http, accessPolicy: cluster-authenticated"
        )
    )
    with pytest.raises(KubePolicyError) as info:
        parse_policy(good + "\n" + bad, CLUSTER)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(
        "Server shop/bad: spec.accessPolicy"
    )


def test_every_problem_is_reported_at_once() -> None:
    text = doc(
        SERVER.replace("port: http", "port: 0"),
        ap("[{kind: Foo, name: x}]"),
        "apiVersion: v1\nkind: Secret\nmetadata: {namespace: shop, name: s}\n",
    )
    with pytest.raises(KubePolicyError) as info:
        parse_policy(text, CLUSTER)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "Secret shop/s",
        "Server shop/web",
        "AuthorizationPolicy shop/allow-web",
    ]


def test_the_cluster_default_cannot_be_cluster_scoped() -> None:
    with pytest.raises(
        KubePolicyError, match='the cluster default policy "cluster-authenticated" cannot be honoured'
    ):
        parse_policy("", ClusterSettings(TD, default_policy="cluster-authenticated"))


def test_size_is_bounded() -> None:
    with pytest.raises(KubePolicyError, match=f"at most {MAX_BYTES}"):
        parse_policy("#" * (MAX_BYTES + 1), CLUSTER)


def test_a_list_object_is_read_item_by_item() -> None:
    text = "apiVersion: v1\nkind: List\nitems:\n  - " + SERVER.replace("\n", "\n    ").replace(
        "port: http}", "port: 8080, accessPolicy: audit}"
    )
    [result] = host_ports(parse_policy(text, CLUSTER), BILLING)
    assert (result.port, result.default) == (8080, DefaultPolicy.AUDIT)


def test_server_and_traffic_target_on_one_port_are_refused() -> None:
    pg = host("data", "pg", {"app": "pg"})
    server = (
        SERVER.replace("namespace: shop", "namespace: data")
        .replace("{app: billing}", "{app: pg}")
        .replace("port: http", "port: 5432")
    )
    policy = parse_policy(doc(server, ROUTE, tt()), CLUSTER)
    with pytest.raises(
        KubePolicyError,
        match=r"TrafficTarget data/t: spec\.destination selects host data/pg on port 5432, "
        r"which Server data/web also governs",
    ):
        host_ports(policy, pg)


def test_hosts_of_one_identity_must_agree() -> None:
    policy = parse_policy((FIXTURES / "linkerd_billing.yaml").read_text(), CLUSTER)
    twin = host("shop", "billing", {"app": "billing"}, http=8080, metrics=9100)
    records = identity_policies(policy, [BILLING, twin, host("shop", "ledger", {"app": "ledger"})])
    assert records == [
        PolicyRecord("shop/billing", 5432, "all-authenticated", ()),
        PolicyRecord("shop/billing", 8080, "deny", (f"{S}/ns/shop/sa/web", f"{S}/ns/checkout/sa/*")),
        PolicyRecord("shop/billing", 9100, "audit", (f"{S}/ns/monitoring/sa/prometheus",)),
        PolicyRecord("shop/ledger", 5432, "all-authenticated", ()),
    ]
    odd = host("shop", "billing", {"app": "billing"}, http=8081)
    with pytest.raises(KubePolicyError, match="hosts enrolled as shop/billing get different policies"):
        identity_policies(policy, [BILLING, odd])


def test_a_server_selects_what_the_external_workload_carries() -> None:
    """HostView.from_workload: the ExternalWorkload's own labels (meshagent's included) and
    ports, so a Server may select one host by its id label, as it would in the cluster."""
    from datetime import UTC, datetime

    from agent.authority.kube_objects import HOST_ID_LABEL, Health, HostWorkload

    workload = HostWorkload(
        host_id="h-1a2b",
        host_name="billing-1",
        identity=WorkloadIdentity(TD, "shop", "billing"),
        addresses=("10.0.0.5",),
        ports=(WorkloadPort("http", 8080),),
        health=Health(True, "AgentReady", "", datetime(2026, 1, 1, tzinfo=UTC)),
        labels=(("app", "billing"),),
    )
    view = HostView.from_workload(workload, "default")
    assert view.labels[HOST_ID_LABEL] == "h-1a2b" and view.labels["app"] == "billing"
    assert {(p.name, p.port) for p in view.ports} == {("http", 8080), ("linkerd-proxy", 4143)}
    text = SERVER.replace("{app: billing}", f"{{{HOST_ID_LABEL}: h-1a2b}}").replace(
        "port: http}", "port: http, accessPolicy: audit}"
    )
    [result] = host_ports(parse_policy(text, CLUSTER), view)
    assert (result.port, result.default) == (8080, DefaultPolicy.AUDIT)
    other = HostView.from_workload(HostWorkload(**{**workload.__dict__, "host_id": "h-ffff"}), "default")
    assert host_ports(parse_policy(text, CLUSTER), other) == []


def test_plan_says_where_each_record_comes_from() -> None:
    from agent.authority.kube_policy import plan

    policy = parse_policy(
        (FIXTURES / "linkerd_billing.yaml").read_text(), ClusterSettings(TD, default_policy="deny")
    )
    assert [(p.record.port, p.source) for p in plan(policy, [BILLING])] == [
        (0, "cluster default"),
        (5432, "Server shop/billing-db"),
        (8080, "Server shop/billing-http"),
        (9100, "Server shop/billing-metrics"),
    ]
