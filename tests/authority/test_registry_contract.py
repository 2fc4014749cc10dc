"""The Registry contract, the same on both backends: SQLite (a file) and PostgreSQL (a real
throwaway cluster, one per module; a fresh database per test)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.authority.events import RETAINED_PER_HOST
from agent.authority.host_meta import HostMeta, parse_meta
from agent.authority.kube_routes import RouteObject
from agent.authority.registry import open_registry
from agent.authority.storage import (
    Issued,
    NewHost,
    PolicyRecord,
    Registration,
    Registry,
    RenewalRequest,
)
from agent.errors import RejectedError
from tests.pgcluster import PgCluster

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(authority directory, database) for a registry with nothing in it; open as many as wanted."""
    if request.param == "sqlite":
        yield tmp_path, "sqlite"
    else:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        yield tmp_path, cluster.create_database(f"contract_{next(_names)}")


@pytest.fixture
def registry(backend: tuple[Path, str]) -> Iterator[Registry]:
    reg = open_registry(*backend)
    yield reg
    reg.close()


def _issued(serial: str) -> Issued:
    return Issued(serial, NOW + timedelta(hours=24), f"PEM {serial}")


def _enroll(reg: Registry, token: str, key: str = "key-1", name: str = "web-1", serial: str = "01") -> str:
    return reg.enroll(token, key, NewHost(name, ("198.18.0.1",)), NOW, lambda identity: _issued(serial)).id


def _token(reg: Registry, name: str = "t1", identity: str = "shop/web", **kw: object) -> None:
    reg.add_token(name, identity, NOW, NOW + timedelta(hours=1), Registration(**kw))  # type: ignore[arg-type]


@contextlib.contextmanager
def _refused(code: str) -> Iterator[None]:
    with pytest.raises(RejectedError) as info:
        yield
    assert info.value.code == code


def test_a_token_enrolls_once_and_the_same_key_gets_its_host_back(registry: Registry) -> None:
    _token(registry, labels=(("app", "web"),), ports=(("http", 8080, "TCP"),), proxy_port=4200)
    host_id = _enroll(registry, "t1")
    host = registry.find_by_serial("01")
    assert host is not None and host.id == host_id and host.identity == "shop/web"
    assert host.registration == Registration((("app", "web"),), (("http", 8080, "TCP"),), 4200)
    assert _enroll(registry, "t1") == host_id  # the answer was lost: same key, same host
    with _refused("token_used"):
        _enroll(registry, "t1", key="key-2")
    [token] = registry.list_tokens()
    assert token.host_id == host_id and token.used_at == NOW
    assert [h.id for h in registry.list_hosts()] == [host_id]


def test_unknown_and_expired_tokens_and_a_failed_signing_leave_nothing(registry: Registry) -> None:
    with _refused("token_unknown"):
        _enroll(registry, "nope")
    registry.add_token("old", "shop/web", NOW - timedelta(hours=2), NOW - timedelta(hours=1))
    with _refused("token_expired"):
        _enroll(registry, "old")
    _token(registry)

    def failing(identity: str) -> Issued:
        raise RuntimeError("the issuer's key is gone")

    with pytest.raises(RuntimeError):
        registry.enroll("t1", "key-1", NewHost("web-1", ()), NOW, failing)
    assert registry.list_hosts() == []
    assert registry.list_tokens()[1].used_at is None  # (sorted by creation: "old" first)
    _enroll(registry, "t1")


def _renewal(serial: str, proof: str, key: str = "key-1") -> RenewalRequest:
    return RenewalRequest(serial, key, proof, NOW + timedelta(minutes=5))


def test_renewal_requests_are_single_use_and_bound_to_the_current_certificate(registry: Registry) -> None:
    _token(registry)
    host_id = _enroll(registry, "t1")
    renewed = registry.renew(host_id, _renewal("01", "p1", key="key-2"), NOW, lambda: _issued("02"))
    assert (renewed.serial, renewed.previous_serial) == ("02", "01")
    with _refused("renewal_replayed"):
        registry.renew(host_id, _renewal("01", "p1", key="key-2"), NOW, lambda: _issued("03"))
    # The previous certificate fetches the current one again, for the same key only.
    again = registry.renew(host_id, _renewal("01", "p2", key="key-2"), NOW, lambda: _issued("04"))
    assert again.serial == "02"
    with _refused("stale_certificate"):
        registry.renew(host_id, _renewal("01", "p3", key="key-other"), NOW, lambda: _issued("05"))
    with _refused("stale_certificate"):
        registry.renew(host_id, _renewal("99", "p4"), NOW, lambda: _issued("06"))
    found = registry.find_by_serial("01")
    assert found is not None and found.serial == "02"  # the previous serial still finds the host
    registry.revoke(host_id, NOW)
    with _refused("host_revoked"):
        registry.renew(host_id, _renewal("02", "p5", key="key-2"), NOW, lambda: _issued("07"))


