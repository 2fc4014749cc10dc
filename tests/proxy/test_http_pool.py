"""HttpPool: idle connections per endpoint key, LIFO, idle expiry, a bound per endpoint."""

from __future__ import annotations

import asyncio

from agent.proxy.http_pool import HttpPool, PoolKey

A: PoolKey = ("198.18.0.1", 8080, "spiffe://cluster.local/ns/shop/sa/a", None)
B: PoolKey = ("198.18.0.2", 8080, None, None)


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_get_returns_the_most_recently_returned_of_that_endpoint() -> None:
    pool: HttpPool[Conn] = HttpPool(idle_s=3.0, max_idle=10, clock=Clock())
    assert pool.get(A) is None
    first, second, other = Conn("1"), Conn("2"), Conn("b")
    pool.put(A, first)
    pool.put(A, second)
    pool.put(B, other)
    assert pool.get(A) is second and pool.get(A) is first and pool.get(A) is None
    assert pool.get(B) is other
    assert pool.reused == 3


def test_closed_connections_are_never_handed_out() -> None:
    pool: HttpPool[Conn] = HttpPool(clock=Clock())
    gone, live = Conn("gone"), Conn("live")
    pool.put(A, live)
    pool.put(A, gone)
    gone.close()  # the endpoint closed it while idle
    assert pool.get(A) is live
    closed = Conn("closed")
    closed.close()
    pool.put(A, closed)
    assert pool.idle_count(A) == 0


def test_max_idle_closes_the_oldest_and_discard_closes() -> None:
    pool: HttpPool[Conn] = HttpPool(max_idle=2, clock=Clock())
    conns = [Conn(str(i)) for i in range(3)]
    for conn in conns:
        pool.put(A, conn)
    assert conns[0].closed and not conns[1].closed and pool.idle_count(A) == 2
    pool.discard(A, conns[2])
    assert conns[2].closed and pool.idle_count(A) == 1 and pool.get(A) is conns[1]
    off: HttpPool[Conn] = HttpPool(max_idle=0, clock=Clock())
    kept = Conn("x")
    off.put(A, kept)  # (a stopping proxy: nothing kept)
    assert kept.closed and off.idle_count() == 0


def test_sweep_closes_what_idled_idle_s_and_keeps_the_rest() -> None:
    clock = Clock()
    pool: HttpPool[Conn] = HttpPool(idle_s=3.0, clock=clock)
    old, young = Conn("old"), Conn("young")
    pool.put(A, old)
    clock.now += 2.0
    pool.put(B, young)
    clock.now += 1.5  # old idled 3.5 s, young 1.5 s
    assert pool.sweep() == 1
    assert old.closed and not young.closed
    assert pool.get(A) is None and pool.get(B) is young and pool.expired == 1


def test_the_sweep_timer_runs_on_the_loop() -> None:
    async def main() -> None:
        pool: HttpPool[Conn] = HttpPool(idle_s=0.05)
        conn = Conn("c")
        pool.put(A, conn)
        for _ in range(100):
            if conn.closed:
                break
            await asyncio.sleep(0.02)
        assert conn.closed and pool.idle_count() == 0
        pool.close_all()

    asyncio.run(main())


def test_retain_closes_endpoints_no_longer_routed() -> None:
    pool: HttpPool[Conn] = HttpPool(clock=Clock())
    a, b = Conn("a"), Conn("b")
    pool.put(A, a)
    pool.put(B, b)
    assert pool.retain(lambda key: key == B) == 1
    assert a.closed and not b.closed and pool.idle_count() == 1
    pool.close_all()
    assert b.closed
