"""The directory's `routes` member (#21, design §3.3/§3.5): route objects stored in the registry,
compiled at render against the enrolled hosts and served to every host alike; a change is a
whole-member `set` in a delta, which agents from before #21 apply as they are."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from agent.authority import kube_routes
from agent.authority.api import create_app
from agent.authority.kube_routes import RouteObject
from agent.authority.openapi import OPENAPI
from agent.authority.service import Authority, RenderedConfig
from agent.authority.storage import HostRecord, SqliteRegistry
from agent.identity import delta as wire
from agent.identity.pki import generate_key, make_csr
from tests.pgcluster import PgCluster
from tests.support import init_authority

NOW = datetime.now(UTC)  # (certificates are issued from it: a real time)
SPLIT = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: shop, name: billing-canary, creationTimestamp: "2026-12-01T00:00:00Z"}
spec:
  parentRefs: [{group: meshagent.io, kind: Host, name: billing, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      backendRefs:
        - {group: meshagent.io, kind: Host, name: billing-v1, port: 8080, weight: WEIGHT}
        - {group: meshagent.io, kind: Host, name: billing-v2, port: 8080, weight: 10}
"""


def _enroll(authority: Authority, identity: str, name: str, address: str) -> HostRecord:
    token = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0]
    return authority.enroll(token.secret, make_csr(generate_key()).decode(), name, [address]).host


def _open(directory: Path, database: str | None = None) -> Authority:
    authority = Authority.open(directory, database)
    authority.clock = lambda: NOW  # generated_at equal across renders and instances
    return authority


class Fleet:
    def __init__(self, tmp_path: Path, database: str | None = None) -> None:
        self.directory = tmp_path / "authority"
        init_authority(self.directory)
        self.authority = _open(self.directory, database)
        a = self.authority
        self.client = _enroll(a, "shop/web", "web-1", "198.18.1.2")
        self.parent = _enroll(a, "shop/billing", "billing-1", "198.18.2.2")
        self.v1 = _enroll(a, "shop/billing-v1", "billing-v1", "198.18.3.2")
        self.v2 = [_enroll(a, "shop/billing-v2", f"billing-v2-{i}", f"198.18.4.{i}") for i in (2, 3)]
        # More of the fleet, so a change to one small member is a delta, not the whole document.
        for i in range(12):
            _enroll(a, "shop/other", f"other-{i}", f"198.18.5.{i + 2}")

    def apply(self, weight: int = 90) -> list[RouteObject]:
        """What `authority route apply -f` stores: the file validated against the registry."""
        hosts = self.authority.registry.list_hosts()
        known = kube_routes.known_refs(self.authority.catalog(hosts), hosts)
        objects = kube_routes.parse_routes_file(SPLIT.replace("WEIGHT", str(weight)), known, now=1.0)
        self.authority.registry.put_route_objects(objects)
        return objects

    def render(self, authority: Authority | None = None, base: str | None = None) -> RenderedConfig:
        return (authority or self.authority).render_host_config(self.client, delta_base=base)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    made = Fleet(tmp_path)
    yield made
    made.authority.registry.close()


def _doc(rendered: RenderedConfig) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(rendered.body)
    return doc


def _backends(doc: dict[str, Any]) -> dict[str, tuple[int, list[str]]]:
    [item] = doc["routes"]
    [route] = item["routes"]
    [rule] = route["rules"]
    return {b["ref"]["name"]: (b["weight"], [e["address"] for e in b["endpoints"]]) for b in rule["backends"]}


def test_no_routes_key_until_the_first_object_then_an_empty_list_means_none(fleet: Fleet) -> None:
    """Until an operator applies a route the document is byte for byte what an authority from
    before #21 serves (a rolling upgrade's replicas agree on ETag and version); once applied,
    removing every object serves `[]` (none), never an absent key (hosts would keep them)."""
    before = fleet.render()
    assert "routes" not in _doc(before) and fleet.authority.routes_member() == []
    shared = {k: wire.canonical_json(v) for k, v in _doc(before).items() if k in wire.SHARED_MEMBERS}
    assert before.version == wire.version_of(shared)  # (what a pre-#21 replica names it)
    assert before.etag == f'"{wire.digest(_doc(before))}"'
    fleet.authority.registry.put_route_objects([])  # (a controller with nothing in the cluster)
    assert fleet.render().etag == before.etag
    [obj] = fleet.apply()
    assert len(_doc(fleet.render())["routes"]) == 1
    assert fleet.authority.registry.remove_route_object(obj.kind, obj.namespace, obj.name)
    assert _doc(fleet.render())["routes"] == []


