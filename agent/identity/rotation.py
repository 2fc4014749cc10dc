"""Certificate rotation: when to renew (pure, clock passed in) and the loop that does it.

Renew at ~70 % of the lifetime (linkerd2-proxy's choice) with +/-5 % jitter so a fleet enrolled
together does not renew together; on failure back off exponentially with full jitter, capped
relative to the lifetime, and keep serving the current certificate until it expires. Renewal
uses the current certificate, never the join token (istio/istio#49202).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.errors import MeshagentError
from agent.identity.certinfo import utcnow
from agent.logs import get_logger

from .certinfo import CertSummary
from .store import IdentityStore

log = get_logger("meshagent.rotation")

RENEW_FRACTION = 0.70
JITTER_FRACTION = 0.05


def renewal_time(
    not_before: datetime,
    not_after: datetime,
    rng: random.Random | None = None,
    fraction: float = RENEW_FRACTION,
    jitter: float = JITTER_FRACTION,
) -> datetime:
    """When to renew a certificate valid from `not_before` to `not_after`."""
    r = rng or random.Random()  # noqa: S311 - jitter, not secrecy
    point = fraction + r.uniform(-jitter, jitter)
    point = min(max(point, 0.1), 0.9)
    return not_before + (not_after - not_before) * point


def should_renew(now: datetime, renew_at: datetime) -> bool:
    return now >= renew_at


def backoff_delay(attempt: int, lifetime: timedelta, rng: random.Random | None = None) -> float:
    """Seconds to wait after `attempt` failures: exponential from 1 s, full jitter, capped at
    the smaller of 5 minutes and 5 % of the lifetime (a 60 s cert retries every few seconds)."""
    r = rng or random.Random()  # noqa: S311
    cap = max(1.0, min(300.0, lifetime.total_seconds() * 0.05))
    ceiling = min(cap, 2.0 ** min(attempt, 16))
    return max(0.5, r.uniform(0, ceiling))


class HasSummary(Protocol):
    """An identity as the rotator sees it: its certificate's validity (StoredIdentity, IdentityInfo)."""

    @property
    def summary(self) -> CertSummary: ...


def renew_in_process(store: IdentityStore) -> HasSummary:
    from .enroll import renew  # makes keys and CSRs: imports `cryptography`

    return renew(store)


RenewFn = Callable[[IdentityStore], HasSummary]
OnRenewed = Callable[[Any], Awaitable[None] | None]


class Rotator:
    """Keeps the identity in `store` fresh until `stop` is set."""

    def __init__(
        self,
        store: IdentityStore,
        on_renewed: OnRenewed | None = None,
        renew_fn: RenewFn = renew_in_process,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.on_renewed = on_renewed
        self.renew_fn = renew_fn
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311
        self.failures = 0
        self.last_error: str = ""
        self.renewals = 0
        # The authority refused with host_revoked: no retry can succeed (only a new enrollment).
        self.revoked = False

    async def run(self, stop: asyncio.Event) -> None:
        identity: HasSummary = await asyncio.to_thread(self.store.load_info)
        while not stop.is_set():
            s = identity.summary
            renew_at = renewal_time(s.not_before, s.not_after, self.rng)
            wait = max(0.0, (renew_at - self.clock()).total_seconds())
            log.info(
                "rotation.scheduled",
                serial=s.serial,
                renew_in_s=round(wait, 1),
                not_after=s.not_after.isoformat(),
            )
            if await _sleep_or_stop(stop, wait):
                return
            identity = await self._renew_until_done(identity, stop)
            if self.revoked:
                return

    async def _renew_until_done(self, identity: HasSummary, stop: asyncio.Event) -> HasSummary:
        lifetime = identity.summary.not_after - identity.summary.not_before
        attempt = 0
        while not stop.is_set():
            try:
                fresh = await asyncio.to_thread(self.renew_fn, self.store)
            except MeshagentError as exc:
                attempt += 1
                self.failures += 1
                self.last_error = f"{exc.code}: {exc.message}"
                if exc.code == "host_revoked":
                    self.revoked = True
                    log.error(
                        "identity.revoked",
                        source="renewal",
                        reason=exc.message,
                        hint="renewal stops: enroll this host again with a new join token",
                    )
                    return identity
                delay = backoff_delay(attempt, lifetime, self.rng)
                expired = self.clock() >= identity.summary.not_after
                log.warning(
                    "rotation.failed",
                    code=exc.code,
                    reason=exc.message,
                    attempt=attempt,
                    retry_in_s=round(delay, 1),
                    current_expired=expired,
                )
                if await _sleep_or_stop(stop, delay):
                    return identity
                continue
            self.renewals += 1
            self.last_error = ""
            if self.on_renewed is not None:
                result = self.on_renewed(fresh)
                if result is not None:
                    await result
            return fresh
        return identity


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
