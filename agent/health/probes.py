"""The app's own readiness probes, run by the agent on the host (issue #17 "Health").

Modelled on Istio's `WorkloadGroup.probe` (a Kubernetes readinessProbe run by the VM's agent):
`tcpSocket`, `httpGet` (path, expected status) and `exec` (argv, no shell), each every
`interval_s` (periodSeconds) with `timeout_s` (timeoutSeconds); a probe turns failing after
`failure_threshold` failures in a row and ok again after `success_threshold` successes in a row
(failureThreshold, successThreshold). As in Kubernetes, a probe is failing until it first
passes, and an HTTP status of 200-399 passes unless `expect_status` names one.

Probes dial 127.0.0.1:<port>. The interception rules never capture them: loopback is skipped
both ways (agent/intercept/plan.py: `oifname lo` in the outbound chain, `iifname lo` in the
inbound chain), and the agent's own uid is skipped as well.

Three layers: `parse_probes` (config in, ProbeSpec out, ConfigError naming the key), `step`
(the pure state machine, one result in, the probe's state out) and `ProbeRunner` (asyncio: runs
the checks, feeds `step`, hands out `results()` in the report's `probes` shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent.errors import ConfigError
from agent.logs import get_logger

log = get_logger("meshagent.health")

ProbeKind = Literal["tcp", "http", "exec"]
KINDS: tuple[ProbeKind, ...] = ("tcp", "http", "exec")
MAX_PROBES = 32
MAX_DETAIL = 200  # characters of a result's detail kept (it goes into a Kubernetes condition)
_HTTP_HEAD_LIMIT = 8192  # bytes of an HTTP answer read to find its status line
_EXEC_OUTPUT_KEPT = 160

_COMMON = ("port", "kind", "interval_s", "timeout_s", "failure_threshold", "success_threshold")
_KEYS: dict[str, tuple[str, ...]] = {
    "tcp": _COMMON,
    "http": (*_COMMON, "path", "expect_status"),
    "exec": (*_COMMON, "command"),
}
_EXAMPLE = (
    'e.g. [[health.probes]] port = 8080, kind = "http", path = "/healthz"; '
    'kind = "tcp"; or kind = "exec", command = ["/usr/local/bin/check", "--quick"]'
)


@dataclass(frozen=True)
class ProbeSpec:
    """One probe of the app on `port` (exec probes name the port they vouch for)."""

    port: int
    kind: ProbeKind
    path: str = "/"
    expect_status: int | None = None  # None: 200-399, as Kubernetes' httpGet
    command: tuple[str, ...] = ()
    interval_s: float = 10.0  # periodSeconds
    timeout_s: float = 1.0  # timeoutSeconds
    failure_threshold: int = 3  # failureThreshold
    success_threshold: int = 1  # successThreshold

    @property
    def label(self) -> str:
        """How messages name the probe: `http :8080/healthz`, `tcp :5432`, `exec :8080 (/bin/check)`."""
        if self.kind == "http":
            return f"http :{self.port}{self.path}"
        if self.kind == "exec":
            return f"exec :{self.port} ({self.command[0]})"
        return f"tcp :{self.port}"


def _number(doc: dict[str, Any], key: str, where: str, lo: float, hi: float, default: float) -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} must be a number, got {value!r}", _EXAMPLE)
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _integer(doc: dict[str, Any], key: str, where: str, lo: int, hi: int, default: int | None) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key} must be an integer {lo}..{hi}, got {value!r}", _EXAMPLE)
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} must be an integer {lo}..{hi}, got {value!r}")
    return value


def parse_probe(doc: object, where: str) -> ProbeSpec:
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must be a table with port and kind", _EXAMPLE)
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind must be one of tcp, http, exec, got {kind!r}", _EXAMPLE)
    known = _KEYS[kind]
    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(str(key), [k for keys in _KEYS.values() for k in keys], n=1)
            if close and close[0] in known:
                hint = f"did you mean {where}.{close[0]}?"
            elif close:
                hint = (
                    f"{close[0]} belongs to another kind of probe; a {kind} probe takes: {', '.join(known)}"
                )
            else:
                hint = f"a {kind} probe takes: {', '.join(known)}"
            raise ConfigError(f"unknown key {where}.{key}", hint)
    if "port" not in doc:
        raise ConfigError(f"{where} has no port: every probe names the app port it checks", _EXAMPLE)
    port = _integer(doc, "port", where, 1, 65535, None)
    interval = _number(doc, "interval_s", where, 1, 3600, 10)
    timeout = _number(doc, "timeout_s", where, 0.05, 3600, 1)
    if timeout > interval:
        # A round must end before the next starts: overlapping checks pile up on a stuck app.
        raise ConfigError(
            f"{where}.timeout_s ({timeout:g}) is longer than its interval_s ({interval:g})",
            "make timeout_s at most interval_s",
        )
    spec = ProbeSpec(
        port=port,
        kind=kind,
        interval_s=interval,
        timeout_s=timeout,
        failure_threshold=_integer(doc, "failure_threshold", where, 1, 100, 3),
        success_threshold=_integer(doc, "success_threshold", where, 1, 100, 1),
    )
    if kind == "http":
        path = doc.get("path", "/")
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or len(path) > 1024
            or not all(33 <= ord(c) < 127 for c in path)
        ):
            raise ConfigError(
                f"{where}.path must be an absolute request path without spaces, got {path!r}",
                'e.g. path = "/healthz" (percent-encode anything else)',
            )
        expect = doc.get("expect_status")
        if expect is not None:
            expect = _integer(doc, "expect_status", where, 100, 599, None)
        spec = replace(spec, path=path, expect_status=expect)
    if kind == "exec":
        command = doc.get("command")
        if (
            not isinstance(command, list)
            or not command
            or len(command) > 64
            or not all(isinstance(a, str) and a and "\0" not in a for a in command)
        ):
            raise ConfigError(
                f"{where}.command must be a non-empty list of arguments (run without a shell)",
                'e.g. command = ["/usr/local/bin/check", "--quick"]; for a pipeline: '
                'command = ["/bin/sh", "-c", "..."]',
            )
        spec = replace(spec, command=tuple(command))
    return spec


def parse_probes(doc: list[Any], where: str = "health.probes") -> list[ProbeSpec]:
    """The `[[health.probes]]` tables, checked whole; one probe of a kind per port (a report
    names a probe by port and kind)."""
    if not isinstance(doc, list):
        raise ConfigError(f"{where} must be a list of tables", _EXAMPLE)
    if len(doc) > MAX_PROBES:
        raise ConfigError(f"{where} has {len(doc)} probes; at most {MAX_PROBES}")
    specs = [parse_probe(item, f"{where}[{i}]") for i, item in enumerate(doc)]
    seen: set[tuple[int, str]] = set()
    for i, spec in enumerate(specs):
        if (spec.port, spec.kind) in seen:
            raise ConfigError(
                f"{where}[{i}]: a second {spec.kind} probe of port {spec.port}",
                "give each port at most one probe of each kind",
            )
        seen.add((spec.port, spec.kind))
    return specs


# --- the state machine (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """One check's outcome."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class ProbeState:
    """A probe's state: ok or failing since `since`, with the run of equal results that the
    thresholds count. `detail` is the latest result's (why it fails, or what passed)."""

    ok: bool
    since: float
    detail: str
    successes: int = 0  # in a row
    failures: int = 0  # in a row

    @classmethod
    def initial(cls, now: float) -> ProbeState:
        return cls(ok=False, since=now, detail="not probed yet")


