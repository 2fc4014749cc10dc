"""Giving memory back after a peak of connections.

After a burst (or a flood of silent TLS clients) glibc keeps the freed memory: 1,000 handshakes
left the agent at 170 MB. Once the open sockets fall to a quarter of their peak, the free pages
are given back (`malloc_trim`), at most every TRIM_MIN_GAP_S. The inline daemon and each worker
run this loop over their own proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Protocol

from agent.logs import get_logger
from agent.telemetry.process import return_free_memory, rss_bytes

MEMORY_CHECK_S = 2.0
TRIM_MIN_PEAK = 64  # sockets open at once: below it, there is little to give back
TRIM_MIN_GAP_S = 10.0

log = get_logger("meshagent.proxy")


class PeakSource(Protocol):
    """What the loop reads of a proxy: the peak of open sockets since the last call, and now."""

    @property
    def open_legs(self) -> int: ...

    def take_peak(self) -> int: ...


def should_trim(peak: int, now: int) -> bool:
    """After a peak of at least TRIM_MIN_PEAK sockets, once at most a quarter are still open."""
    return peak >= TRIM_MIN_PEAK and now <= peak // 4


async def return_memory_after_peaks(proxy: PeakSource, memory: dict[str, Any], stop: asyncio.Event) -> None:
    """Until `stop`: trim after each peak; `memory` (shown in /status) counts the trims."""
    peak, last = 0, -TRIM_MIN_GAP_S
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), MEMORY_CHECK_S)
        peak = max(peak, proxy.take_peak())
        now = proxy.open_legs
        if not should_trim(peak, now) or time.monotonic() - last < TRIM_MIN_GAP_S:
            continue
        before = rss_bytes()
        if not await asyncio.to_thread(return_free_memory):
            return  # not glibc: nothing to do, ever
        after = rss_bytes()
        last = time.monotonic()
        memory.update(
            trims=memory["trims"] + 1,
            last_trim_at=time.time(),
            last_returned_mb=round((before - after) / 2**20, 1),
        )
        log.info(
            "memory.returned",
            peak_sockets=peak,
            open_sockets=now,
            rss_before_mb=round(before / 2**20, 1),
            rss_after_mb=round(after / 2**20, 1),
        )
        peak = now
