from __future__ import annotations

import pytest

from agent.identity.names import InvalidName, WorkloadIdentity, spiffe_pattern


@pytest.mark.parametrize(
    ("short", "spiffe", "dns"),
    [
        (
            "shop/web",
            "spiffe://cluster.local/ns/shop/sa/web",
            "web.shop.serviceaccount.identity.linkerd.cluster.local",
        ),
        (
            "kube-system/a1",
            "spiffe://cluster.local/ns/kube-system/sa/a1",
            "a1.kube-system.serviceaccount.identity.linkerd.cluster.local",
        ),
    ],
    ids=["simple", "dashes-digits"],
)
def test_names_from_short_form(short: str, spiffe: str, dns: str) -> None:
    ident = WorkloadIdentity.parse_short(short, "cluster.local")
    assert ident.spiffe_id == spiffe
    assert ident.dns_name == dns
    assert WorkloadIdentity.from_spiffe_id(spiffe) == ident


@pytest.mark.parametrize(
    "short",
    ["shop", "shop/", "/web", "shop/web/x", "Shop/web", "shop/web_1", "shop/-web", "a" * 64 + "/web"],
    ids=["no-slash", "no-name", "no-ns", "extra", "upper", "underscore", "leading-dash", "too-long"],
)
def test_bad_short_forms_are_refused_with_the_input(short: str) -> None:
    with pytest.raises(InvalidName) as err:
        WorkloadIdentity.parse_short(short, "cluster.local")
    assert err.value.message  # says what is wrong
    assert repr(short) in err.value.message  # quotes the input


@pytest.mark.parametrize(
    "uri",
    [
        "http://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://Bad_TD/ns/a/sa/b",
    ],
    ids=["scheme", "short-path", "swapped", "bad-trust-domain"],
)
def test_bad_spiffe_ids(uri: str) -> None:
    with pytest.raises(InvalidName):
        WorkloadIdentity.from_spiffe_id(uri)


def test_custom_mesh_name() -> None:
    ident = WorkloadIdentity("example.org", "ns1", "sa1", mesh="istio")
    assert ident.dns_name == "sa1.ns1.serviceaccount.identity.istio.example.org"


# --- the DNS form, and either form ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dns", "expected"),
    [
        (
            "web.shop.serviceaccount.identity.linkerd.cluster.local",
            WorkloadIdentity("cluster.local", "shop", "web"),
        ),
        ("a.b.serviceaccount.identity.istio.local", WorkloadIdentity("local", "b", "a", "istio")),
        (
            "sa.serviceaccount.serviceaccount.identity.linkerd.x.y.z",
            WorkloadIdentity("x.y.z", "serviceaccount", "sa"),
        ),
    ],
    ids=["linkerd", "other-mesh-one-label-td", "namespace-named-serviceaccount"],
)
def test_dns_names_map_to_spiffe_ids_and_back(dns: str, expected: WorkloadIdentity) -> None:
    ident = WorkloadIdentity.from_dns_name(dns)
    assert ident == expected
    assert ident.dns_name == dns
    assert WorkloadIdentity.parse_any(dns) == ident
    assert WorkloadIdentity.parse_any(ident.spiffe_id, mesh=ident.mesh) == ident


@pytest.mark.parametrize(
    "dns",
    [
        "web.shop.svc.cluster.local",
        "web.serviceaccount.identity.linkerd.cluster.local",
        "web.shop.serviceaccount.identity.linkerd",
        "Web.shop.serviceaccount.identity.linkerd.cluster.local",
        "web.shop.serviceaccount.identity.linkerd.cluster.local.",
        "web.shop.serviceaccount.identity.linkerd.cluster.local\n",
        "",
    ],
    ids=["service-name", "no-namespace", "no-trust-domain", "upper", "trailing-dot", "newline", "empty"],
)
def test_bad_dns_names_are_refused_with_the_input(dns: str) -> None:
    with pytest.raises(InvalidName) as err:
        WorkloadIdentity.from_dns_name(dns)
    assert repr(dns) in err.value.message
    with pytest.raises(InvalidName):
        WorkloadIdentity.parse_any(dns)


@pytest.mark.parametrize(
    ("pattern", "spiffe"),
    [
        ("spiffe://cluster.local/ns/shop/*", "spiffe://cluster.local/ns/shop/*"),
        ("*.shop.serviceaccount.identity.linkerd.cluster.local", "spiffe://cluster.local/ns/shop/sa/*"),
        ("web.*.serviceaccount.identity.linkerd.cluster.local", "spiffe://cluster.local/ns/*/sa/web"),
        ("web.shop.serviceaccount.identity.linkerd.cluster.local", "spiffe://cluster.local/ns/shop/sa/web"),
        ("web-?.shop.serviceaccount.identity.linkerd.td", "spiffe://td/ns/shop/sa/web-?"),
    ],
    ids=["spiffe-kept", "dns-name-glob", "dns-namespace-glob", "dns-literal", "dns-question-mark"],
)
def test_allow_patterns_map_to_the_spiffe_form(pattern: str, spiffe: str) -> None:
    assert spiffe_pattern(pattern) == spiffe


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("*", "neither a SPIFFE ID"),
        ("*.serviceaccount.identity.linkerd.cluster.local", "neither a SPIFFE ID"),
        ("*.shop.serviceaccount.identity.linkerd.*", "wildcard in its mesh or trust domain"),
        ("*.shop.serviceaccount.identity.*.cluster.local", "wildcard in its mesh or trust domain"),
        ("a/b.shop.serviceaccount.identity.linkerd.cluster.local", "is not a name or glob"),
        ("*.shop.serviceaccount.identity.linkerd.Cluster.local", "not a valid DNS name"),
        ("web.shop.svc.cluster.local", "neither a SPIFFE ID"),
    ],
    ids=["star", "no-namespace", "td-glob", "mesh-glob", "slash", "bad-td", "service-name"],
)
def test_dns_patterns_that_cannot_map_are_refused_saying_why(pattern: str, says: str) -> None:
    with pytest.raises(InvalidName) as err:
        spiffe_pattern(pattern)
    assert says in err.value.message
    assert repr(pattern) in err.value.message
