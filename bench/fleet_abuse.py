"""Bad clients at every authority replica while the fleet reports (`bench/fleet.py --abuse`).

One process (its own asyncio loop, so its CPU is measured apart) aims at each replica's own
address, not at haproxy: a balancer that steers around a replica busy with bad clients
would hide what the replica itself does with them. Per replica, at `--abuse-scale` 1:

- malformed: 20 requests a second of broken JSON (a report with a bad token, a cut enrollment)
  on kept-alive connections, and 5 a second of bytes that are not HTTP on new TLS connections;
- oversized: 5 a second declaring a 10 MB enrollment body (refused before it is read) and 2 a
  second streaming one (refused at the API's 64 KiB);
- slow heads (slowloris): 100 connections that send a head a byte every 2 s (the authority
  aborts each at its header timeout, 10 s from the first byte; it comes back);
- slow bodies: 50 connections that send a whole head and then the body a byte a second (408 at
  the body timeout, 10 s; it comes back);
- a connection flood: 500 connections that finish the TLS handshake and say nothing (aborted
  at the header timeout; each comes back at once: ~50 handshakes a second).

The connections start spread over 5 s (~2,000 TLS handshakes at once starved this process on
the shared machine). What each did and how it was answered (or why it could not connect) is
counted and returned to the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import random
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from bench.fleet_agents import raise_file_limit, tls_context

Address = tuple[str, int]


@dataclass(frozen=True)
class Plan:
    """Numbers per replica (times the scale)."""

    malformed_per_s: float = 20
    not_http_per_s: float = 5
    declared_huge_per_s: float = 5
    streamed_huge_per_s: float = 2
    slow_heads: int = 100
    slow_bodies: int = 50
    flood: int = 500

    def scaled(self, scale: float) -> Plan:
        return Plan(*(type(v)(v * scale) for v in vars(self).values()))


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _status(line: bytes) -> str:
    """An answer's status code ("closed": none came)."""
    words = line.split()
    return words[1].decode(errors="replace") if len(words) > 1 else "closed"