def step(state: ProbeState, result: ProbeResult, now: float, spec: ProbeSpec) -> ProbeState:
    """The state after one result: failing -> ok after `success_threshold` passes in a row,
    ok -> failing after `failure_threshold` failures in a row; `since` moves only on a flip."""
    successes = state.successes + 1 if result.ok else 0
    failures = 0 if result.ok else state.failures + 1
    ok = state.ok
    if not ok and successes >= spec.success_threshold:
        ok = True
    elif ok and failures >= spec.failure_threshold:
        ok = False
    detail = result.detail
    if ok and not result.ok:
        detail = f"{result.detail} ({failures} of {spec.failure_threshold} failures to turn failing)"
    return ProbeState(
        ok=ok,
        since=now if ok != state.ok else state.since,
        detail=detail[:MAX_DETAIL],
        successes=successes,
        failures=failures,
    )


# --- the checks (I/O) -------------------------------------------------------------------------

LOOPBACK = "127.0.0.1"


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _os_error(exc: OSError) -> str:
    # asyncio's connect errors carry errno but a strerror of its own ("Connect call failed").
    return os.strerror(exc.errno) if exc.errno else exc.strerror or type(exc).__name__


async def check_tcp(spec: ProbeSpec) -> ProbeResult:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, spec.port), spec.timeout_s)
    except TimeoutError:
        return ProbeResult(False, f"no connection within {spec.timeout_s:g}s")
    except OSError as exc:
        return ProbeResult(False, f"connect to {LOOPBACK}:{spec.port}: {_os_error(exc)}")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeResult(True, "connected")