def test_applied_objects_are_served_to_every_host_alike_by_every_replica(fleet: Fleet) -> None:
    fleet.apply()
    other = _open(fleet.directory)  # a second authority on the same registry
    try:
        mine, theirs = fleet.render(), fleet.render(other)
        assert (mine.body, mine.etag, mine.version) == (theirs.body, theirs.etag, theirs.version)
        doc = _doc(mine)
        [item] = doc["routes"]
        assert item["parent"] == {
            "group": "meshagent.io",
            "kind": "Host",
            "namespace": "shop",
            "name": "billing",
            "port": 8080,
            "section": "",
            "addresses": ["198.18.2.2"],
        }
        assert _backends(doc) == {
            "billing-v1": (90, ["198.18.3.2"]),
            "billing-v2": (10, ["198.18.4.2", "198.18.4.3"]),
        }
        [endpoint] = item["routes"][0]["rules"][0]["backends"][0]["endpoints"]
        assert endpoint == {
            "address": "198.18.3.2",
            "port": 8080,
            "identity": "spiffe://cluster.local/ns/shop/sa/billing-v1",
            "server_name": "billing-v1.shop.serviceaccount.identity.linkerd.cluster.local",
        }
        # The same member in every host's document, as routes_member() gives it, and as the
        # uncached host_config builds it.
        assert (
            fleet.authority.render_host_config(fleet.v1).body.count(wire.canonical_json(doc["routes"])) == 1
        )
        assert fleet.authority.routes_member() == doc["routes"] == other.routes_member()
        assert fleet.authority.host_config(fleet.client)["routes"] == doc["routes"]
        schema = {"$ref": "#/components/schemas/HostConfig", "components": OPENAPI["components"]}
        jsonschema.validate(doc, schema)
        # (and the wire items of rauth's fixture, which cover every field)
        fixture = json.loads((Path(__file__).parent / "fixtures/routes/expected.json").read_text())
        jsonschema.validate({**doc, "routes": fixture}, schema)
    finally:
        other.registry.close()


# agent/identity/delta.py:apply as released before #21 (commit 3652aa0), verbatim but for its
# names: what every agent in the field runs. Its LIST_MEMBERS has no `routes`.
_LIST_MEMBERS_BEFORE_21 = frozenset({"catalog", "revoked", "services"})


def _apply_before_21(held: dict[str, Any], delta: Any, base: str) -> dict[str, Any]:
    if not isinstance(delta, dict) or delta.get("base") != base or not isinstance(delta.get("version"), str):
        raise wire.DeltaError("the delta is not made for the document held")
    sets, removes, splices = delta.get("set", {}), delta.get("remove", []), delta.get("splice", {})
    if not (isinstance(sets, dict) and isinstance(removes, list) and isinstance(splices, dict)):
        raise wire.DeltaError("the delta's set, remove or splice is malformed")
    doc = dict(held)
    for name in removes:
        if not isinstance(name, str):
            raise wire.DeltaError("the delta removes a member that is not a name")
        doc.pop(name, None)
    for name, ops in splices.items():
        current = doc.get(name)
        if name not in _LIST_MEMBERS_BEFORE_21 or not isinstance(current, list) or not isinstance(ops, list):
            raise wire.DeltaError(f"the delta splices {name!r}, which is not a list held")
        edited = list(current)
        for op in ops:
            if not (isinstance(op, list) and len(op) == 3 and isinstance(op[2], list)):
                raise wire.DeltaError(f"a splice of {name!r} is malformed")
            at, count, items = op
            valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (at, count))
            if not valid or at + count > len(edited):
                raise wire.DeltaError(f"a splice of {name!r} is out of the list's range")
            edited[at : at + count] = items
        doc[name] = edited
    doc.update(sets)
    return doc


