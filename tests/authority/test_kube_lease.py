"""Lease leader election as a pure function (agent/authority/kube_lease.py): every case of
client-go's tryAcquireOrRenew/renew/release, with the clock as an argument."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.authority.kube_lease import (
    CreateLease,
    ElectionState,
    LeaseConfig,
    LeaseConfigError,
    LeaseRecord,
    StandBy,
    StepDown,
    UpdateLease,
    decide,
    is_leader,
    micro_time,
    parse_lease,
    release,
    written,
)

T0 = datetime(2026, 12, 6, 9, 0, 0, tzinfo=UTC)
ME = "authority-0"
OTHER = "authority-1"
CFG = LeaseConfig(name="meshagent-authority-default", namespace="meshagent", identity=ME)


def s(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)


def lease(
    holder: str | None,
    *,
    rv: str = "100",
    duration: int = 15,
    renew: datetime | None = T0,
    acquire: datetime | None = T0,
    transitions: int | None = 3,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"leaseDurationSeconds": duration}
    if holder is not None:
        spec["holderIdentity"] = holder
    if renew is not None:
        spec["renewTime"] = micro_time(renew)
    if acquire is not None:
        spec["acquireTime"] = micro_time(acquire)
    if transitions is not None:
        spec["leaseTransitions"] = transitions
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": CFG.name, "namespace": CFG.namespace, "resourceVersion": rv, "uid": "u-1"},
        "spec": spec,
    }


def served(body: dict[str, Any], rv: str) -> dict[str, Any]:
    """What the API server sends back for a successful write: the body with a new version."""
    out = {**body, "metadata": {**body["metadata"], "resourceVersion": rv}}
    return out


def leading_state(now: datetime, obj: dict[str, Any]) -> ElectionState:
    return written(ElectionState(), now, obj)


def test_no_lease_creates_one_held_by_us() -> None:
    action, state = decide(T0, None, ElectionState(), CFG)
    assert isinstance(action, CreateLease)
    assert action.body["metadata"] == {"name": CFG.name, "namespace": CFG.namespace}
    assert action.body["spec"] == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 15,
        "leaseTransitions": 0,
        "acquireTime": "2026-12-06T09:00:00.000000Z",
        "renewTime": "2026-12-06T09:00:00.000000Z",
    }
    assert not is_leader(state, T0, CFG)  # leading only once the create succeeded
    after = written(state, T0, served(action.body, "1"))
    assert is_leader(after, T0, CFG)


def test_ours_and_fresh_renews_keeping_acquire_time_and_transitions() -> None:
    mine = lease(ME, rv="7", acquire=T0 - s(600), transitions=4)
    state = leading_state(T0, mine)
    now = T0 + s(2)
    action, state = decide(now, mine, state, CFG)
    assert isinstance(action, UpdateLease)
    assert not action.takeover
    assert action.resource_version == "7" == action.body["metadata"]["resourceVersion"]
    assert action.body["spec"]["acquireTime"] == micro_time(T0 - s(600))
    assert action.body["spec"]["renewTime"] == micro_time(now)
    assert action.body["spec"]["leaseTransitions"] == 4
    assert is_leader(written(state, now, served(action.body, "8")), now, CFG)


def test_ours_past_renew_deadline_steps_down() -> None:
    mine = lease(ME, rv="7")
    state = leading_state(T0, mine)
    assert is_leader(state, T0 + s(9.999), CFG)
    assert not is_leader(state, T0 + s(10), CFG)
    action, after = decide(T0 + s(10), mine, state, CFG)
    assert isinstance(action, StepDown)
    assert "renewal" in action.reason
    assert not is_leader(after, T0 + s(10), CFG)
    # Stepped down, the Lease still names us: we may renew it again, but only through an
    # update carrying the version we read (a takeover we did not see makes it a 409).
    again, _ = decide(T0 + s(11), mine, after, CFG)
    assert isinstance(again, UpdateLease) and not again.takeover
    assert again.resource_version == "7"


def test_theirs_and_fresh_stands_by_until_one_duration_after_we_saw_it() -> None:
    theirs = lease(OTHER, duration=20)
    action, state = decide(T0, theirs, ElectionState(), CFG)
    assert action == StandBy(OTHER, T0 + s(20))  # the holder's duration, not ours (15)
    action, state = decide(T0 + s(19.9), theirs, state, CFG)
    assert isinstance(action, StandBy)


def test_theirs_and_expired_is_taken_over_with_one_more_transition() -> None:
    theirs = lease(OTHER, rv="55", acquire=T0 - s(3600), transitions=3)
    _, state = decide(T0, theirs, ElectionState(), CFG)
    action, state = decide(T0 + s(15), theirs, state, CFG)
    assert isinstance(action, UpdateLease) and action.takeover
    assert action.resource_version == "55"
    assert action.body["spec"] == {
        "holderIdentity": ME,
        "leaseDurationSeconds": 15,
        "leaseTransitions": 4,
        "acquireTime": micro_time(T0 + s(15)),
        "renewTime": micro_time(T0 + s(15)),
    }
    assert action.body["metadata"]["uid"] == "u-1"  # the object read, only its spec replaced


def test_transitions_count_each_change_of_holder_and_only_those() -> None:
    state = ElectionState()
    obj: dict[str, Any] | None = None
    now = T0
    rv = 0
    # we create (0), renew twice (0), lose it to OTHER (1), OTHER renews, it expires, we take it (2)
    action, state = decide(now, obj, state, CFG)
    assert isinstance(action, CreateLease)
    rv += 1
    obj = served(action.body, str(rv))
    state = written(state, now, obj)
    for _ in range(2):
        now += s(2)
        action, state = decide(now, obj, state, CFG)
        assert isinstance(action, UpdateLease)
        rv += 1
        obj = served(action.body, str(rv))
        state = written(state, now, obj)
    assert obj["spec"]["leaseTransitions"] == 0
    other = LeaseConfig(name=CFG.name, namespace=CFG.namespace, identity=OTHER)
    _, other_state = decide(now, obj, ElectionState(), other)
    now += s(15)
    action, other_state = decide(now, obj, other_state, other)
    assert isinstance(action, UpdateLease) and action.takeover
    rv += 1
    obj = served(action.body, str(rv))
    assert obj["spec"]["leaseTransitions"] == 1
    action, state = decide(now, obj, state, CFG)
    assert isinstance(action, StepDown)  # we see it is theirs: stop at once
    now += s(1)
    action, state = decide(now, obj, state, CFG)
    assert isinstance(action, StandBy)
    now += s(15)
    action, state = decide(now, obj, state, CFG)
    assert isinstance(action, UpdateLease) and action.takeover
    assert action.body["spec"]["leaseTransitions"] == 2


def test_clock_skew_holder_timestamps_are_never_trusted() -> None:
    # The holder's clock is an hour slow: its renewTime looks long expired, but we have just
    # seen the record, so it is alive for one full duration by our clock.
    slow = lease(OTHER, renew=T0 - s(3600), acquire=T0 - s(3600))
    action, state = decide(T0, slow, ElectionState(), CFG)
    assert isinstance(action, StandBy) and action.until == T0 + s(15)
    # It keeps renewing (the record changes): still alive, expiry counts from the change.
    slow2 = lease(OTHER, rv="101", renew=T0 - s(3590), acquire=T0 - s(3600))
    action, state = decide(T0 + s(10), slow2, state, CFG)
    assert action == StandBy(OTHER, T0 + s(25))
    # The holder's clock is an hour fast and it died: a renewTime in the future does not
    # keep it alive once the record has not changed for a duration by our clock.
    fast = lease(OTHER, rv="200", renew=T0 + s(3600), acquire=T0 + s(3600))
    _, state = decide(T0, fast, ElectionState(), CFG)
    action, _ = decide(T0 + s(15), fast, state, CFG)
    assert isinstance(action, UpdateLease) and action.takeover


def test_an_unchanged_resource_version_with_a_new_spec_is_still_a_change() -> None:
    # Only the record matters (client-go compares the raw record), not the version string.
    a = lease(OTHER, rv="9", renew=T0)
    b = lease(OTHER, rv="9", renew=T0 + s(5))
    _, state = decide(T0, a, ElectionState(), CFG)
    action, _ = decide(T0 + s(14), b, state, CFG)
    assert action == StandBy(OTHER, T0 + s(29))


def test_released_lease_is_taken_at_once() -> None:
    released = lease("", rv="30", duration=1, transitions=6)
    action, _ = decide(T0, released, ElectionState(), CFG)
    assert isinstance(action, UpdateLease) and action.takeover
    assert action.body["spec"]["leaseTransitions"] == 7
    no_holder = lease(None, rv="31", transitions=None)
    action, _ = decide(T0, no_holder, ElectionState(), CFG)
    assert isinstance(action, UpdateLease) and action.body["spec"]["leaseTransitions"] == 1


def test_leader_that_sees_the_lease_deleted_steps_down_then_creates() -> None:
    state = leading_state(T0, lease(ME))
    action, state = decide(T0 + s(1), None, state, CFG)
    assert isinstance(action, StepDown) and "deleted" in action.reason
    action, _ = decide(T0 + s(3), None, state, CFG)
    assert isinstance(action, CreateLease)


def test_restarted_replica_finding_its_own_lease_resumes_it() -> None:
    # Same identity (e.g. a StatefulSet pod name) after a restart: client-go's IsLeader() is
    # "the record names me", so it renews, keeping transitions.
    mine = lease(ME, rv="70", transitions=2)
    action, _ = decide(T0, mine, ElectionState(), CFG)
    assert isinstance(action, UpdateLease) and not action.takeover
    assert action.body["spec"]["leaseTransitions"] == 2


@pytest.mark.parametrize(
    "spec",
    [
        {"holderIdentity": 5},
        {"holderIdentity": OTHER, "leaseDurationSeconds": "15"},
        {"holderIdentity": OTHER, "renewTime": "yesterday"},
        {"holderIdentity": OTHER, "renewTime": "2026-12-06T09:00:00"},
        {"holderIdentity": OTHER, "leaseTransitions": True},
    ],
    ids=["holder-int", "duration-str", "time-garbage", "time-naive", "transitions-bool"],
)
def test_malformed_lease_is_never_overwritten(spec: dict[str, Any]) -> None:
    bad = {"metadata": {"name": CFG.name, "resourceVersion": "1"}, "spec": spec}
    action, _ = decide(T0, bad, ElectionState(), CFG)
    assert isinstance(action, StandBy) and action.reason.startswith("malformed Lease")
    action, state = decide(T0, bad, leading_state(T0, lease(ME)), CFG)
    assert isinstance(action, StepDown)
    assert not is_leader(state, T0, CFG)


def test_release_hands_over_only_our_lease() -> None:
    mine = lease(ME, rv="12", transitions=5)
    state = leading_state(T0, mine)
    action = release(T0 + s(1), mine, state, CFG)
    assert action is not None and action.resource_version == "12"
    assert action.body["spec"]["holderIdentity"] == ""
    assert action.body["spec"]["leaseDurationSeconds"] == 1
    assert action.body["spec"]["leaseTransitions"] == 5
    assert release(T0, lease(OTHER), state, CFG) is None
    assert release(T0, mine, ElectionState(), CFG) is None
    assert release(T0, None, state, CFG) is None


def test_parse_lease_round_trips_micro_time() -> None:
    when = datetime(2026, 12, 6, 9, 0, 0, 123456, tzinfo=UTC)
    record, rv = parse_lease(lease(ME, rv="3", renew=when, acquire=when))
    assert rv == "3"
    assert record == LeaseRecord(ME, 15, when, when, 3)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"identity": ""}, "identity is empty"),
        ({"lease_duration": s(10), "renew_deadline": s(10)}, "longer than the renew deadline"),
        ({"renew_deadline": s(2.4), "retry_period": s(2)}, "1.2 x the retry period"),
        ({"lease_duration": s(15.5)}, "whole number of seconds"),
        ({"retry_period": s(0)}, "retry period"),
    ],
)
def test_config_is_checked_as_client_go_does(kwargs: dict[str, Any], fragment: str) -> None:
    args: dict[str, Any] = {"name": "l", "namespace": "ns", "identity": ME, **kwargs}
    with pytest.raises(LeaseConfigError, match=fragment):
        LeaseConfig(**args)
