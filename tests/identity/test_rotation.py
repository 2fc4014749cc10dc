from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from agent.identity.rotation import backoff_delay, renewal_time, should_renew

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lifetime", "earliest", "latest"),
    [
        (timedelta(hours=24), timedelta(hours=24 * 0.65), timedelta(hours=24 * 0.75)),
        (timedelta(seconds=60), timedelta(seconds=39), timedelta(seconds=45)),
    ],
    ids=["24h", "60s"],
)
def test_renewal_lands_at_seventy_percent_with_jitter(
    lifetime: timedelta, earliest: timedelta, latest: timedelta
) -> None:
    times = {renewal_time(T0, T0 + lifetime, random.Random(seed)) for seed in range(200)}
    assert all(T0 + earliest <= t <= T0 + latest for t in times)
    assert len(times) > 100  # jittered: a fleet enrolled together does not renew together


@pytest.mark.parametrize(
    ("now", "due"),
    [(T0 + timedelta(hours=10), False), (T0 + timedelta(hours=17), True), (T0 + timedelta(hours=30), True)],
    ids=["early", "past-renew-point", "expired"],
)
def test_should_renew(now: datetime, due: bool) -> None:
    renew_at = renewal_time(T0, T0 + timedelta(hours=24), random.Random(1), jitter=0.0)
    assert should_renew(now, renew_at) is due


@pytest.mark.parametrize(
    ("lifetime", "cap"),
    [(timedelta(seconds=60), 3.0), (timedelta(hours=24), 300.0)],
    ids=["short-cert-retries-fast", "long-cert-caps-at-5min"],
)
def test_backoff_grows_and_is_capped(lifetime: timedelta, cap: float) -> None:
    rng = random.Random(7)
    delays = [backoff_delay(attempt, lifetime, rng) for attempt in range(1, 40)]
    assert max(delays) <= cap
    assert all(d >= 0.5 for d in delays)
    first = [max(backoff_delay(1, lifetime, random.Random(s)) for s in range(50))]
    assert first[0] <= 2.0


def test_rotator_keeps_retrying_then_swaps(tmp_path: object) -> None:
    """The loop retries a failing renewal and reports the fresh identity once it succeeds."""
    from agent.errors import UnreachableError
    from agent.identity.rotation import Rotator

    calls: list[int] = []
    renewed: list[object] = []

    class FakeSummary:
        serial = "1"
        not_before = T0
        not_after = T0 + timedelta(seconds=60)

    class FakeIdentity:
        summary = FakeSummary()

    class FakeStore:
        def load_info(self) -> FakeIdentity:
            return FakeIdentity()

    def renew_fn(_: object) -> FakeIdentity:
        calls.append(1)
        if len(calls) < 3:
            raise UnreachableError("down")
        return FakeIdentity()

    async def main() -> None:
        stop = asyncio.Event()
        rotator = Rotator(
            FakeStore(),
            on_renewed=lambda i: renewed.append(i) or stop.set(),  # type: ignore[arg-type, func-returns-value]
            renew_fn=renew_fn,
            clock=lambda: T0 + timedelta(seconds=59),
            rng=random.Random(0),
        )
        await asyncio.wait_for(rotator.run(stop), timeout=30)
        assert rotator.failures == 2

    asyncio.run(main())
    assert len(calls) == 3
    assert len(renewed) == 1
