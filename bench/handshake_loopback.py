"""CPU per new connection through a real Proxy pair on loopback (issue #19: handshake cost).

Host A (web, outbound proxy) and host B (db, inbound proxy) run in one child process on uvloop,
as tests/proxy/test_mtls_loopback.py builds them; the clients and the echo app run in this
process, so the child's CPU (user + system, from /proc) is the two proxies' cost alone.
Each connection: connect to A's outbound port, send 5 bytes, half-close, read the echo.

    flock /tmp/meshagent-bench.lock .venv/bin/python -m bench.handshake_loopback -n 400 -c 1
    ... --resume            # proxy.tls_resumption = true (default: every handshake full)
    ... --native            # proxy.native_relay = true (default: the Python relay)
    ... --profile out.prof  # cProfile of the proxies' loop (inflates the CPU figure)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import uvloop


def _proxies(tmp: str, app_port: int, resume: bool, native: bool, profile: str, conn: Connection) -> None:
    from agent.identity.store import IdentityStore
    from agent.proxy.catalog import Catalog, CatalogEntry
    from agent.proxy.listeners import ListenerSettings, Proxy
    from agent.proxy.policy import InboundPolicy
    from agent.proxy.tls import Credentials

    async def main() -> None:
        root = Path(tmp)
        b = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                tls_resumption=resume,
                native_relay=native,
            ),
            Credentials.load(IdentityStore(root / "b"), tickets=resume),
            InboundPolicy(),
            Catalog([]),
            lambda sock: ("127.0.0.1", app_port),
        )
        await b.start()
        b_in = b.listening["inbound"][1]
        doc = {
            "cidr": "127.0.0.1/32",
            "ports": [b_in],
            "identity": "spiffe://cluster.local/ns/shop/sa/db",
            "server_name": "db.shop.serviceaccount.identity.linkerd.cluster.local",
        }
        a = Proxy(
            ListenerSettings(
                inbound=("127.0.0.1", 0),
                outbound=("127.0.0.1", 0),
                tls_resumption=resume,
                native_relay=native,
            ),
            Credentials.load(IdentityStore(root / "a"), tickets=resume),
            InboundPolicy(),
            Catalog([CatalogEntry.from_doc(doc)]),
            lambda sock: ("127.0.0.1", b_in),
        )
        await a.start()
        loop = asyncio.get_running_loop()
        conn.send(a.listening["outbound"][1])
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
        await loop.run_in_executor(None, conn.recv)  # start
        if prof:
            prof.enable()
        await loop.run_in_executor(None, conn.recv)  # stop
        if prof:
            prof.disable()
            prof.dump_stats(profile)
        conn.send(0)
        await a.stop(0.5)
        await b.stop(0.5)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def _client(port: int, n: int, concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async def one() -> None:
        nonlocal ok
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            writer.write_eof()
            if await reader.read() == b"echo:hello":
                ok += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return ok


def _cpu(p: psutil.Process) -> tuple[float, float]:
    t = p.cpu_times()
    return t.user, t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=400, help="connections measured")
    ap.add_argument("-c", type=int, default=1, help="concurrent connections")
    ap.add_argument("--resume", action="store_true", help="TLS resumption on")
    ap.add_argument("--native", action="store_true", help="the compiled relay (proxy.native_relay) on")
    ap.add_argument("--profile", default="", help="write a cProfile of the proxies here")
    args = ap.parse_args()

    from tests.support import issue_identity

    async def run() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"echo:" + await reader.read())
            await writer.drain()
            writer.close()

        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            issue_identity(Path(tmp) / "authority", "shop/web", Path(tmp) / "a")
            issue_identity(Path(tmp) / "authority", "shop/db", Path(tmp) / "b")
            ours, theirs = mp.Pipe()
            child = mp.get_context("fork").Process(
                target=_proxies, args=(tmp, app_port, args.resume, args.native, args.profile, theirs)
            )
            child.start()
            loop = asyncio.get_running_loop()
            port = await loop.run_in_executor(None, ours.recv)
            proc = psutil.Process(child.pid)
            await _client(port, 30, args.c)  # warm up (and fill the session cache)
            load = os.getloadavg()[0]
            ours.send(1)
            c0, t0 = _cpu(proc), time.monotonic()
            ok = await _client(port, args.n, args.c)
            c1, t1 = _cpu(proc), time.monotonic()
            ours.send(1)
            await loop.run_in_executor(None, ours.recv)
            child.join(10)
            app.close()
            print(
                f"connections {ok}/{args.n} concurrency {args.c} resume {args.resume} native {args.native}: "
                f"proxies' CPU {(sum(c1) - sum(c0)) / args.n * 1e6:,.0f} us per connection (a+b; "
                f"user {(c1[0] - c0[0]) / args.n * 1e6:,.0f}, system {(c1[1] - c0[1]) / args.n * 1e6:,.0f}), "
                f"{args.n / (t1 - t0):,.0f} conn/s, load average {load:.1f}"
            )

    asyncio.run(run())


if __name__ == "__main__":
    main()
