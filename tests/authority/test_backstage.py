"""The Backstage export (issue #20): agent/authority/backstage.py and `meshagent authority
backstage export`.

Every document is checked against Backstage's own published schemas (Component.v1alpha1 over
Entity, EntityMeta and common, tests/authority/schemas/backstage/, resolved by $id as Backstage's
ajv does) and against the naming rules Backstage enforces in code (KubernetesValidatorFunctions:
names, namespaces, annotation keys, tags), re-stated here from its source."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from agent.authority import backstage as bs
from agent.authority import edges as edges_mod
from agent.authority.host_meta import HostMeta
from agent.authority.storage import HostRecord

SCHEMAS = Path(__file__).parent / "schemas" / "backstage"
TD = "cluster.local"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _validator(kind: str) -> jsonschema.Draft7Validator:
    files = [
        f"kinds/{kind}.v1alpha1.schema.json",
        "Entity.schema.json",
        "EntityMeta.schema.json",
        "shared/common.schema.json",
    ]
    docs = [json.loads((SCHEMAS / f).read_text()) for f in files]
    # Backstage's ajv knows each schema by its $id ("Entity", "common#relation", ...).
    registry: Registry[Any] = Registry().with_resources((d["$id"], Resource.from_contents(d)) for d in docs)
    return jsonschema.Draft7Validator(docs[0], registry=registry)


COMPONENT = _validator("Component")
LOCATION = _validator("Location")
# Backstage's validation/KubernetesValidatorFunctions.ts and CommonValidatorFunctions.ts.
_OBJECT_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]+(\-[a-z0-9]+)*$")


def _is_object_name(v: str) -> bool:
    return 1 <= len(v) <= 63 and _OBJECT_NAME.match(v) is not None


def _is_dns_label(v: str) -> bool:
    return 1 <= len(v) <= 63 and _DNS_LABEL.match(v) is not None


def _is_dns_subdomain(v: str) -> bool:
    return 1 <= len(v) <= 253 and all(_is_dns_label(p) for p in v.split("."))


def _is_prefixed_name(v: str) -> bool:
    parts = v.split("/")
    if len(parts) == 1:
        return _is_object_name(parts[0])
    return len(parts) == 2 and _is_dns_subdomain(parts[0]) and _is_object_name(parts[1])


def _is_ref(v: str, kind: str) -> bool:
    m = re.fullmatch(r"([a-z]+):([^/]+)/(.+)", v)
    return m is not None and m.group(1) == kind and _is_dns_label(m.group(2)) and _is_object_name(m.group(3))


def assert_backstage_valid(doc: dict[str, Any]) -> None:
    """The published schema, then the rules Backstage's catalog applies in code."""
    errors = sorted(COMPONENT.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    meta = doc["metadata"]
    assert _is_object_name(meta["name"]), meta["name"]
    assert all(_is_prefixed_name(k) and isinstance(v, str) for k, v in meta.get("annotations", {}).items())
    assert all(_is_dns_label(t) for t in meta.get("tags", []))
    spec = doc["spec"]
    assert spec["owner"] == bs.UNKNOWN_OWNER or _is_ref(spec["owner"], "group"), spec["owner"]
    assert "system" not in spec or _is_ref(spec["system"], "system")
    assert all(_is_ref(r, "component") for r in spec.get("dependsOn", [])), spec.get("dependsOn")


def Edge(src: str, dst: str, src_host: str | None, dst_host: str | None) -> edges_mod.Edge:
    """An edges.Edge with traffic (the export reads only its ends)."""
    return edges_mod.Edge(src, dst, src_host, dst_host, requests=10.0, rps=1.0, success_rate=1.0, p99_ms=5.0)


def host(
    hid: str, name: str, identity: str = "shop/billing", *, enrolled: int = 0, revoked: bool = False
) -> HostRecord:
    at = T0 + timedelta(minutes=enrolled)
    return HostRecord(
        id=hid,
        identity=identity,
        host_name=name,
        addresses=("198.18.0.10",),
        serial="01",
        not_after=at + timedelta(days=1),
        cert_pem="",
        enrolled_at=at,
        last_renewal=None,
        revoked_at=at if revoked else None,
    )


def dns(identity: str) -> str:
    ns, _, name = identity.partition("/")
    return f"{name}.{ns}.serviceaccount.identity.linkerd.{TD}"


def spiffe(h: HostRecord) -> str:
    ns, _, name = h.identity.partition("/")
    return f"spiffe://{TD}/ns/{ns}/sa/{name}"


def run_export(
    hosts: list[HostRecord], metas: dict[str, Any] | None = None, edges: list[Edge] | None = None, **opts: Any
) -> bs.Export:
    return bs.export(hosts, metas or {}, edges, lambda h: dns(h.identity), spiffe, bs.Options(**opts))


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("legacy-db-1", "legacy-db-1"),
        ("Legacy_DB.Example.COM", "legacy_db.example.com"),
        ("  billing host #2 ", "billing-host-2"),
        ("--a..b__c--", "a.b_c"),
        ("ünïcode", "n-code"),
        ("x" * 100, "x" * 63),
        ("!!!", ""),
    ],
)
def test_sanitize_name(text: str, name: str) -> None:
    assert bs.sanitize_name(text) == name
    assert name == "" or _is_object_name(name)


