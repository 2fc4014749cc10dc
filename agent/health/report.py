"""The agent's health report to the authority: POST /v1/host/report (issue #17 "Health").

The authority marks a host Ready while reports keep coming (one within 3 x refresh_interval_s),
say the agent is ready and every probe passes (agent/authority/health.py). So the report goes
every refresh interval, and at once when the agent's readiness or a probe flips: a failing app
reaches the cluster in one probe round plus one request, not one interval later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psutil

from agent import __version__
from agent.config import AgentConfig, describe
from agent.errors import MeshagentError
from agent.identity.names import MAX_HOST_ADDRESSES, InvalidName, validate_host_address
from agent.logs import get_logger

log = get_logger("meshagent.health")

MAX_REASON = 1000  # characters; the authority refuses longer


def build_report(
    *,
    not_ready_reasons: Sequence[str],
    directory_updated_at: float | None,
    refresh_interval_s: float,
    probes: Sequence[dict[str, Any]] = (),
    agent_version: str = __version__,
    certificate: Mapping[str, Any] | None = None,
    interception: Mapping[str, Any] | None = None,
    listeners: Mapping[str, str] | None = None,
    last_error: str = "",
    addresses: Sequence[str] = (),
    started_at: float | None = None,
    config_digest: str | None = None,
) -> dict[str, Any]:
    """The report body (interfaces §5): the agent's own readiness (`meshagent status`'s
    not_ready_reasons, joined), when its directory was last refreshed (the authority's
    `generated_at`, so one clock), its refresh interval and its probes' states; since #18 also
    the certificate it serves with ({serial, not_after, renewal_error}), interception
    ({applied, backend}), its listeners, its last error and its addresses (the fleet's view,
    `authority hosts`); since #20 when the agent started (`started_at`, this process's start
    unless given: the authority logs a restart when it moves) and a digest of its effective
    configuration (`config_digest`: the authority logs config_changed when it moves). Optional
    keys are left out when unknown: the authority takes reports without them (older agents)."""
    # A reason may carry a subprocess's multi-line stderr: the authority refuses control
    # characters, and one refused report would leave the host looking stale.
    reason = _one_line("; ".join(not_ready_reasons))
    if len(reason) > MAX_REASON:
        reason = reason[: MAX_REASON - 3] + "..."
    doc: dict[str, Any] = {
        "agent_version": agent_version,
        "ready": not not_ready_reasons,
        "reason": reason,
        "directory_updated_at": directory_updated_at,
        "refresh_interval_s": refresh_interval_s,
        "probes": [{**p, "detail": _one_line(str(p.get("detail", "")))} for p in probes],
        "last_error": _bounded(last_error),
        "addresses": list(addresses)[:MAX_HOST_ADDRESSES],
        "started_at": process_started_at() if started_at is None else started_at,
    }
    if config_digest is not None:
        doc["config_digest"] = config_digest
    if certificate is not None:
        doc["certificate"] = {
            **certificate,
            "renewal_error": _bounded(str(certificate.get("renewal_error", ""))),
        }
    if interception is not None:
        doc["interception"] = dict(interception)
    if listeners is not None:
        doc["listeners"] = dict(listeners)
    return doc


CONFIG_DIGEST_HEX = 16  # hex digits sent: enough to tell configs apart, too few to read anything


def config_digest(config: AgentConfig) -> str:
    """A short digest of the agent's effective configuration: sha256 over every setting's value
    as `meshagent config show` prints it (so a proxy password is hashed as ***: the digest never
    covers a secret), canonical JSON, first CONFIG_DIGEST_HEX hex digits. Where a value came from
    (file, environment, default) is left out: the same values give the same digest."""
    values = {row["key"]: row["value"] for row in describe(config)}
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CONFIG_DIGEST_HEX]


@functools.cache
def process_started_at() -> float:
    """When this agent process started (Unix time, from the kernel: the same on every call)."""
    return float(psutil.Process().create_time())


def _bounded(text: str) -> str:
    text = _one_line(text)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def error_line(entry: Mapping[str, Any]) -> str:
    """One `last_errors` entry ({"kind", "message"} or the proxy's {"at", "kind", **fields})
    as one line: "kind: message" or "kind: key=value ..."."""
    if "message" in entry:
        return f"{entry.get('kind', '')}: {entry['message']}"
    fields = " ".join(f"{k}={v}" for k, v in entry.items() if k not in ("at", "kind"))
    return f"{entry.get('kind', '')}: {fields}".rstrip(": ")


def host_addresses() -> list[str]:
    """This host's addresses, as enrollment registers them (unicast; no loopback or link-local:
    names.validate_host_address), so the fleet view shows when they drift from the registry's."""
    found: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(InvalidName):
                    found.add(validate_host_address(addr.address.split("%")[0]))
    return sorted(found)[:MAX_HOST_ADDRESSES]


def _one_line(text: str) -> str:
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)


def state_key(doc: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a report worth sending at once when it changes: readiness, each probe's ok,
    the certificate (a renewal, or its renewal starting or ceasing to fail), interception."""
    cert = doc.get("certificate") or {}
    return (
        doc["ready"],
        doc["reason"],
        tuple((p["port"], p["kind"], p["ok"]) for p in doc["probes"]),
        cert.get("serial"),
        bool(cert.get("renewal_error")),
        (doc.get("interception") or {}).get("applied"),
    )


class Reporter:
    """Sends `build()` with `send(doc)` (blocking; run in a thread) every `interval_s`, and at
    once when `state_key` changes: checked every `recheck_s`, or right away after `poke()`
    (the probe runner's on_change). A failed send is logged and retried at the next interval
    or change; the agent keeps serving either way."""

    def __init__(
        self,
        build: Callable[[], dict[str, Any]],
        send: Callable[[dict[str, Any]], object],
        interval_s: float,
        *,
        recheck_s: float = 2.0,
    ) -> None:
        self.build = build
        self.send = send
        self.interval_s = interval_s
        self.recheck_s = recheck_s
        self.sent = 0
        self.failures = 0
        self.last_error = ""
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        last_key: tuple[Any, ...] | None = None
        due = 0.0
        while not stop.is_set():
            self._wake.clear()
            doc = self.build()
            key = state_key(doc)
            if key != last_key or time.monotonic() >= due:
                last_key = key
                due = time.monotonic() + self.interval_s
                await self._send(doc)
            await self._wait(stop, min(self.recheck_s, max(0.0, due - time.monotonic())))

    async def _send(self, doc: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self.send, doc)
        except MeshagentError as exc:
            self.failures += 1
            self.last_error = f"{exc.code}: {exc.message}"
            log.warning("health.report_failed", code=exc.code, reason=exc.message)
            return
        self.sent += 1
        self.last_error = ""
        log.debug("health.reported", ready=doc["ready"], probes=len(doc["probes"]))

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await w
