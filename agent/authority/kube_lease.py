"""Leader election over one `coordination.k8s.io/v1` Lease, as a pure function (issue #17).

Several authority replicas may run `serve --kubernetes`; only the Lease's holder reconciles.
This module decides, from the clock, the Lease as last read (or None) and what this replica
remembers, what to do next: create the Lease, update it (renew ours, or take over one that
expired or was released), stand by, or step down. It does no I/O and never sleeps: the caller
reads the Lease, calls `decide`, performs the one write it asks for, and reports a successful
write with `written` (a failed one needs no report: the next `decide` sees what happened).

The rules are client-go's (tools/leaderelection/leaderelection.go, tryAcquireOrRenew, renew,
release; kubernetes/client-go 32ce75a7d6bc):

- Expiry is judged by *our* clock from when *we* first saw the current record
  (`observedTime + leaseDurationSeconds`), never from the holder's `renewTime`: the holder's
  clock may be skewed, and a record that keeps changing is alive whatever its timestamps say.
  The holder's own `leaseDurationSeconds` is used, not ours. So a replica that starts up and
  finds a Lease waits one full duration before taking it over, whatever its `renewTime`.
- Every update carries the `resourceVersion` it was decided from: two replicas racing for an
  expired Lease both send an update and exactly one gets `409 Conflict`; a create racing a
  create gets `409 AlreadyExists`.
- Renewing keeps `acquireTime` and `leaseTransitions`; taking over (from another holder or from
  a released Lease, holder "") sets `acquireTime` and adds one to `leaseTransitions`.
- A leader whose last successful write is `renew_deadline` old steps down (stops reconciling);
  `lease_duration > renew_deadline > 1.2 * retry_period` as client-go requires, so it stops
  before anyone else may take over.

Where this is stricter than client-go: a leader that *sees* the Lease held by someone else, or
deleted, steps down at once instead of waiting for its renew deadline (client-go keeps leading
until the deadline). It may then acquire again by the ordinary rules, through a write that
carries a resourceVersion, so nothing it did not observe can be overwritten.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.errors import MeshagentError

KubeObject = dict[str, Any]

LEASE_API_VERSION = "coordination.k8s.io/v1"
JITTER_FACTOR = 1.2  # client-go's leaderelection.JitterFactor


class LeaseConfigError(MeshagentError):
    code = "kube_lease_config"


@dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who we are, and the timings (client-go's defaults: 15 s, 10 s, 2 s)."""

    name: str
    namespace: str
    identity: str
    lease_duration: timedelta = timedelta(seconds=15)
    renew_deadline: timedelta = timedelta(seconds=10)
    retry_period: timedelta = timedelta(seconds=2)

    def __post_init__(self) -> None:
        if not self.identity:
            raise LeaseConfigError(
                "the leader election identity is empty", "use the pod name, e.g. $POD_NAME"
            )
        if self.lease_duration < timedelta(seconds=1) or self.lease_duration.microseconds:
            raise LeaseConfigError(
                f"lease duration {self.lease_duration} is not a whole number of seconds >= 1",
                "the Lease stores it as leaseDurationSeconds, e.g. 15",
            )
        if self.lease_duration <= self.renew_deadline:
            raise LeaseConfigError(
                "the lease duration must be longer than the renew deadline",
                "otherwise a standby may take over while the leader still acts; e.g. 15 s and 10 s",
            )
        if self.retry_period <= timedelta(0) or self.renew_deadline <= self.retry_period * JITTER_FACTOR:
            raise LeaseConfigError(
                "the renew deadline must be longer than 1.2 x the retry period (and that positive)",
                "e.g. renew deadline 10 s, retry period 2 s",
            )

    @property
    def lease_duration_seconds(self) -> int:
        return int(self.lease_duration.total_seconds())


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, as client-go's LeaderElectionRecord reads it (absent fields are zero)."""

    holder: str
    duration_seconds: int
    acquire_time: datetime | None
    renew_time: datetime | None
    transitions: int


@dataclass(frozen=True)
class ElectionState:
    """What this replica remembers between calls (start with `ElectionState()`).

    `observed_at` is our clock when `record` last changed: expiry counts from it. `renewed_at` is
    our clock at our last successful create/update; None means we are not leading."""

    record: LeaseRecord | None = None
    observed_at: datetime | None = None
    renewed_at: datetime | None = None


@dataclass(frozen=True)
class CreateLease:
    """POST the Lease (no one holds one yet). A 409 AlreadyExists means another replica won."""

    body: KubeObject


@dataclass(frozen=True)
class UpdateLease:
    """PUT the Lease; `body.metadata.resourceVersion` is `resource_version`, so a replica that
    decided from a stale read gets 409 Conflict. `takeover` is False for a renewal of ours."""

    body: KubeObject
    resource_version: str
    takeover: bool


@dataclass(frozen=True)
class StandBy:
    """Someone else holds a Lease that has not expired by our clock (or it is unreadable)."""

    holder: str
    until: datetime | None
    reason: str = ""


@dataclass(frozen=True)
class StepDown:
    """Stop reconciling now: we were leading and can no longer be sure we are."""

    reason: str