def test_revoke_and_edit_by_id_or_unique_name(registry: Registry) -> None:
    _token(registry, "t1")
    _token(registry, "t2")
    first = _enroll(registry, "t1", key="k1", serial="01")
    second = _enroll(registry, "t2", key="k2", serial="02")
    with _refused("host_ambiguous"):
        registry.revoke("web-1", NOW)
    with _refused("host_unknown"):
        registry.revoke("nobody", NOW)
    edited = registry.update_registration(first, lambda h: Registration((("tier", "front"),)))
    assert edited.registration.labels == (("tier", "front"),)

    def refuse(host: object) -> Registration:
        raise RejectedError("no", code="invalid_request")

    with _refused("invalid_request"):
        registry.update_registration(first, refuse)
    assert registry.list_hosts()[0].registration.labels == (("tier", "front"),)
    assert registry.revoke(first, NOW).revoked_at == NOW
    assert registry.revoke("web-1", NOW + timedelta(1)).id == second  # now the only unrevoked one
    assert registry.revoke(first, NOW + timedelta(2)).revoked_at == NOW  # revoking again keeps the time
    with _refused("host_revoked"):
        registry.update_registration(first, lambda h: Registration())


def test_api_tokens_catalog_and_policies(registry: Registry) -> None:
    _token(registry)
    host_id = _enroll(registry, "t1")
    registry.set_api_token(host_id, "api-hash")
    found = registry.find_by_api_token("api-hash")
    assert found is not None and found.id == host_id
    assert registry.find_by_api_token("other") is None
    entry = registry.add_static_entry("198.18.0.0/24", (80, 443), "shop/db", NOW, opaque_port=4143)
    assert registry.static_entries() == [entry]
    registry.remove_static_entry(entry.id)
    with _refused("entry_unknown"):
        registry.remove_static_entry(entry.id)
    registry.set_policies(
        [PolicyRecord("shop/web", 0, "deny", ()), PolicyRecord("shop/web", 8080, "deny", ("spiffe://a",))]
    )
    registry.set_policy(PolicyRecord("shop/web", 8080, "all-authenticated", ("spiffe://b",)))  # replaces
    registry.set_policy(PolicyRecord("shop/db", 5432, "deny", ()))
    assert registry.policies("shop/web") == [
        PolicyRecord("shop/web", 0, "deny", ()),
        PolicyRecord("shop/web", 8080, "all-authenticated", ("spiffe://b",)),
    ]
    assert [p.identity for p in registry.policies()] == ["shop/db", "shop/web", "shop/web"]
    registry.remove_policy("shop/web", 0)
    with _refused("policy_unknown"):
        registry.remove_policy("shop/web", 0)