def test_names_are_unique_and_the_first_enrolled_keeps_the_plain_name() -> None:
    hosts = [
        host("h-bbbbbbbbbbbb", "Web.1", enrolled=2),
        host("h-aaaaaaaaaaaa", "web-1", enrolled=3),
        host("h-cccccccccccc", "web_1", enrolled=1),
        host("h-dddddddddddd", "WEB.1", enrolled=0),
        host("h-eeeeeeeeeeee", "!!!", enrolled=4),
        host("h-ffffffffffff", "y" * 80, enrolled=5),
        host("h-ffffff000000", "y" * 90, enrolled=6),
    ]
    names = bs.component_names(hosts)
    assert names == {
        "h-dddddddddddd": "web.1",
        "h-bbbbbbbbbbbb": "web.1-bbbbbb",
        "h-cccccccccccc": "web_1",
        "h-aaaaaaaaaaaa": "web-1",
        "h-eeeeeeeeeeee": "host",
        "h-ffffffffffff": "y" * 63,
        "h-ffffff000000": "y" * 56 + "-ffffff",
    }
    # Deterministic whatever order the registry lists them in.
    assert bs.component_names(list(reversed(hosts))) == names


def test_a_suffixed_name_taken_by_another_hosts_own_name_gets_the_full_id() -> None:
    hosts = [
        host("h-abcdef000001", "web", enrolled=0),
        host("h-abcdef000002", "web-abcdef", enrolled=1),
        host("h-abcdef000003", "web", enrolled=2),
    ]
    names = bs.component_names(hosts)
    assert names["h-abcdef000003"] == "web-abcdef000003"
    assert len(set(names.values())) == 3


# --- documents -----------------------------------------------------------------------------------


def test_host_with_metadata() -> None:
    h = host("h-000000000001", "legacy-db-1")
    meta = HostMeta(
        owner_team="Team A",
        owner_contact="team-a@example.com",
        description="Billing database",
        system="payments",
        tier="1",
        links=(
            ("runbook", "https://runbooks.example.com/db"),
            ("dashboard", "https://grafana.example.com/d/x"),
        ),
    )
    ex = run_export([h], {h.id: meta}, catalog_url="https://authority.example.com:8443/")
    [c] = ex.components
    assert c.warnings == ()
    assert c.doc == {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {
            "name": "legacy-db-1",
            "title": "legacy-db-1",
            "description": "Billing database",
            "annotations": {
                "meshagent.io/exported-by": "meshagent",
                "meshagent.io/host-id": "h-000000000001",
                "meshagent.io/host-name": "legacy-db-1",
                "meshagent.io/identity": "shop/billing",
                "meshagent.io/owner-contact": "team-a@example.com",
                "meshagent.io/spiffe-id": "spiffe://cluster.local/ns/shop/sa/billing",
                "meshagent.io/tier": "1",
            },
            "tags": ["meshagent", "tier-1"],
            "links": [
                {"url": "https://grafana.example.com/d/x", "title": "dashboard"},
                {"url": "https://runbooks.example.com/db", "title": "runbook"},
                {
                    "url": "https://authority.example.com:8443/catalog/hosts/h-000000000001",
                    "title": "meshagent catalog",
                },
            ],
        },
        "spec": {
            "type": "service",
            "lifecycle": "production",
            "owner": "group:default/team-a",
            "system": "system:default/payments",
        },
    }
    assert_backstage_valid(c.doc)
    assert ex.report()["depends_on"].startswith("omitted")