class Abuser:
    def __init__(self, ca_file: str) -> None:
        self.tls = tls_context(ca_file)
        self.counts: Counter[str] = Counter()
        self.stopping = asyncio.Event()

    async def _open(self, where: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(*where, ssl=self.tls), 15)

    async def _exchange(self, where: Address, data: bytes, kind: str) -> None:
        """One request on a new connection; the answer's status counted."""
        try:
            reader, writer = await self._open(where)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.counts[f"{kind}:connect_failed:{type(exc).__name__}"] += 1
            return
        try:
            writer.write(data)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 15)
            self.counts[f"{kind}:{_status(line)}"] += 1
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            self.counts[f"{kind}:reset"] += 1
        finally:
            writer.transport.abort()

    async def _kept_alive(self, where: Address, rate: float) -> None:
        """Broken JSON on one kept-alive connection (reopened when the authority closes it)."""
        bodies = [
            (b"POST /v1/host/report", b"authorization: Bearer not-a-token\r\n", b'{"ready": tru'),
            (b"POST /v1/enroll", b"", b'{"token_secret": "x", "csr": '),
            (b"POST /v1/enroll", b"", b"[[[[[[[[[[[[[[[[[[[[[[[["),
        ]
        reader = writer = None
        while not self.stopping.is_set():
            request, extra, body = random.choice(bodies)
            try:
                if writer is None or writer.is_closing():
                    reader, writer = await self._open(where)
                assert reader is not None
                writer.write(
                    request + b" HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n" + extra
                    + b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )  # fmt: skip
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
                length = _content_length(head)
                await reader.readexactly(length)
                self.counts[f"malformed:{head.split()[1].decode()}"] += 1
            except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError, ValueError):
                self.counts["malformed:reset"] += 1
                if writer is not None:
                    writer.transport.abort()
                writer = None
            await asyncio.sleep(1 / rate)

    async def _at_rate(self, rate: float, one: Callable[[], Coroutine[Any, Any, None]]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        while not self.stopping.is_set():
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(random.expovariate(rate))
        for task in list(tasks):
            task.cancel()

    async def _streamed_huge(self, where: Address) -> None:
        try:
            reader, writer = await self._open(where)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.counts[f"streamed_huge:connect_failed:{type(exc).__name__}"] += 1
            return
        chunk = b"x" * 16384
        answer = asyncio.ensure_future(reader.readline())
        try:
            writer.write(b"POST /v1/enroll HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(640):  # 10 MB, unless refused first
                writer.write(b"4000\r\n" + chunk + b"\r\n")
                await writer.drain()
                if answer.done():  # the refusal
                    break
            line = await asyncio.wait_for(answer, 15)
            self.counts[f"streamed_huge:{_status(line)}"] += 1
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            self.counts["streamed_huge:reset"] += 1
        finally:
            answer.cancel()
            writer.transport.abort()

    async def _slow(self, where: Address, kind: str, head: bytes, trickle: bytes, every_s: float) -> None:
        """A connection that sends `head` then `trickle` a byte every `every_s`, until the
        authority closes it; then another."""
        await asyncio.sleep(random.uniform(0, 5))  # (not every handshake at once)
        while not self.stopping.is_set():
            try:
                reader, writer = await self._open(where)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.counts[f"{kind}:connect_failed:{type(exc).__name__}"] += 1
                await asyncio.sleep(1)
                continue
            self.counts[f"{kind}:opened"] += 1
            try:
                if head:
                    writer.write(head)
                for i in range(10**6):
                    if reader.at_eof() or writer.is_closing() or self.stopping.is_set():
                        break
                    if trickle:
                        writer.write(trickle[i % len(trickle) : i % len(trickle) + 1])
                        await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        answer = await asyncio.wait_for(reader.read(200), every_s)
                        if answer:
                            self.counts[f"{kind}:answered_{_status(answer)}"] += 1
                        break
                self.counts[f"{kind}:closed"] += 1
            except (OSError, ssl.SSLError, IndexError):
                self.counts[f"{kind}:closed"] += 1
            finally:
                writer.transport.abort()

    async def run(self, targets: list[Address], plan: Plan) -> None:
        jobs: list[Awaitable[None]] = []
        for where in targets:
            jobs.append(self._kept_alive(where, plan.malformed_per_s))
            not_http = b"\x16\x03\x01garbage\r\n\r\n"
            declared = b"POST /v1/enroll HTTP/1.1\r\nhost: a\r\ncontent-length: 10485760\r\n\r\n"
            jobs.append(
                self._at_rate(plan.not_http_per_s, partial(self._exchange, where, not_http, "not_http"))
            )
            jobs.append(
                self._at_rate(
                    plan.declared_huge_per_s, partial(self._exchange, where, declared, "declared_huge")
                )
            )
            jobs.append(self._at_rate(plan.streamed_huge_per_s, partial(self._streamed_huge, where)))
            head = b"POST /v1/enroll HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
            for _ in range(plan.slow_heads):
                jobs.append(self._slow(where, "slow_head", b"", head + b"x-pad: " + b"a" * 4000, 2.0))
            body_head = b"POST /v1/enroll HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n"
            for _ in range(plan.slow_bodies):
                jobs.append(self._slow(where, "slow_body", body_head, b"{" + b" " * 998, 1.0))
            for _ in range(plan.flood):
                jobs.append(self._slow(where, "flood", b"", b"", 30.0))
        await asyncio.gather(*jobs, return_exceptions=True)


async def _abuse(conn: Connection, targets: list[Address], ca_file: str, plan: Plan) -> None:
    # Aborted transports make asyncio log a warning per write after the abort and, in 3.11's
    # selector transport, a traceback per abort racing a close: noise by the thousand here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    abuser = Abuser(ca_file)
    running = asyncio.create_task(abuser.run(targets, plan))
    started = time.monotonic()
    await asyncio.to_thread(conn.recv)  # "stop"
    abuser.stopping.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(running, 5)
    conn.send({"seconds": round(time.monotonic() - started, 1), **dict(abuser.counts)})


def abuse_main(conn: Connection, targets: list[Address], ca_file: str, plan: Plan) -> None:
    raise_file_limit(20_000)
    asyncio.run(_abuse(conn, targets, ca_file, plan))


class AbuseProcess:
    def __init__(self, targets: list[Address], ca_file: str, scale: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=abuse_main,
            args=(child, targets, ca_file, Plan().scaled(scale)),
            name="fleet-abuse",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self._counts: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def counts(self) -> dict[str, Any]:
        """Stop the bad clients; what each kind did and how it was answered."""
        if self._counts is None:
            self.conn.send("stop")
            self._counts = self.conn.recv() if self.conn.poll(30) else {"error": "no counts"}
        return self._counts

    def close(self) -> None:
        self.counts()
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


@contextlib.contextmanager
def running_abuse(targets: list[Address], ca_file: str, scale: float) -> Iterator[AbuseProcess]:
    abuse = AbuseProcess(targets, ca_file, scale)
    try:
        yield abuse
    finally:
        abuse.close()