async def _http_status(spec: ProbeSpec) -> int:
    reader, writer = await asyncio.open_connection(LOOPBACK, spec.port, limit=_HTTP_HEAD_LIMIT)
    try:
        writer.write(
            f"GET {spec.path} HTTP/1.1\r\nHost: {LOOPBACK}:{spec.port}\r\n"
            "User-Agent: meshagent-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()  # past the limit: ValueError
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {_printable(line[:60])!r}")
        return int(parts[1])
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def check_http(spec: ProbeSpec) -> ProbeResult:
    try:
        status = await asyncio.wait_for(_http_status(spec), spec.timeout_s)
    except TimeoutError:
        return ProbeResult(False, f"GET {spec.path}: no answer within {spec.timeout_s:g}s")
    except OSError as exc:
        return ProbeResult(False, f"GET {spec.path}: {_os_error(exc)}")
    except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return ProbeResult(False, f"GET {spec.path}: {exc}")
    ok = status == spec.expect_status if spec.expect_status is not None else 200 <= status < 400
    want = str(spec.expect_status) if spec.expect_status is not None else "200-399"
    return ProbeResult(ok, f"GET {spec.path}: status {status}" + ("" if ok else f", expected {want}"))


async def _drain(stream: asyncio.StreamReader | None) -> bytes:
    """The output's start; the rest is read and dropped so the command never blocks on a pipe."""
    kept = b""
    if stream is None:
        return kept
    while chunk := await stream.read(65536):
        if len(kept) < _EXEC_OUTPUT_KEPT:
            kept += chunk[: _EXEC_OUTPUT_KEPT - len(kept)]
    return kept


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # The command runs in its own session: its children die with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def check_exec(spec: ProbeSpec) -> ProbeResult:
    try:
        proc = await asyncio.create_subprocess_exec(
            *spec.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ProbeResult(False, f"cannot run {spec.command[0]}: {_os_error(exc)}")
    try:
        output, code = await asyncio.wait_for(
            asyncio.gather(_drain(proc.stdout), proc.wait()), spec.timeout_s
        )
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return ProbeResult(False, f"{spec.command[0]} did not finish within {spec.timeout_s:g}s: killed")
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    said = _printable(output)
    if code == 0:
        return ProbeResult(True, f"exit 0{': ' + said if said else ''}")
    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return ProbeResult(False, f"{spec.command[0]}: {how}{': ' + said if said else ''}")


CHECKS = {"tcp": check_tcp, "http": check_http, "exec": check_exec}


# --- the runner -------------------------------------------------------------------------------


class ProbeRunner:
    """Runs each probe every interval_s and keeps its state. `run_round()` runs every probe
    once (tests and the first round use it); `run(stop)` is the daemon's loop. `on_change` is
    called when a probe flips (the report loop sends at once)."""

    def __init__(
        self,
        specs: Sequence[ProbeSpec],
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.specs = tuple(specs)
        self.clock = clock
        self.on_change = on_change
        now = clock()
        self.states = [ProbeState.initial(now) for _ in self.specs]
        self.rounds = 0

    async def probe(self, index: int) -> bool:
        """Run probe `index` once; True when it flipped."""
        spec = self.specs[index]
        result = await CHECKS[spec.kind](spec)
        before = self.states[index]
        after = step(before, result, self.clock(), spec)
        self.states[index] = after
        if after.ok != before.ok:
            log.info(
                "health.probe_changed",
                probe=spec.label,
                ok=after.ok,
                detail=after.detail,
            )
            if self.on_change is not None:
                self.on_change()
            return True
        return False

    async def run_round(self) -> bool:
        """Every probe once, concurrently; True when any flipped."""
        flipped = await asyncio.gather(*(self.probe(i) for i in range(len(self.specs))))
        self.rounds += 1
        return any(flipped)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._loop(i, stop) for i in range(len(self.specs))))

    async def _loop(self, index: int, stop: asyncio.Event) -> None:
        interval = self.specs[index].interval_s
        while not stop.is_set():
            started = time.monotonic()
            await self.probe(index)
            wait = max(0.0, interval - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    def all_ok(self) -> bool:
        return all(s.ok for s in self.states)

    def results(self) -> list[dict[str, Any]]:
        """The report's `probes`: port, kind, ok, detail, since (Unix time of the last flip)."""
        return [
            {"port": spec.port, "kind": spec.kind, "ok": st.ok, "detail": st.detail, "since": st.since}
            for spec, st in zip(self.specs, self.states, strict=True)
        ]