def test_host_without_metadata_is_owned_by_unknown_with_a_warning() -> None:
    h = host("h-000000000001", "bare")
    [c] = run_export([h], lifecycle="experimental").components
    assert c.doc["spec"] == {"type": "service", "lifecycle": "experimental", "owner": "unknown"}
    assert "description" not in c.doc["metadata"] and "links" not in c.doc["metadata"]
    assert any("no owner team" in w for w in c.warnings)
    assert_backstage_valid(c.doc)


def test_revoked_hosts_are_skipped_and_a_bad_lifecycle_refused() -> None:
    ex = run_export([host("h-000000000001", "a"), host("h-000000000002", "b", revoked=True)])
    assert [c.name for c in ex.components] == ["a"]
    assert ex.skipped == [("h-000000000002", "revoked")]
    with pytest.raises(bs.BackstageExportError, match="lifecycle"):
        run_export([host("h-000000000001", "a")], lifecycle="in production!")


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)//",
        "data:text/html,x",
        "/catalog",
        "https://",
        "https://authority.example/?next=//evil.example",
        "https://authority.example/#frag",
        "https://user:pw@authority.example",
        "https://authority.example:99999",
        "https://authority.example/\nx",
    ],
)
def test_a_catalog_url_that_is_not_a_plain_http_url_is_refused(url: str) -> None:
    assert bs.catalog_url_problem(url) is not None
    with pytest.raises(bs.BackstageExportError, match="catalog URL"):
        run_export([host("h-000000000001", "a")], catalog_url=url)


def test_a_catalog_url_with_a_path_prefix_is_kept() -> None:
    assert bs.catalog_url_problem("http://127.0.0.1:8443/mesh/") is None
    [c] = run_export([host("h-000000000001", "a")], catalog_url="http://127.0.0.1:8443/mesh/").components
    assert c.doc["metadata"]["links"][-1]["url"] == "http://127.0.0.1:8443/mesh/catalog/hosts/h-000000000001"


def test_html_and_script_in_metadata_are_yaml_strings() -> None:
    evil = '<script>alert("x")</script>\n{{ x }} &amp; ${y} *ref !!python/object:os.system'
    h = host("h-000000000001", "web")
    meta = HostMeta(
        owner_team="<b>team</b>", owner_contact=evil, description=evil, system="<img src=x>", tier="!!str"
    )
    [c] = run_export([h], {h.id: meta}).components
    text = bs.render(c.doc)
    back = yaml.safe_load(text)
    assert back == c.doc
    assert back["metadata"]["description"] == evil
    assert back["metadata"]["annotations"]["meshagent.io/owner-contact"] == evil
    assert back["spec"]["owner"] == "group:default/b-team-b"
    assert back["spec"]["system"] == "system:default/img-src-x"
    assert_backstage_valid(back)


# --- dependsOn -----------------------------------------------------------------------------------


