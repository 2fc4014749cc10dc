"""The worker pool's bookkeeping against a scripted forker: which worker is forked when, and what
each is told. The processes themselves are tested for real in test_workers_units.py and
tests/mesh/test_workers.py; these cover orderings a real run hits only by chance."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest

from agent.workers.control import WorkerGone
from agent.workers.pool import INIT_TIMEOUT_S, REPLACEMENT_INIT_TIMEOUT_S, WorkerPool, handshake_share

DIRECTORY = SimpleNamespace(catalog=None, policy=None, services=None, revoked=None)


class ScriptedChannel:
    """A worker's channel: records what it was sent; `on_init` runs while init is in flight."""

    def __init__(self, pid: int, on_init: Any = None) -> None:
        self.pid, self.on_init = pid, on_init
        self.ops: list[str] = []
        self.init_args: dict[str, Any] = {}
        self.init_timeout: float | None = None
        self._closed = asyncio.get_running_loop().create_future()

    async def request(self, op: str, timeout: float = 5.0, **args: Any) -> Any:  # noqa: ASYNC109 - the real signature
        self.ops.append(op)
        if op == "init":
            self.init_args, self.init_timeout = args, timeout
        if op == "init" and self.on_init is not None:
            await self.on_init(self)
        return {}

    def notify(self, op: str, **args: Any) -> None:
        self.ops.append(op)

    async def wait_closed(self) -> None:
        await self._closed

    def close(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class ScriptedForker:
    def __init__(self, on_init: dict[int, Any] | None = None) -> None:
        self.on_init = on_init or {}
        self.on_exit: Any = None
        self.channels: list[ScriptedChannel] = []

    async def spawn(self, slot: int) -> tuple[int, ScriptedChannel]:
        n = len(self.channels) + 1
        chan = ScriptedChannel(1000 + n, self.on_init.get(n))
        self.channels.append(chan)
        return chan.pid, chan

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_real_kill(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)  # the pids are made up


def test_a_worker_dying_in_init_is_replaced_once() -> None:
    """The forker's exit report can arrive before the init request fails: only one replacement."""

    async def dies_in_init(chan: ScriptedChannel) -> None:
        forker.on_exit(chan.pid, 9, 0.0)  # reaped first...
        await asyncio.sleep(0)
        raise WorkerGone("gone", "")  # ...then the channel's EOF fails init

    forker = ScriptedForker(on_init={2: dies_in_init})

    async def run() -> WorkerPool:
        pool = WorkerPool(1, forker, None, {}, DIRECTORY)  # type: ignore[arg-type]
        await pool.start(None, {})
        first = pool.slots[0].chan
        assert isinstance(first, ScriptedChannel)
        first.close()  # worker 1001 dies: EOF, then its exit report
        await asyncio.sleep(0.01)
        forker.on_exit(1001, 9, 0.0)
        await asyncio.sleep(1.5)  # 1002 dies in init; its replacement after the 0.5 s backoff
        return pool

    pool = asyncio.run(run())
    assert [c.pid for c in forker.channels] == [1001, 1002, 1003]  # no second copy of 1002's slot
    assert [s.pid for s in pool.up_slots()] == [1003]
    assert pool.slots[0].restarts == 2
    # A first worker is a fork of the loaded image; a replacement is a new interpreter that
    # imports everything first (seconds on a slow one-CPU host): it gets a longer init deadline.
    timeouts = [c.init_timeout for c in forker.channels]
    assert timeouts == [INIT_TIMEOUT_S, REPLACEMENT_INIT_TIMEOUT_S, REPLACEMENT_INIT_TIMEOUT_S]


def test_a_renewal_during_a_workers_init_reaches_it_after() -> None:
    async def renewal_meanwhile(chan: ScriptedChannel) -> None:
        await pool.credentials_changed(b"n" * 80)  # only up workers are asked: none yet

    forker = ScriptedForker(on_init={1: renewal_meanwhile})
    pool = WorkerPool(1, forker, None, {}, DIRECTORY)  # type: ignore[arg-type]

    asyncio.run(pool.start(b"o" * 80, {}))
    assert forker.channels[0].ops == ["init", "credentials"]


@pytest.mark.parametrize(("limit", "workers"), [(128, 1), (128, 2), (128, 3), (7, 4), (100000, 64)])
def test_handshake_shares_add_up_to_the_agent_wide_limit(limit: int, workers: int) -> None:
    shares = [handshake_share(limit, workers, slot) for slot in range(workers)]
    assert sum(shares) == limit
    assert max(shares) - min(shares) <= 1


def test_each_worker_is_told_its_share_and_status_shows_the_agent_wide_limit() -> None:
    forker = ScriptedForker()
    pool = WorkerPool(3, forker, None, {}, DIRECTORY, max_handshakes=128)  # type: ignore[arg-type]
    asyncio.run(pool.start(None, {}))
    assert [c.init_args["max_handshakes"] for c in forker.channels] == [43, 43, 42]
    for slot, active in zip(pool.slots, (40, 43, 1), strict=True):
        share = pool.handshake_limit(slot.index)
        slot.status = {"handshakes": {"limit": share, "active": active, "queued": 2}}
    assert pool.handshakes.status() == {"limit": 128, "active": 84, "queued": 6}
    assert [w["handshakes"]["limit"] for w in pool.worker_status()] == [43, 43, 42]


def test_new_connections_are_steered_off_a_dead_worker_until_it_is_back() -> None:
    forker = ScriptedForker()
    steered: list[list[int]] = []

    async def run() -> None:
        pool = WorkerPool(2, forker, None, {}, DIRECTORY, steer=steered.append)  # type: ignore[arg-type]
        await pool.start(None, {})
        assert steered == [[0, 1]]  # not while the first workers start (no rules yet)
        forker.channels[0].close()  # worker 0 dies: EOF
        await asyncio.sleep(0.01)
        assert steered[-1] == [1]
        forker.on_exit(1001, 9, 0.0)  # reaped: replaced at once
        await asyncio.sleep(0.05)
        assert steered[-1] == [0, 1]
        await pool.stop(0.0)

    asyncio.run(run())
    assert steered[-2:] == [[1], [0, 1]]  # stopping steers nothing