def test_a_change_moves_the_etag_and_is_a_whole_member_set_old_agents_apply(fleet: Fleet) -> None:
    fleet.apply(90)
    held = fleet.render()
    fleet.apply(50)
    full = fleet.render()
    assert full.etag != held.etag and full.version != held.version
    assert _backends(_doc(full))["billing-v1"][0] == 50
    made = fleet.render(base=held.version)
    assert made.delta_base == held.version and made.etag == full.etag
    delta = json.loads(made.body)
    assert "routes" in delta["set"] and "routes" not in delta["splice"]
    assert delta["set"]["routes"] == _doc(full)["routes"]
    # An agent from before #21 rebuilds the new document and its ETag checks out.
    rebuilt = _apply_before_21(_doc(held), delta, held.version)
    assert f'"{wire.digest(rebuilt)}"' == full.etag
    assert wire.apply(_doc(held), delta, held.version) == rebuilt  # (and today's agent alike)


def test_a_revoked_backend_host_leaves_the_endpoints_and_a_revoked_parent_the_member(fleet: Fleet) -> None:
    fleet.apply()
    before = fleet.render()
    fleet.authority.registry.revoke(fleet.v2[0].id, fleet.authority.clock())
    after = fleet.render()
    assert after.etag != before.etag
    assert _backends(_doc(after))["billing-v2"] == (10, ["198.18.4.3"])
    # The parent's only host revoked: the route no longer compiles, it is skipped (logged) and
    # the document still serves, everything else in it.
    fleet.authority.registry.revoke(fleet.parent.id, fleet.authority.clock())
    doc = _doc(fleet.render())
    assert doc["routes"] == [] and len(doc["catalog"]) == len(_doc(after)["catalog"]) - 1


