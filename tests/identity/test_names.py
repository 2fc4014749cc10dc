from __future__ import annotations

import pytest

from agent.identity.names import InvalidName, WorkloadIdentity


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