LeaseAction = CreateLease | UpdateLease | StandBy | StepDown


def micro_time(value: datetime) -> str:
    """metav1.MicroTime's wire form: UTC, six fractional digits, `Z`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"time {value!r} is not a string")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return parsed


def _int(value: Any, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} {value!r} is not an integer")
    return value


def parse_lease(lease: Mapping[str, Any]) -> tuple[LeaseRecord, str]:
    """The record and resourceVersion of a Lease as read from the API; ValueError if malformed."""
    meta = lease.get("metadata")
    spec = lease.get("spec") or {}
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        raise ValueError("the Lease has no metadata or its spec is not an object")
    rv = meta.get("resourceVersion")
    if not isinstance(rv, str) or not rv:
        raise ValueError("the Lease has no resourceVersion")
    holder = spec.get("holderIdentity") or ""
    if not isinstance(holder, str):
        raise ValueError(f"holderIdentity {holder!r} is not a string")
    record = LeaseRecord(
        holder=holder,
        duration_seconds=_int(spec.get("leaseDurationSeconds"), "leaseDurationSeconds"),
        acquire_time=_time(spec.get("acquireTime")),
        renew_time=_time(spec.get("renewTime")),
        transitions=_int(spec.get("leaseTransitions"), "leaseTransitions"),
    )
    return record, rv


def _spec(record: LeaseRecord) -> dict[str, Any]:
    # client-go's LeaderElectionRecordToLeaseSpec: the whole spec is replaced on every write.
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = micro_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = micro_time(record.renew_time)
    return spec


def is_leader(state: ElectionState, now: datetime, config: LeaseConfig) -> bool:
    """Whether this replica may reconcile at `now`: its last write is within the renew deadline."""
    return state.renewed_at is not None and now < state.renewed_at + config.renew_deadline


def decide(
    now: datetime,
    lease: Mapping[str, Any] | None,
    state: ElectionState,
    config: LeaseConfig,
) -> tuple[LeaseAction, ElectionState]:
    """The next step, and the state that remembers this observation.

    `lease` is the Lease as just read (None if the GET said 404). Call this every retry period,
    and `written(...)` after the write it asked for succeeded."""
    leading = state.renewed_at is not None
    if leading and state.renewed_at is not None and now >= state.renewed_at + config.renew_deadline:
        return StepDown(f"no successful renewal for {config.renew_deadline}"), replace(state, renewed_at=None)
    if lease is None:
        if leading:
            return StepDown("the Lease was deleted"), ElectionState()
        fresh = LeaseRecord(config.identity, config.lease_duration_seconds, now, now, 0)
        return CreateLease(_new_lease(config, fresh)), state
    try:
        record, rv = parse_lease(lease)
    except ValueError as exc:
        # Unreadable: never overwrite what we cannot read (client-go fails the Get likewise).
        reason = f"malformed Lease: {exc}"
        if leading:
            return StepDown(reason), replace(state, renewed_at=None)
        return StandBy("", None, reason), state
    if record != state.record:
        state = replace(state, record=record, observed_at=now)
    if leading and record.holder != config.identity:
        return StepDown(f"the Lease is held by {record.holder or 'nobody'}"), replace(state, renewed_at=None)
    assert state.observed_at is not None  # set above whenever a record is first seen
    expires = state.observed_at + timedelta(seconds=record.duration_seconds)
    if record.holder and record.holder != config.identity and now < expires:
        return StandBy(record.holder, expires), state
    ours = record.holder == config.identity
    new = LeaseRecord(
        holder=config.identity,
        duration_seconds=config.lease_duration_seconds,
        acquire_time=(record.acquire_time or now) if ours else now,
        renew_time=now,
        transitions=record.transitions if ours else record.transitions + 1,
    )
    body = copy.deepcopy(dict(lease))
    body["spec"] = _spec(new)
    return UpdateLease(body, rv, takeover=not ours), state


def _new_lease(config: LeaseConfig, record: LeaseRecord) -> KubeObject:
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": {"name": config.name, "namespace": config.namespace},
        "spec": _spec(record),
    }


def written(state: ElectionState, now: datetime, returned: Mapping[str, Any]) -> ElectionState:
    """After a CreateLease/UpdateLease succeeded: `returned` is the Lease the API server sent
    back (its new resourceVersion is what the next update must carry). We lead from `now`."""
    record, _ = parse_lease(returned)
    return ElectionState(record=record, observed_at=now, renewed_at=now)


def release(
    now: datetime, lease: Mapping[str, Any] | None, state: ElectionState, config: LeaseConfig
) -> UpdateLease | None:
    """On shutdown, hand the Lease over at once (client-go's ReleaseOnCancel): holder "",
    duration 1 s, transitions kept. None when it is not ours to release."""
    if lease is None or state.renewed_at is None:
        return None
    try:
        record, rv = parse_lease(lease)
    except ValueError:
        return None
    if record.holder != config.identity:
        return None
    body = copy.deepcopy(dict(lease))
    body["spec"] = _spec(LeaseRecord("", 1, now, now, record.transitions))
    return UpdateLease(body, rv, takeover=False)
