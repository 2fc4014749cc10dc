"""The DNS stub as `meshagent run` runs it (`[dns] enabled = true`): the stub, its redirect and
the heartbeat that keeps the redirect alive.

    dns = DnsService(config.dns, mark=config.intercept.proxy_mark)   # ConfigError if unusable
    await dns.start(services)          # bind the stub, then install the redirect
    tasks.start("dns-heartbeat", lambda: dns.heartbeat(stop))
    dns.set_services(services)         # on every directory refresh
    await dns.stop()                   # delete the redirect, then close the stub

Order matters for failing open: the redirect goes in only once the stub listens, and comes out
before the stub closes. Between, if the agent dies or hangs, the heartbeat stops and the kernel
lets the redirect lapse within `dns_rules.LIVE_TIMEOUT_S` (see agent/intercept/dns_rules.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from agent.config import DnsSettings
from agent.dns.names import NameTable, ServiceAddress, build_table, domain_labels
from agent.dns.server import STAT_KEYS, DnsStub, StubSettings
from agent.dns.upstreams import read_upstreams
from agent.errors import ConfigError, listen_error
from agent.intercept import dns_rules
from agent.intercept.tools import run as run_step
from agent.logs import Throttled, get_logger

log = get_logger("meshagent.dns")


class DnsService:
    def __init__(self, settings: DnsSettings, mark: int, uid: int | None = None) -> None:
        if not mark:
            raise ConfigError(
                "dns.enabled needs a mark for the stub's own upstream queries, and intercept.proxy_mark is 0",
                "set intercept.proxy_mark (default 0x1000000): marked queries skip the DNS redirect",
            )
        self.settings = settings
        self.mark = mark
        euid = os.geteuid() if uid is None else uid
        self.uid = None if euid == 0 else euid
        labels = domain_labels(settings.cluster_domain)
        assert not isinstance(labels, str)  # DnsSettings checked it
        self._domain = labels
        self.stub: DnsStub | None = None
        self.redirect: dns_rules.DnsRedirect | None = None
        self.upstreams: tuple[str, ...] = ()
        self.listening: list[tuple[str, int]] = []
        self.installed = False
        self.beats = 0
        self.beat_failures = 0
        self.last_error = ""
        self._warn = Throttled(log, "dns.heartbeat_failed", interval_s=30.0)

    # --- start / stop ----------------------------------------------------------------------

    def _addresses(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(stub addresses, upstreams): as configured, else resolv.conf's nameservers."""
        s = self.settings
        if s.stub_addresses and s.upstreams:
            return s.stub_addresses, s.upstreams
        found = read_upstreams(s.resolv_conf)
        if isinstance(found, str):
            raise ConfigError(
                f"dns.enabled: {found.partition(';')[0]}",
                f"fix {s.resolv_conf}, or set dns.stub_addresses and dns.upstreams (the resolver addresses)",
            )
        return s.stub_addresses or found, s.upstreams or found

    async def start(self, services: Iterable[ServiceAddress]) -> None:
        s = self.settings
        stub_addresses, self.upstreams = await asyncio.to_thread(self._addresses)
        listen = ("127.0.0.1", "::1") if any(":" in a for a in stub_addresses) else ("127.0.0.1",)
        stub = DnsStub(
            StubSettings(
                upstreams=self.upstreams,
                listen=listen,
                port=s.port,
                ttl_s=s.ttl,
                max_inflight=s.max_inflight,
                per_source_qps=s.per_source_qps,
                per_source_burst=s.per_source_burst,
                upstream_mark=self.mark,
            ),
            self._table(services),
        )
        try:
            self.listening = await stub.start()
        except OSError as exc:
            await stub.close()
            raise listen_error("DNS stub", "dns.port", "127.0.0.1", s.port, exc) from None
        self.stub = stub
        self.redirect = dns_rules.DnsRedirect(stub_addresses, s.port, self.mark, self.uid)
        try:
            await asyncio.to_thread(run_step, dns_rules.install_step(self.redirect))
        except BaseException:
            await stub.close()
            self.stub = None
            raise
        self.installed = True
        log.info(
            "dns.redirecting",
            stub_addresses=",".join(stub_addresses),
            upstreams=",".join(self.upstreams),
            port=s.port,
            names=len(stub.table),
            live_timeout_s=dns_rules.LIVE_TIMEOUT_S,
        )

    async def stop(self) -> None:
        """Delete the redirect (DNS goes straight to the resolvers at once), then close the stub."""
        if self.installed:
            self.installed = False
            try:
                for step in await asyncio.to_thread(dns_rules.remove_steps):
                    await asyncio.to_thread(run_step, step)
            except Exception as exc:  # the set's timeout lets the redirect lapse anyway
                log.warning("dns.remove_failed", reason=str(exc), hint="it lapses by itself within 3 s")
        if self.stub is not None:
            await self.stub.close()
            self.stub = None

    # --- the heartbeat ---------------------------------------------------------------------

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Refresh the live elements every BEAT_S until `stop`. A failed refresh is counted and
        the whole table installed again (someone may have flushed the ruleset); it never raises:
        while it fails, DNS simply goes straight to the resolvers."""
        assert self.redirect is not None
        nft = dns_rules.nft_path()
        script = dns_rules.beat(self.redirect).encode()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), dns_rules.BEAT_S)
            if stop.is_set() or not self.installed:
                return
            error = await _nft(nft, script)
            if error and self.installed:  # not a stop racing this beat: put the table back
                restored = await _nft(nft, dns_rules.render(self.redirect).encode())
                if not restored:
                    log.warning("dns.redirect_restored", reason=error, hint="someone deleted the table")
                    error = ""
            if error:
                self.beat_failures += 1
                self.last_error = error
                self._warn.warning("nft", reason=error, hint="DNS goes straight to the resolvers meanwhile")
            else:
                self.beats += 1

    # --- the names -------------------------------------------------------------------------

    def _table(self, services: Iterable[ServiceAddress]) -> NameTable:
        table = build_table(services, self._domain, self.settings.short_forms)
        for name, reason in table.skipped:
            log.warning("dns.name_skipped", service=name, reason=reason)
        return table

    def set_services(self, services: Iterable[ServiceAddress]) -> None:
        """The directory moved: answer from its Services from now on."""
        if self.stub is not None:
            self.stub.set_table(self._table(services))

    # --- what it shows ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        stub = self.stub
        return {
            "enabled": True,
            "redirect_installed": self.installed,
            "stub_addresses": [] if self.redirect is None else list(self.redirect.addresses),
            "upstreams": list(self.upstreams),
            "listening": [f"{h}:{p}" for h, p in self.listening],
            "cluster_domain": self.settings.cluster_domain,
            "short_forms": self.settings.short_forms,
            "names": 0 if stub is None else len(stub.table),
            "skipped": [] if stub is None else [f"{n}: {r}" for n, r in stub.table.skipped],
            "inflight": 0 if stub is None else stub.inflight,
            "counts": {k: 0 if stub is None else stub.stats[k] for k in STAT_KEYS},
            "heartbeats": self.beats,
            "heartbeat_failures": self.beat_failures,
            "last_error": self.last_error,
        }

    def metrics(self) -> Iterator[str]:
        """Prometheus lines: the stub's counters by outcome, its names and forwards in flight."""
        stub = self.stub
        counts = {k: 0 if stub is None else stub.stats[k] for k in STAT_KEYS}
        yield from _family(
            "meshagent_dns_queries_total",
            "counter",
            "DNS queries the stub received, by transport",
            [(f'transport="{t}"', counts[f"queries_{t}"]) for t in ("udp", "tcp")],
        )
        yield from _family(
            "meshagent_dns_responses_total",
            "counter",
            "Queries the stub answered itself (answer, nodata, nxdomain, truncated, badvers) or forwarded",
            [
                *(
                    (f'outcome="{o}"', counts[o])
                    for o in ("answer", "nodata", "nxdomain", "truncated", "badvers")
                ),
                ('outcome="forwarded"', counts["forward_answered"]),
                ('outcome="forward_failed"', counts["forward_failed"]),
            ],
        )
        yield from _family(
            "meshagent_dns_dropped_total",
            "counter",
            "Messages the stub dropped, by reason (short, not_query, rate, inflight, loop, tcp_refused)",
            [
                *(
                    (f'reason="{r}"', counts[f"dropped_{r}"])
                    for r in ("short", "not_query", "rate", "inflight", "loop")
                ),
                ('reason="tcp_refused"', counts["tcp_refused"]),
            ],
        )
        yield from _family(
            "meshagent_dns_names",
            "gauge",
            "Services the stub answers",
            [("", 0 if stub is None else len(stub.table))],
        )
        yield from _family(
            "meshagent_dns_inflight",
            "gauge",
            "Forwarded queries in flight",
            [("", 0 if stub is None else stub.inflight)],
        )
        yield from _family(
            "meshagent_dns_heartbeat_failures_total",
            "counter",
            "Refreshes of the DNS redirect that failed (DNS went straight to the resolvers)",
            [("", self.beat_failures)],
        )


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    for labels, value in samples:
        yield f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"


async def _nft(nft: str, script: bytes) -> str:
    """Run one `nft -f -` transaction; '' on success, else why not."""
    try:
        proc = await asyncio.create_subprocess_exec(
            nft,
            "-f",
            "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return str(exc)
    try:
        _, err = await asyncio.wait_for(proc.communicate(script), 10.0)
    except TimeoutError:
        proc.kill()  # ours, by its pid: a wedged nft must not pile up once a second
        await proc.wait()
        return "nft did not finish within 10 s"
    return (
        ""
        if proc.returncode == 0
        else err.decode(errors="replace").strip()[-300:] or f"exit {proc.returncode}"
    )