def test_depends_on_from_edges_out_of_each_host() -> None:
    db1 = host("h-000000000001", "legacy-db-1", "shop/billing", enrolled=0)
    db2 = host("h-000000000002", "legacy-db-2", "shop/billing", enrolled=1)
    web = host("h-000000000003", "web", "shop/web", enrolled=2)
    edges = [
        Edge(dns("shop/web"), dns("shop/billing"), web.id, db1.id),  # host -> host
        Edge(dns("shop/web"), dns("shop/billing"), web.id, None),  # host -> identity of two hosts
        Edge(dns("shop/web"), dns("payments/ledger"), web.id, None),  # host -> in-cluster
        Edge(dns("shop/billing"), dns("kube-system/coredns"), db1.id, None),
        Edge(dns("shop/billing"), "", db1.id, None),  # unmeshed destination
        Edge(dns("payments/ledger"), dns("shop/web"), None, web.id),  # into a host: not its dependency
    ]
    web2 = host("h-000000000004", "web-2", "shop/web", enrolled=3)
    edges.append(Edge(dns("shop/web"), dns("payments/fx"), None, None))  # callers of a shared identity
    ex = run_export([db1, db2, web, web2], edges=edges)
    docs = {c.name: c.doc for c in ex.components}
    assert docs["web"]["spec"]["dependsOn"] == [
        "component:default/legacy-db-1",
        "component:default/legacy-db-2",
        "component:payments/fx",
        "component:payments/ledger",
    ]
    assert docs["web-2"]["spec"]["dependsOn"] == ["component:payments/fx"]
    assert docs["legacy-db-1"]["spec"]["dependsOn"] == ["component:kube-system/coredns"]
    assert docs["legacy-db-2"]["spec"]["dependsOn"] == []
    assert ex.external_refs == [
        "component:kube-system/coredns",
        "component:payments/fx",
        "component:payments/ledger",
    ]
    assert ex.unmeshed_edges == 1
    assert ex.report()["depends_on"] == "from observed traffic"
    for d in docs.values():
        assert_backstage_valid(d)


def test_depends_on_uses_the_exported_names_of_renamed_hosts() -> None:
    a = host("h-a00000000000", "Web 1", "shop/web", enrolled=0)
    b = host("h-b00000000000", "web-1", "shop/api", enrolled=1)
    edges = [Edge(dns("shop/web"), dns("shop/api"), a.id, b.id)]
    docs = {c.host_id: c.doc for c in run_export([a, b], edges=edges).components}
    assert docs[a.id]["metadata"]["name"] == "web-1"
    assert docs[a.id]["spec"]["dependsOn"] == ["component:default/web-1-b00000"]
    assert docs[b.id]["metadata"]["name"] == "web-1-b00000"


def test_identity_ref_mapping() -> None:
    assert bs.identity_ref(dns("payments/ledger")) == "component:payments/ledger"
    assert bs.identity_ref("not-an-identity") is None
    assert bs.identity_ref("") is None


def test_output_is_deterministic_and_sorted() -> None:
    hosts = [host(f"h-00000000000{i}", n, enrolled=i) for i, n in enumerate(["zeta", "alpha", "mid"])]
    one = bs.render_stream(run_export(hosts, edges=[]).components)
    two = bs.render_stream(run_export(list(reversed(hosts)), edges=[]).components)
    assert one == two
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(one)] == ["alpha", "mid", "zeta"]


def test_the_schema_check_refuses_what_backstage_refuses() -> None:
    [c] = run_export([host("h-000000000001", "a")]).components
    ok = c.doc
    assert_backstage_valid(ok)
    for bad in (
        {**ok, "spec": {k: v for k, v in ok["spec"].items() if k != "owner"}},
        {**ok, "extra": 1},  # Entity: additionalProperties false
        {**ok, "metadata": {**ok["metadata"], "links": [{"title": "no url"}]}},
        {**ok, "spec": {**ok["spec"], "dependsOn": [""]}},
    ):
        assert list(COMPONENT.iter_errors(bad)), bad
    with pytest.raises(AssertionError):
        assert_backstage_valid({**ok, "metadata": {**ok["metadata"], "name": "-bad"}})


def assert_location_valid(doc: dict[str, Any]) -> None:
    errors = sorted(LOCATION.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert _is_object_name(doc["metadata"]["name"])


def test_the_location_lists_every_component_file_relative_to_itself() -> None:
    hosts = [host("h-000000000001", "b"), host("h-000000000002", "a", enrolled=1)]
    doc = bs.location_doc(run_export(hosts).components)
    assert_location_valid(doc)
    assert doc["spec"] == {"targets": ["./a/catalog-info.yaml", "./b/catalog-info.yaml"]}
    assert list(COMPONENT.iter_errors(doc))  # a Location is no Component: the check tells them apart
