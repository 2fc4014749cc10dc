"""CPU per new connection through a real Proxy pair on loopback (issue #19: handshake cost).

Host A (web, outbound proxy) and host B (db, inbound proxy) run in one child process on uvloop,
as tests/proxy/test_mtls_loopback.py builds them; the clients and the echo app run in this
process, so the child's CPU (user + system, from /proc) is the two proxies' cost alone.
Each connection: connect to A's outbound port, send 5 bytes, half-close, read the echo.

    flock /tmp/meshagent-bench.lock .venv/bin/python -m bench.handshake_loopback -n 400 -c 1
    ... --resume            # proxy.tls_resumption = true (default: every handshake full)
    ... --native            # proxy.native_relay = true (default: the Python relay)
    ... --metrics           # both proxies keep their metrics (telemetry.metrics, on in a daemon)
    ... --http              # one HTTP/1.1 request per connection (detected and accounted)
    ... --haproxy           # then a haproxy pair doing the same job, and the ratio
    ... --profile out.prof  # cProfile of the proxies' loop (inflates the CPU figure)

It runs in a network namespace of its own (loopback only), removed when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import psutil
import uvloop

REPO = Path(__file__).resolve().parent.parent


def _proxies(
    tmp: str, app_port: int, resume: bool, native: bool, metrics: bool, profile: str, conn: Connection
) -> None:
    from agent.identity.store import IdentityStore
    from agent.proxy.catalog import Catalog, CatalogEntry
    from agent.proxy.listeners import ListenerSettings, Proxy
    from agent.proxy.policy import InboundPolicy
    from agent.proxy.tls import Credentials
    from agent.telemetry.proxy_metrics import ProxyMetrics

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
            ProxyMetrics() if metrics else None,
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
            ProxyMetrics() if metrics else None,
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


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n"
HTTP_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def _client(port: int, n: int, concurrency: int, http: bool = False) -> int:
    sem = asyncio.Semaphore(concurrency)
    ok = 0
    request, answer = (HTTP_REQUEST, HTTP_RESPONSE) if http else (b"hello", b"echo:hello")

    async def one() -> None:
        nonlocal ok
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            if not http:
                writer.write_eof()
            if await reader.read() == answer:
                ok += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return ok


def _cpu(p: psutil.Process) -> tuple[float, float]:
    t = p.cpu_times()
    return t.user, t.system


HAPROXY_IN, HAPROXY_TLS = 25001, 25443  # (inside this run's own namespace)
SERVER_NAME = "db.shop.serviceaccount.identity.linkerd.cluster.local"
INSIDE = "MESHAGENT_HANDSHAKE_LOOPBACK_NETNS"  # set: already in the namespace made for the run


def _haproxy_pair(tmp: Path, app_port: int, resume: bool) -> list[subprocess.Popen[bytes]]:
    """haproxy doing the proxies' job with the same certificates, as bench/dataplane.py runs it:
    its default threads; no resumption unless `resume` (then haproxy's defaults)."""
    procs = []
    for role in ("a", "b"):
        gen = (tmp / role / "identity").resolve()
        pem = tmp / f"haproxy-{role}.pem"
        pem.write_text((gen / "cert.pem").read_text() + (gen / "key.pem").read_text())
        pem.chmod(0o600)
        tls = f"ca-file {gen / 'bundle.pem'} verify required ssl-min-ver TLSv1.3"
        if role == "a":
            section = (
                f"listen out\n    bind 127.0.0.1:{HAPROXY_IN}\n"
                f"    server b 127.0.0.1:{HAPROXY_TLS} ssl crt {pem} {tls}"
                f" verifyhost {SERVER_NAME} sni str({SERVER_NAME})" + ("" if resume else " no-ssl-reuse")
            )
        else:
            section = (
                f"listen in\n    bind 127.0.0.1:{HAPROXY_TLS} ssl crt {pem} {tls}"
                + ("" if resume else " no-tls-tickets")
                + f"\n    server app 127.0.0.1:{app_port}"
            )
        cfg = tmp / f"haproxy-{role}.cfg"
        cfg.write_text(
            "global\n    maxconn 8000\n"
            + ("" if resume else "    tune.ssl.cachesize 0\n")
            + "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
            + f"    timeout server 60s\n{section}\n"
        )
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)]))
    return procs