def _logged_keep(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [dict(r.__dict__["fields"]) for r in caplog.records if r.getMessage() == event]


def _logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    found = _logged_keep(caplog, event)
    caplog.clear()
    return found


def test_a_bad_stored_object_is_skipped_and_the_document_still_serves(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.apply()
    good = _doc(fleet.render())["routes"]
    body = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "spec": "garbage"}
    # A row edited by hand: its spec no longer reads.
    bad = RouteObject("HTTPRoute", "shop", "broken", "gateway.networking.k8s.io/v1", body, "file", 2.0)
    fleet.authority.registry.put_route_objects([bad])
    rendered = fleet.render()
    assert _doc(rendered)["routes"] == good
    assert fleet.authority.routes_member() == good
    [logged] = _logged(caplog, "routes.compile_failed")
    assert logged["object"] == "HTTPRoute shop/broken" and "spec must be a mapping" in logged["reason"]
    # Throttled: more versions (each compiles again) log it no more.
    fleet.authority.registry.revoke(fleet.v2[0].id, fleet.authority.clock())
    fleet.render()
    assert _logged(caplog, "routes.compile_failed") == []


def test_an_object_that_breaks_the_compiler_is_skipped_and_the_others_served(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met by one object (compile_routes raising, not skipping) costs that object only."""
    fleet.apply()
    good = _doc(fleet.render())["routes"]
    poison = RouteObject("TrafficSplit", "shop", "poison", "split.smi-spec.io/v1alpha2", {}, "file", 3.0)
    fleet.authority.registry.put_route_objects([poison])
    real = kube_routes.compile_routes

    def buggy(objects: Any, known: Any, skip: Any, *args: Any) -> list[dict[str, Any]]:
        if any(o.name == "poison" for o in objects):
            raise RuntimeError("a bug")
        return real(objects, known, skip, *args)

    monkeypatch.setattr(kube_routes, "compile_routes", buggy)
    assert _doc(fleet.render())["routes"] == good
    assert len(_logged_keep(caplog, "routes.compile_error")) == 1
    [skipped] = _logged(caplog, "routes.compile_failed")
    assert skipped["object"] == "TrafficSplit shop/poison" and "RuntimeError: a bug" in skipped["reason"]


def test_routes_wait_for_discovery_like_services(fleet: Fleet) -> None:
    """Controller mode before discovery's first answer: no `services` and no `routes` (hosts keep
    theirs: routes name Services); then both."""
    fleet.apply()
    fleet.authority.await_discovery()
    doc = _doc(fleet.render())
    assert "services" not in doc and "routes" not in doc
    fleet.authority.set_discovered([])
    assert len(_doc(fleet.render())["routes"]) == 1


def test_two_replicas_on_postgresql_serve_the_same_routes_and_see_each_others_changes(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = pg_cluster.create_database("routes_directory")
    fleet = Fleet(tmp_path, url)
    replica = _open(fleet.directory, url)
    try:
        fleet.apply(90)
        first = fleet.render()
        assert (first.body, first.etag) == (fleet.render(replica).body, fleet.render(replica).etag)
        fleet.apply(40)  # through the first replica: the second's version moves, it renders anew
        mine, theirs = fleet.render(), fleet.render(replica)
        assert (mine.body, mine.etag, mine.version) == (theirs.body, theirs.etag, theirs.version)
        assert _backends(_doc(theirs))["billing-v1"][0] == 40 and theirs.etag != first.etag
        assert replica.registry.remove_route_object("HTTPRoute", "shop", "billing-canary")
        assert _doc(fleet.render())["routes"] == [] == replica.routes_member()
    finally:
        replica.registry.close()
        fleet.authority.registry.close()


SERVICE_BACKEND = """
apiVersion: v1
kind: Service
metadata: {namespace: shop, name: billing-v3}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {namespace: shop, name: to-a-service}
spec:
  parentRefs: [{group: meshagent.io, kind: Host, name: billing, port: 8080}]
  rules: [{backendRefs: [{name: billing-v3, port: 8080}]}]
"""


def test_service_refs_no_host_can_resolve_are_served_and_said_once(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Design §3.2's trap: without discovery hosts get no `services`, so a Service backend never
    resolves there. The route is served as written (a later discovery resolves it) and the
    authority says so once per Service, not once per version."""
    hosts = fleet.authority.registry.list_hosts()
    known = kube_routes.known_refs(fleet.authority.catalog(hosts), hosts)
    fleet.authority.registry.put_route_objects(kube_routes.parse_routes_file(SERVICE_BACKEND, known, now=1.0))
    rendered = fleet.authority.render_host_config(fleet.client, gzip=True)
    assert rendered.gzip is not None and gzip.decompress(rendered.gzip) == rendered.body
    [item] = _doc(rendered)["routes"]
    assert item["routes"][0]["rules"][0]["backends"][0]["ref"]["name"] == "billing-v3"
    [logged] = _logged(caplog, "routes.backend_unresolved")
    assert logged["service"] == "Service shop/billing-v3" and "serve --kubernetes" in logged["reason"]
    assert logged["sources"] == "HTTPRoute shop/to-a-service"
    fleet.authority.registry.revoke(fleet.v2[0].id, fleet.authority.clock())  # a new version
    fleet.render()
    assert _logged(caplog, "routes.backend_unresolved") == []


def test_a_route_write_by_another_process_wakes_a_long_poll_with_a_delta(fleet: Fleet) -> None:
    """What `route apply` does while `authority serve` runs: another registry connection on the
    same file writes; the parked poll wakes and, asked for a delta, gets the routes as a `set`."""
    app = create_app(fleet.authority)
    token = fleet.authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    enrolled = fleet.authority.enroll(
        token.secret, make_csr(generate_key()).decode(), "web-2", ["198.18.1.3"]
    )
    bearer = {"authorization": f"Bearer {enrolled.api_token}"}

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://authority") as http:
            first = await http.get("/v1/host/config", headers=bearer)
            held = first.json()
            version = first.headers[wire.VERSION_HEADER]
            asked = {
                **bearer,
                "if-none-match": first.headers["etag"],
                "a-im": wire.DELTA_IM,
                wire.BASE_HEADER: version,
            }
            poll = asyncio.create_task(http.get("/v1/host/config?wait=50", headers=asked))
            watch = app.app.state.directory_watch
            for _ in range(1000):  # until it is parked (sequencing, not a timing)
                if watch.waiting:
                    break
                await asyncio.sleep(0.01)
            assert watch.waiting == 1
            other = SqliteRegistry(fleet.directory / "registry.db")
            try:
                hosts = other.list_hosts()
                known = kube_routes.known_refs(fleet.authority.catalog(hosts), hosts)
                other.put_route_objects(kube_routes.parse_routes_file(SPLIT.replace("WEIGHT", "7"), known))
            finally:
                other.close()
            answer = await asyncio.wait_for(poll, 20)
            assert answer.status_code == 226
            delta = answer.json()
            assert "routes" in delta["set"] and "routes" not in delta["splice"]
            doc = wire.apply(held, delta, version)
            assert f'"{wire.digest(doc)}"' == answer.headers["etag"]
            assert _backends(doc)["billing-v1"][0] == 7

    asyncio.run(run())