def test_data_version_moves_on_another_openers_writes_not_on_reports(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    other = open_registry(*backend)  # another replica (or the CLI) on the same database
    try:
        before = registry.data_version()
        other.set_policy(PolicyRecord("shop/web", 0, "deny", ()))
        after = registry.data_version()
        assert after != before
        registry.record_report("h-1", '{"ready": true}', NOW)
        other.record_report("h-1", '{"ready": false}', NOW + timedelta(seconds=10))
        registry.flush_reports()
        other.flush_reports()
        assert registry.data_version() == after
        assert registry.reports() == {"h-1": ((NOW + timedelta(seconds=10)).timestamp(), '{"ready": false}')}
        other.add_static_entry("198.18.1.0/24", (), "shop/db", NOW)
        assert registry.data_version() != after
    finally:
        other.close()


def test_data_version_moves_only_on_what_a_directory_renders(registry: Registry) -> None:
    """A new host (the catalog), a revocation, labels, catalog entries and policies move it;
    a renewal, a token, a host's API token and a health report do not (they would wake every
    long poll of every host for nothing)."""
    seen = [registry.data_version()]

    def moved() -> bool:
        seen.append(registry.data_version())
        return seen[-1] != seen[-2]

    _token(registry)
    assert not moved()
    host_id = _enroll(registry, "t1")
    assert moved()
    registry.renew(host_id, _renewal("01", "p1"), NOW, lambda: _issued("02"), api_token_hash="api-2")
    registry.set_api_token(host_id, "api-3")
    registry.record_report(host_id, "{}", NOW)
    registry.flush_reports()
    assert not moved()
    registry.update_registration(host_id, lambda h: Registration((("tier", "front"),)))
    assert moved()
    registry.set_policy(PolicyRecord("shop/web", 0, "deny", ()))
    assert moved()
    registry.revoke(host_id, NOW)
    assert moved()


def test_enrollment_and_renewal_set_the_api_token_in_their_transaction(registry: Registry) -> None:
    _token(registry)
    host = registry.enroll(
        "t1", "key-1", NewHost("web-1", ()), NOW, lambda i: _issued("01"), api_token_hash="a1"
    )
    assert registry.find_by_api_token("a1") == host and host.serial == "01"
    # The answer was lost: the same key gets its host back, with the new API token only.
    again = registry.enroll(
        "t1", "key-1", NewHost("web-1", ()), NOW, lambda i: _issued("09"), api_token_hash="a2"
    )
    assert (again.id, again.serial) == (host.id, "01")
    assert registry.find_by_api_token("a1") is None and registry.find_by_api_token("a2") == again
    renewed = registry.renew(host.id, _renewal("01", "p1"), NOW, lambda: _issued("02"), api_token_hash="a3")
    assert renewed.serial == "02" and registry.find_by_api_token("a3") == renewed
    retried = registry.renew(host.id, _renewal("01", "p2"), NOW, lambda: _issued("03"), api_token_hash="a4")
    assert retried.serial == "02" and registry.find_by_api_token("a4") == retried
    assert registry.find_by_api_token("a3") is None
    plain = registry.renew(host.id, _renewal("02", "p3"), NOW, lambda: _issued("04"))
    assert registry.find_by_api_token("a4") == plain  # none given: the API token stays


def test_reports_are_written_behind_and_the_newest_wins(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    other = open_registry(*backend)  # another replica
    try:
        registry.record_report("h-1", '{"n": 2}', NOW + timedelta(seconds=2))
        registry.record_report("h-1", '{"n": 1}', NOW + timedelta(seconds=1))  # late: ignored
        assert registry.reports() == {"h-1": ((NOW + timedelta(seconds=2)).timestamp(), '{"n": 2}')}
        other.record_report("h-1", '{"n": 0}', NOW)  # older, at another replica
        other.record_report("h-2", '{"n": 5}', NOW)
        registry.flush_reports()
        other.flush_reports()  # h-1's older report does not win over the stored newer one
        assert (
            other.reports()
            == registry.reports()
            == {
                "h-1": ((NOW + timedelta(seconds=2)).timestamp(), '{"n": 2}'),
                "h-2": (NOW.timestamp(), '{"n": 5}'),
            }
        )
        other.record_report("h-2", '{"n": 6}', NOW + timedelta(seconds=3))
    finally:
        other.close()  # close() writes what is left
    assert registry.reports()["h-2"] == ((NOW + timedelta(seconds=3)).timestamp(), '{"n": 6}')


# --- the service catalog (#20): metadata and the change log --------------------------------

META = parse_meta({"owner_team": "payments", "slos": ["availability=99.9", "latency=99:300ms"]})


def _kinds(reg: Registry, host_id: str | None = None) -> list[tuple[str, str]]:
    return [(e.kind, e.actor) for e in reg.events(host_id)]


def test_token_metadata_becomes_the_hosts_in_the_enrollment(registry: Registry) -> None:
    registry.add_token("t1", "shop/web", NOW, NOW + timedelta(hours=1), meta=META)
    _token(registry, "t2")
    assert [t.meta for t in registry.list_tokens()] == [META, HostMeta()]
    first = _enroll(registry, "t1", key="k1", serial="01")
    second = _enroll(registry, "t2", key="k2", serial="02")
    assert registry.host_meta() == {first: META, second: HostMeta()}
    assert registry.host_meta([second, first, "h-unknown"]) == {
        second: HostMeta(),
        first: META,
        "h-unknown": HostMeta(),
    }
    [event] = registry.events(first)
    assert (event.kind, event.actor, event.at) == ("enrolled", "token:t1", NOW)
    assert "metadata from the token" in event.detail and "198.18.0.1" in event.detail
    _enroll(registry, "t1", key="k1")  # the same host retrying: no second event
    assert len(registry.events(first)) == 1


def test_enroll_renew_revoke_are_logged_newest_first_with_their_actors(registry: Registry) -> None:
    _token(registry)
    host_id = _enroll(registry, "t1")
    registry.renew(host_id, _renewal("01", "p1"), NOW + timedelta(hours=1), lambda: _issued("02"))
    registry.renew(host_id, _renewal("01", "p2"), NOW + timedelta(hours=1), lambda: _issued("03"))  # a retry
    registry.revoke(host_id, NOW + timedelta(hours=2), actor="cli:alice")
    registry.revoke(host_id, NOW + timedelta(hours=3), actor="cli:bob")  # already revoked: nothing
    assert _kinds(registry, host_id) == [
        ("revoked", "cli:alice"),
        ("renewed", "agent"),
        ("enrolled", "token:t1"),
    ]
    events = registry.events(host_id)
    assert [e.at for e in events] == [NOW + timedelta(hours=2), NOW + timedelta(hours=1), NOW]
    assert "01 -> 02" in events[1].detail
    assert [e.kind for e in registry.events(host_id, limit=2)] == ["revoked", "renewed"]


def test_set_host_meta_is_logged_and_wakes_no_long_poll(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    _token(registry)
    host_id = _enroll(registry, "t1")
    other = open_registry(*backend)  # another replica sees it at once
    try:
        version = registry.data_version()
        record = registry.set_host_meta("web-1", META, "cli:alice", NOW)
        assert record.id == host_id
        assert other.host_meta([host_id]) == {host_id: META}
        changed = replace(META, owner_team="<b>ledger</b>", slos=META.slos[:1])
        other.set_host_meta(host_id, changed, "cli:bob", NOW)
        other.set_host_meta(host_id, changed, "cli:bob", NOW)  # the same again: not logged
        assert registry.host_meta() == {host_id: changed}  # HTML is stored as given
        assert registry.data_version() == version == other.data_version()
        [latest, first, _] = registry.events(host_id)
        assert (latest.kind, latest.actor, first.actor) == ("metadata_changed", "cli:bob", "cli:alice")
        assert "owner_team: 'payments' -> '<b>ledger</b>'" in latest.detail
        assert "slos: availability=99.9, latency=99:300ms -> availability=99.9" in latest.detail
    finally:
        other.close()
    with _refused("host_unknown"):
        registry.set_host_meta("nobody", META, "cli:alice")


def test_events_are_bounded_per_host(registry: Registry) -> None:
    _token(registry, "t1")
    _token(registry, "t2")
    busy = _enroll(registry, "t1", key="k1", name="busy")
    quiet = _enroll(registry, "t2", key="k2", name="quiet")
    for i in range(RETAINED_PER_HOST + 20):
        registry.record_event(busy, "probe_failing", f"n={i}", "report", NOW + timedelta(seconds=i))
    kept = registry.events(busy, limit=10_000)
    assert len(kept) == RETAINED_PER_HOST
    assert kept[0].detail == f"n={RETAINED_PER_HOST + 19}" and kept[-1].detail == "n=20"
    assert [e.kind for e in registry.events(quiet)] == ["enrolled"]  # another host's stay
    latest = registry.latest_events([quiet, busy, "h-none"])
    assert latest == {busy: kept[0], quiet: registry.events(quiet)[0]}
    assert [e.host_id for e in registry.events(limit=2)] == [busy, busy]
    with pytest.raises(ValueError, match="unknown event kind"):
        registry.record_event(busy, "exploded", "", "report", NOW)


def test_a_batch_of_events_is_one_transaction(registry: Registry) -> None:
    """A batch of reports (a fleet-wide upgrade) logs its events together: all or none."""
    _token(registry, "t1")
    _token(registry, "t2")
    a = _enroll(registry, "t1", key="k1", name="a")
    b = _enroll(registry, "t2", key="k2", name="b")
    batch = [
        (a, "agent_version_changed", "1.0 -> 1.1", "report", NOW),
        (b, "agent_version_changed", "1.0 -> 1.1", "report", NOW),
    ]
    with pytest.raises(ValueError, match="unknown event kind"):
        registry.record_events([*batch, (b, "exploded", "", "report", NOW)])
    assert [e.kind for e in registry.events(a)] == ["enrolled"]  # the valid ones were not kept
    registry.record_events(batch)
    assert [(e.host_id, e.kind) for e in registry.events(limit=2)] == [
        (b, "agent_version_changed"),
        (a, "agent_version_changed"),
    ]


def test_a_changed_report_state_is_seen_once_across_replicas(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    other = open_registry(*backend)
    seen: list[tuple[str, str, str, str]] = []
    for reg in (registry, other):
        reg.on_report_change(
            lambda changes: seen.extend((c.host_id, c.old_state, c.new_state, c.report) for c in changes)
        )
    try:
        at = NOW.timestamp()
        registry.record_report("h-1", "r1", at, state="a")
        registry.flush_reports()
        other.record_report("h-1", "r2", at + 30, state="b")  # the next report, at another replica
        other.flush_reports()
        registry.record_report("h-1", "r3", at + 60, state="b")  # unchanged, though this one held "a"
        registry.flush_reports()
        other.record_report("h-1", "r4", at + 50, state="c")  # late (older than the stored): nothing
        other.flush_reports()
        registry.record_report("h-1", "r5", at + 90)  # no state (an older authority): nothing
        registry.flush_reports()
        registry.record_report("h-1", "r6", at + 120, state="d")
        registry.flush_reports()
        assert seen == [("h-1", "a", "b", "r2")]
    finally:
        other.close()


def test_a_policy_change_is_logged_for_each_host_of_the_identity(registry: Registry) -> None:
    for i, identity in enumerate(("shop/web", "shop/web", "shop/db")):
        _token(registry, f"t{i}", identity)
    web_1, web_2, db = (
        _enroll(registry, f"t{i}", key=f"k{i}", name=f"h{i}", serial=f"0{i}") for i in range(3)
    )
    registry.revoke(web_2, NOW)
    registry.set_policies(
        [PolicyRecord("shop/web", 0, "deny", ()), PolicyRecord("shop/web", 8080, "deny", ("spiffe://a",))],
        actor="cli:alice",
    )
    registry.set_policy(
        PolicyRecord("shop/web", 8080, "deny", ("spiffe://a",)), actor="controller"
    )  # the same
    registry.remove_policy("shop/web", 0, actor="controller")
    assert _kinds(registry, web_1)[:2] == [("policy_changed", "controller"), ("policy_changed", "cli:alice")]
    [removed, both] = registry.events(web_1)[:2]
    assert removed.detail == "default: removed"
    assert both.detail == "default: none -> deny (0 allowed); port 8080: none -> deny (1 allowed)"
    assert _kinds(registry, web_2)[0] == ("revoked", "unknown")  # revoked hosts are not told
    assert [k for k, _ in _kinds(registry, db)] == ["enrolled"]  # another identity's
    for _ in range(RETAINED_PER_HOST):
        registry.set_policy(PolicyRecord("shop/web", 1, "deny", ()))
        registry.remove_policy("shop/web", 1)
    assert len(registry.events(web_1, limit=10_000)) == RETAINED_PER_HOST


def _route(
    kind: str, name: str, source: str = "file", created: float = 100.0, weight: int = 1, **metadata: object
) -> RouteObject:
    body = {
        "apiVersion": "split.smi-spec.io/v1alpha2",
        "kind": kind,
        "metadata": {"name": name, "namespace": "shop", **metadata},
        "spec": {"service": "web", "backends": [{"service": "web", "weight": weight}]},
    }
    return RouteObject(kind, "shop", name, "split.smi-spec.io/v1alpha2", body, source, created)


def test_route_objects_are_stored_listed_and_removed_each_write_moving_the_version(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    """#21: objects upserted by (kind, namespace, name), listed in that order with their body
    as given; a write another replica makes moves this one's version (the hosts' directories
    compile them); a write that changes nothing, or a removal of nothing, does not."""
    other = open_registry(*backend)
    try:
        split, service = _route("TrafficSplit", "b-split"), _route("Service", "web", created=50.0)
        seen = [registry.data_version()]

        def moved() -> bool:
            seen.append(registry.data_version())
            return seen[-1] != seen[-2]

        other.put_route_objects([split, service])
        assert moved()
        assert registry.route_objects() == [service, split]  # Service < TrafficSplit
        assert other.route_objects() == [service, split]
        other.put_route_objects([split])  # the same again: nothing to tell the hosts
        assert not moved()
        heavier = _route("TrafficSplit", "b-split", weight=3)
        registry.put_route_objects([heavier])
        assert moved()
        assert other.route_objects() == [service, heavier]
        assert other.remove_route_object("Service", "shop", "web") is True
        assert moved()
        assert other.remove_route_object("Service", "shop", "web") is False
        assert (
            registry.remove_route_object("HTTPRoute", "shop", "b-split") is False
        )  # (kind is part of the key)
        assert not moved()
        assert registry.route_objects() == [heavier]
    finally:
        other.close()


def test_the_first_route_object_stored_is_remembered_after_the_last_is_removed(
    registry: Registry, backend: tuple[Path, str]
) -> None:
    """route_policy_since: None until an object is stored (putting none does not count), then
    kept for good, seen by every replica (the directory serves `routes` from then on)."""
    assert registry.route_policy_since() is None
    registry.put_route_objects([], replace_source="cluster")
    assert registry.route_policy_since() is None
    registry.put_route_objects([_route("TrafficSplit", "s")])
    since = registry.route_policy_since()
    assert since is not None
    assert registry.remove_route_object("TrafficSplit", "shop", "s")
    registry.put_route_objects([_route("TrafficSplit", "t")])
    other = open_registry(*backend)
    try:
        assert other.route_policy_since() == since
    finally:
        other.close()


def test_route_objects_keep_their_first_apply_time_unless_the_object_says(registry: Registry) -> None:
    """created_at orders routes of equal precedence: an object without a creationTimestamp keeps
    the time it was first applied when applied again; one with a timestamp takes what it says."""
    registry.put_route_objects([_route("TrafficSplit", "s", created=100.0)])
    registry.put_route_objects([_route("TrafficSplit", "s", created=200.0, weight=2)])
    [kept] = registry.route_objects()
    assert (kept.created_at, kept.body["spec"]["backends"][0]["weight"]) == (100.0, 2)
    stamped = _route("TrafficSplit", "s", created=300.0, creationTimestamp="2026-01-01T00:00:00Z")
    registry.put_route_objects([stamped])
    assert registry.route_objects() == [stamped]


def test_replacing_a_source_deletes_only_its_objects_not_given(registry: Registry) -> None:
    """The controller's "the cluster wins": a put with replace_source="cluster" leaves exactly
    the cluster objects it names, and never touches the operator's file objects."""
    mine = _route("TrafficSplit", "from-file")
    old, kept = _route("TrafficSplit", "gone", "cluster"), _route("HTTPRoute", "kept", "cluster")
    registry.put_route_objects([mine, old, kept])
    before = registry.data_version()
    fresh = _route("TrafficSplit", "new", "cluster")
    registry.put_route_objects([kept, fresh], replace_source="cluster")
    assert registry.route_objects() == [kept, mine, fresh]
    assert registry.data_version() != before
    registry.put_route_objects([], replace_source="cluster")  # the cluster has none left
    assert registry.route_objects() == [mine]


def test_a_route_object_that_cannot_be_stored_stores_nothing(registry: Registry) -> None:
    """One transaction: a body that is not JSON (NaN) refuses the whole put, the objects before
    it in the same call included, and the replaced source's rows stay."""
    registry.put_route_objects([_route("TrafficSplit", "a", "cluster")])
    before = (registry.route_objects(), registry.data_version())
    bad = replace(_route("TrafficSplit", "z"), body={"spec": float("nan")})
    with pytest.raises(ValueError):
        registry.put_route_objects([_route("TrafficSplit", "b"), bad], replace_source="cluster")
    assert (registry.route_objects(), registry.data_version()) == before