def _listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")
        time.sleep(0.05)


def _in_own_namespace() -> int:
    """Run this benchmark again inside a network namespace of its own (loopback only), so that
    nothing it binds or sends touches the machine's own; the namespace is removed after."""
    from agent.netlab import Lab

    with Lab("hsl") as lab:
        host = lab.host("loop")
        proc = host.popen(
            sys.executable,
            "-m",
            "bench.handshake_loopback",
            *sys.argv[1:],
            env={**os.environ, INSIDE: "1"},
            cwd=str(REPO),
            stdout=None,
            stderr=None,
        )
        return proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=400, help="connections measured")
    ap.add_argument("-c", type=int, default=1, help="concurrent connections")
    ap.add_argument("--resume", action="store_true", help="TLS resumption on")
    ap.add_argument("--native", action="store_true", help="the compiled relay (proxy.native_relay) on")
    ap.add_argument("--metrics", action="store_true", help="both proxies keep metrics")
    ap.add_argument("--http", action="store_true", help="an HTTP/1.1 request per connection")
    ap.add_argument("--haproxy", action="store_true", help="then a haproxy pair doing the same job")
    ap.add_argument("--profile", default="", help="write a cProfile of the proxies here")
    args = ap.parse_args()
    if not os.environ.get(INSIDE):
        sys.exit(_in_own_namespace())

    from tests.support import issue_identity

    def report(what: str, ok: int, cpu: tuple[float, float], seconds: float) -> float:
        per_conn = float(sum(cpu) / args.n * 1e6)
        print(
            f"{what}: connections {ok}/{args.n} concurrency {args.c} resume {args.resume}: "
            f"CPU {per_conn:,.0f} us per connection (a+b; user {cpu[0] / args.n * 1e6:,.0f}, "
            f"system {cpu[1] / args.n * 1e6:,.0f}), {args.n / seconds:,.0f} conn/s, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        return per_conn

    async def measure(port: int, procs: list[psutil.Process]) -> tuple[int, tuple[float, float], float]:
        await _client(port, 30, args.c, args.http)  # warm up (and fill the session cache)
        c0, t0 = [_cpu(p) for p in procs], time.monotonic()
        ok = await _client(port, args.n, args.c, args.http)
        c1, t1 = [_cpu(p) for p in procs], time.monotonic()
        pairs = list(zip(c0, c1, strict=True))
        used = (sum(b[0] - a[0] for a, b in pairs), sum(b[1] - a[1] for a, b in pairs))
        return ok, used, t1 - t0

    async def run() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                if args.http:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(HTTP_RESPONSE)
                else:
                    writer.write(b"echo:" + await reader.read())
                await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):  # (haproxy's readiness probes)
                pass
            writer.close()

        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        app_port = app.sockets[0].getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            issue_identity(Path(tmp) / "authority", "shop/web", Path(tmp) / "a")
            issue_identity(Path(tmp) / "authority", "shop/db", Path(tmp) / "b")
            ours, theirs = mp.Pipe()
            child = mp.get_context("fork").Process(
                target=_proxies,
                args=(tmp, app_port, args.resume, args.native, args.metrics, args.profile, theirs),
            )
            child.start()
            loop = asyncio.get_running_loop()
            port = await loop.run_in_executor(None, ours.recv)
            ours.send(1)  # (the profile, if any, starts here)
            ok, cpu, seconds = await measure(port, [psutil.Process(child.pid)])
            ours.send(1)
            await loop.run_in_executor(None, ours.recv)
            child.join(10)
            what = f"meshagent (native {args.native}, metrics {args.metrics}, http {args.http})"
            mesh = report(what, ok, cpu, seconds)
            if args.haproxy:
                pair = _haproxy_pair(Path(tmp), app_port, args.resume)
                try:
                    _listening(HAPROXY_IN)
                    _listening(HAPROXY_TLS)
                    ok, cpu, seconds = await measure(HAPROXY_IN, [psutil.Process(p.pid) for p in pair])
                finally:
                    for proc in pair:
                        proc.terminate()
                        proc.wait(10)
                ha = report("haproxy (its default threads)", ok, cpu, seconds)
                print(f"meshagent / haproxy, CPU per connection: {mesh / ha:.2f}x")
        app.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
