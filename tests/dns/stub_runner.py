"""Runs the DNS stub in a test namespace (tests/dns/test_dns_netns.py), as the agent would:
`python stub_runner.py '<json>'`. Prints READY once bound; on SIGUSR1 prints its counters as one
JSON line. With "live", it keeps its nft set element alive (the fail-open heartbeat the agent
would run): killed, it stops refreshing and the kernel lets DNS go straight upstream again."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from agent.dns.names import ServiceAddress, build_table
from agent.dns.server import DnsStub, StubSettings


async def heartbeat(lives: list[dict[str, str]]) -> None:
    """One nft transaction per beat: each set flushed and its element added with a fresh timeout."""
    script = "".join(
        f"flush set {x['set']}\nadd element {x['set']} {{ {x['element']} timeout {x['timeout']} }}\n"
        for x in lives
    )
    while True:
        proc = await asyncio.create_subprocess_exec("nft", "-f", "-", stdin=asyncio.subprocess.PIPE)
        await proc.communicate(script.encode())
        await asyncio.sleep(float(lives[0]["every_s"]))


async def main(conf: dict[str, object]) -> None:
    services = [ServiceAddress(s["name"], s["namespace"], tuple(s["ips"])) for s in conf.pop("services")]  # type: ignore[attr-defined]
    live = conf.pop("live", None)
    table = build_table(services, (b"cluster", b"local"), short_forms=True)
    settings = StubSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()})  # type: ignore[arg-type]
    stub = DnsStub(settings, table)
    await stub.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: print(json.dumps({**stub.stats, "inflight": stub.inflight}), flush=True)
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    beat = asyncio.create_task(heartbeat(live)) if live else None  # type: ignore[arg-type]
    print("READY", flush=True)
    await stop.wait()
    if beat is not None:
        beat.cancel()
    await stub.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
