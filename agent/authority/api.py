"""The authority's HTTPS API (`/v1/`), on Starlette: thin handlers over `service.Authority`.

Errors are JSON `{"code", "message", "hint"}` with a stable `code`; the OpenAPI description is
served at `/v1/openapi.json`. Nothing a client sends reaches uvicorn as an exception: bad input
is a 400, anything unforeseen a JSON 500 and one log line (never a traceback per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import weakref
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.errors import MeshagentError, RejectedError
from agent.identity import delta as wire
from agent.logs import Throttled, get_logger

from . import discovery, health
from .catalog_web import CatalogWeb
from .httpguard import current_limits
from .openapi import OPENAPI
from .service import Authority, EnrollResult, RenderedConfig
from .storage import RegistryUnavailable

log = get_logger("meshagent.authority.api")

MAX_BODY = 64 * 1024
# JSON integers the API takes (Unix times, ports) are far below this; bigger ones would overflow
# float and datetime arithmetic further in.
MAX_INT = 2**53

# HTTP status per refusal code; anything unlisted is a 400.
STATUS = {
    "token_unknown": 401,
    "unauthenticated": 401,
    "token_used": 403,
    "token_expired": 403,
    "host_revoked": 403,
    "host_unknown": 403,
    "stale_certificate": 403,
    "renewal_replayed": 403,
    "foreign_certificate": 403,
    "certificate_expired": 403,
    "possession_failed": 403,
    "clock_skew": 403,
    "discovery_disabled": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "internal": 500,
    "registry_unavailable": 503,
}

_API_HINT = "see /v1/openapi.json for the API"

# Registry calls run in these threads, not on the event loop: on PostgreSQL an enrollment is
# ~16 round trips (~28 ms of waiting), which on the loop serialized a replica's requests and
# left its pool idle. Two fewer than a replica's pool has connections (storage_pg.POOL_MAX).
REGISTRY_THREADS = 8

_R = TypeVar("_R")

MAX_WAIT_S = 60  # GET /v1/host/config?wait=N: the longest a long poll is held
WATCH_INTERVAL_S = 1.0  # how often the registry is checked for other processes' writes
_WAIT = re.compile(r"[0-9]{1,2}(\.[0-9]{1,3})?")


def error(code: str, message: str, hint: str = "") -> JSONResponse:
    doc = {"code": code, "message": message, "hint": hint}
    response = JSONResponse(doc, status_code=STATUS.get(code, 400))
    if code == "body_too_large":
        # The rest of the body is never read: close rather than parse it to find the next request.
        response.headers["connection"] = "close"
    if code == "registry_unavailable":
        response.headers["retry-after"] = "2"  # the pool reconnects by itself; retry soon
    return response


def _too_large() -> RejectedError:
    return RejectedError(
        f"request body over {MAX_BODY} bytes",
        "the API's requests are small JSON documents; check what is being sent",
        code="body_too_large",
    )


async def _read_body(request: Request) -> bytes:
    """The body, refused by its declared length before any of it is read, and read no further
    than MAX_BODY when it is streamed (chunked) or longer than declared."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RejectedError("Content-Length is not a number", _API_HINT, code="invalid_request")
        if int(declared) > MAX_BODY:
            raise _too_large()
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise _too_large()
    except ClientDisconnect:
        raise RejectedError("the client went away before sending its body", code="invalid_request") from None
    return bytes(body)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _field_ok(value: Any, kind: type) -> bool:
    if kind is int:
        # bool is an int to Python, not to the API; huge ints overflow time arithmetic.
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT
    if kind is str:
        return isinstance(value, str) and _encodable(value)
    if kind is list:
        return isinstance(value, list) and all(not isinstance(v, str) or _encodable(v) for v in value)
    return isinstance(value, kind)


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (valid JSON escapes, not valid UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_KIND_NAMES = {str: "string", int: f"integer (at most {MAX_INT} in magnitude)", list: "list"}


async def _json_body(request: Request) -> Any:
    raw = await _read_body(request)
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise RejectedError("request body is not JSON", _API_HINT, code="invalid_request") from None


async def _body(request: Request, fields: dict[str, type]) -> dict[str, Any]:
    doc = await _json_body(request)
    if not isinstance(doc, dict):
        raise RejectedError("request body must be a JSON object", _API_HINT, code="invalid_request")
    for name, kind in fields.items():
        if not _field_ok(doc.get(name), kind):
            raise RejectedError(
                f"field {name!r} is missing or not a {_KIND_NAMES.get(kind, kind.__name__)}",
                _API_HINT,
                code="invalid_request",
            )
    return doc


def _issued(authority: Authority, result: EnrollResult) -> dict[str, Any]:
    return {
        "host_id": result.host.id,
        "spiffe_id": result.identity.spiffe_id,
        "dns_name": result.identity.dns_name,
        "certificate_chain": result.chain_pem.decode(),
        "trust_bundle": result.trust_bundle_pem.decode(),
        "not_after": result.host.not_after.isoformat(),
        "server_time": authority.clock().timestamp(),
        "api_token": result.api_token,
    }


def _bearer(request: Request) -> str:
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not bearer.strip():
        raise RejectedError(
            "this endpoint needs Authorization: Bearer <the host token issued with its certificate>",
            code="unauthenticated",
        )
    return bearer.strip()


def _wait_s(text: str | None) -> float:
    """`?wait=N`: seconds a long poll may be held, 0 (absent) to answer at once."""
    if text is None:
        return 0.0
    if not _WAIT.fullmatch(text) or float(text) > MAX_WAIT_S:
        raise RejectedError(
            f"wait {text[:20]!r} is not a number of seconds from 0 to {MAX_WAIT_S}",
            "long poll with ?wait=30 and If-None-Match: <the ETag of the directory you hold>",
            code="invalid_request",
        )
    return float(text)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match against our strong ETag, compared weakly as RFC 9110 says for it."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip().removeprefix("W/")
        if tag == "*" or tag.strip('"') == etag.strip('"'):
            return True
    return False


def _accepts_gzip(accept_encoding: str | None) -> bool:
    """Accept-Encoding lists gzip (or *) with a weight above 0."""
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        weight = params.strip().lower()
        return not (weight.startswith("q=") and weight[2:].strip().rstrip("0").rstrip(".") in ("", "0"))
    return False


def _delta_base(a_im: str | None, base: str | None, if_none_match: str | None) -> str | None:
    """The version a client asks a delta from (agent.identity.delta): A-IM lists ours (with a
    weight above 0), If-None-Match names the document held (RFC 3229 requires it) and
    Meshagent-Delta-Base its version. None: answer the document."""
    if not (if_none_match and base and wire.is_version(base.strip())):
        return None
    for item in (a_im or "").split(","):
        name, _, params = item.partition(";")
        if name.strip().lower() == wire.DELTA_IM:
            weight = params.strip().lower()
            if weight.startswith("q=") and weight[2:].strip().rstrip("0").rstrip(".") in ("", "0"):
                return None
            return base.strip()
    return None


def _config_response(rendered: RenderedConfig, if_none_match: str | None = None) -> Response:
    # One ETag for both encodings: hosts compare it for equality, and no shared cache keeps
    # these (no-cache, authenticated).
    headers = {"etag": rendered.etag, "cache-control": "no-cache", "vary": "accept-encoding, a-im"}
    if rendered.version:
        headers[wire.VERSION_HEADER] = rendered.version
    status, media_type = 200, "application/json"
    if rendered.delta_base is not None:
        # RFC 3229: 226 IM Used, the manipulation applied, the base instance's entity tag.
        status, media_type = 226, wire.DELTA_MEDIA_TYPE
        headers["im"] = wire.DELTA_IM
        headers["delta-base"] = (if_none_match or "").split(",")[0].strip()
    if rendered.gzip is None:
        return Response(rendered.body, status_code=status, media_type=media_type, headers=headers)
    headers["content-encoding"] = "gzip"
    return Response(rendered.gzip, status_code=status, media_type=media_type, headers=headers)


def _not_modified(etag: str, retry_after: float | None = None, close: bool = False) -> Response:
    headers = {"etag": etag, "cache-control": "no-cache"}
    if retry_after:
        headers["retry-after"] = str(max(1, round(retry_after)))
    if close:
        headers["connection"] = "close"
    return Response(status_code=304, headers=headers)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (its request body, if any, is read and dropped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


_waiters_full = Throttled(log, "host_config.waiters_full")


class DirectoryWatch:
    """Wakes the hosts' long polls of /v1/host/config when their directory may have changed.

    SQLite tells no process of another's writes (the CLI writes the registry directly), so
    ONE task per worker process reads Authority.version() (PRAGMA data_version and the
    discovery generation: two cheap reads) about once a second while anyone waits, and
    set_discovered wakes the waiters at once. A wake only makes each waiter render its
    document again; it answers if its ETag moved and waits on otherwise. The waiters are
    bounded: each holds a connection, and the connection cap (httpguard) sheds new
    connections, not held ones, so unbounded waiters could lock out enrollments."""

    def __init__(
        self,
        authority: Authority,
        max_waiters: int,
        interval_s: float = WATCH_INTERVAL_S,
        blocking: Blocking | None = None,
    ) -> None:
        self.authority = authority
        self.max_waiters = max_waiters
        self.interval_s = interval_s
        self.blocking = blocking or Blocking()
        self.waiting = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # The version the waiters' renders saw. Read here, at start (before any request), and
        # after that only by the watch task, in the registry threads: a read on the event loop
        # would stall every request for a round trip (up to seconds while PostgreSQL is away).
        self._last: tuple[int, int, bytes] | None = None
        with contextlib.suppress(Exception):  # (unreadable now: the task's first read sets it)
            self._last = authority.version()
        self.closing = False  # the server stops: waiters answer now (release_long_polls)
        authority.on_discovery_change(self._from_any_thread)
        _WATCHES.add(self)

    def release(self) -> None:
        """Answer every waiter now and take no more (callable from any thread)."""
        self.closing = True
        self._from_any_thread()

    def admit(self) -> asyncio.Event | None:
        """A place among the waiters (None when full): the event to wait on. The caller must
        `leave()` and take `changed()` again before each render."""
        if self.waiting >= self.max_waiters or self.closing:
            return None
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # (a new loop: tests; uvicorn keeps one per process)
            self._loop, self._event, self._task = loop, asyncio.Event(), None
        self.waiting += 1
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="directory-watch")
        return self.changed()

    def changed(self) -> asyncio.Event:
        assert self._event is not None
        return self._event

    def leave(self) -> None:
        self.waiting -= 1

    def _fire(self, version: tuple[int, int, bytes] | None) -> None:
        if self._event is not None:
            # What the woken waiters will render: without it the poll below sees this same
            # change a second later and wakes them all again for nothing.
            if version is not None:
                self._last = version
            self._event.set()
            self._event = asyncio.Event()

    async def _read_and_fire(self) -> None:
        """A discovery change (or the server stopping): wake the waiters, with the version they
        will render read first in a registry thread (a failed read: the poll fires once more)."""
        version: tuple[int, int, bytes] | None = None
        with contextlib.suppress(Exception):
            version = await self.blocking(self.authority.version)
        self._fire(version)

    def _from_any_thread(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: loop.create_task(self._read_and_fire()))

    async def _run(self) -> None:
        """Poll while anyone waits; the next waiter starts it again."""
        first = self._last is None  # unreadable at start: this read is the baseline
        while self.waiting > 0:
            if not first:
                await asyncio.sleep(self.interval_s)
            try:
                version = await self.blocking(self.authority.version)
            except Exception as exc:  # a registry read failing: the waiters time out as usual
                log.warning("directory_watch.failed", error=str(exc)[:200])
                first = False  # (sleep before the next try; its read wakes the waiters once)
                continue
            if first:
                self._last, first = version, False
            elif version != self._last:
                self._fire(version)


_WATCHES: weakref.WeakSet[DirectoryWatch] = weakref.WeakSet()


def release_long_polls() -> None:
    """The server is stopping: parked long polls answer 304 now, rather than hold uvicorn's
    graceful shutdown to its timeout and then be cut (the host would see a 500)."""
    for watch in list(_WATCHES):
        watch.release()


class Blocking:
    """Runs the handlers' registry calls (enroll, renew, authenticate, reports, renders) in a
    pool of REGISTRY_THREADS threads, so TLS, parsing and other requests go on while a
    transaction waits; the pool's queue bounds how many wait on the database at once."""

    def __init__(self, threads: int = REGISTRY_THREADS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="registry")

    async def __call__(self, fn: Callable[..., _R], *args: Any) -> _R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class FleetMetrics:
    """The authority's own /metrics: the fleet's gauges (hosts by state, certificates expiring
    within 24 h, from every replica's shared registry) and this process's request counters
    (per process: with --workers or replicas, Prometheus sums them).

    A scrape reads every host and its last report once (health.fleet_counts, the stored rows read
    without re-validation), in a thread. Measured at 10,000 hosts on SQLite: ~0.2-0.3 s for the
    states, ~0.3 s for list_hosts, ~0.03 s for the reports. Scrapes within CACHE_S share one
    computation, so several Prometheus servers or a scrape storm cost one pass."""

    CACHE_S = 5.0

    def __init__(self, authority: Authority, blocking: Blocking) -> None:
        self.authority = authority
        self.blocking = blocking
        self.requests: dict[tuple[str, int], int] = {}
        self._lock = asyncio.Lock()
        self._cached: tuple[float, health.FleetCounts] | None = None

    def count(self, path: str, status: int) -> None:
        key = (path, status)  # paths are the routes' own (unknown paths never get here)
        self.requests[key] = self.requests.get(key, 0) + 1

    def _counts(self) -> health.FleetCounts:
        registry = self.authority.registry
        return health.fleet_counts(registry.list_hosts(), registry.reports(), self.authority.clock())

    async def counts(self) -> health.FleetCounts:
        async with self._lock:
            loop = asyncio.get_running_loop()
            # One cheap read on every scrape, so a database gone away shows at once, not after
            # the cached pass expires (it raises RegistryUnavailable).
            await self.blocking(self.authority.registry.data_version)
            if self._cached is None or loop.time() - self._cached[0] > self.CACHE_S:
                self._cached = (loop.time(), await self.blocking(self._counts))
            return self._cached[1]

    async def render(self) -> bytes:
        # The database away is what this endpoint must show, not hide behind a 503: the request
        # counters (refusals included) and registry_up 0, without host gauges it cannot know.
        try:
            counts: health.FleetCounts | None = await self.counts()
        except RegistryUnavailable as exc:
            counts = None
            _registry_down.warning("down", asyncio.get_running_loop().time(), reason=exc.message)
        lines = [
            "# HELP meshagent_authority_registry_up 1 when the fleet's state could be read from the "
            "registry.",
            "# TYPE meshagent_authority_registry_up gauge",
            f"meshagent_authority_registry_up {0 if counts is None else 1}",
        ]
        if counts is not None:
            lines += [
                "# HELP meshagent_authority_hosts Enrolled hosts by state (authority hosts' health column).",
                "# TYPE meshagent_authority_hosts gauge",
                *(f'meshagent_authority_hosts{{state="{s}"}} {n}' for s, n in counts.hosts.items()),
                "# HELP meshagent_authority_certificates_expiring_24h Unrevoked host certificates that "
                "expire within 24 hours.",
                "# TYPE meshagent_authority_certificates_expiring_24h gauge",
                f"meshagent_authority_certificates_expiring_24h {counts.expiring_24h}",
            ]
        lines += [
            "# HELP meshagent_authority_requests_total API requests answered by this process, by "
            "path and status.",
            "# TYPE meshagent_authority_requests_total counter",
            *(
                f'meshagent_authority_requests_total{{path="{p}",status="{c}"}} {n}'
                for (p, c), n in sorted(self.requests.items())
            ),
        ]
        return ("\n".join(lines) + "\n").encode()


_registry_down = Throttled(log, "metrics.registry_unavailable")


def default_max_waiters() -> int:
    """Three quarters of the connection cap: the rest stays for enrollments and renewals."""
    return max(1, current_limits().max_connections * 3 // 4)


def create_app(authority: Authority, max_waiters: int | None = None) -> Contained:
    blocking = Blocking()
    waiters = default_max_waiters() if max_waiters is None else max_waiters
    # The watch's own thread: its version read (the wake-up of every long poll) must not queue
    # behind a thousand woken waiters' renders in the handlers' pool.
    watch = DirectoryWatch(authority, waiters, blocking=Blocking(threads=1))
    fleet = FleetMetrics(authority, blocking)
    Handler = Callable[[Request], Awaitable[Response]]

    def refusals(handler: Handler, route: str | None = None) -> Handler:
        """`handler` with its refusals as JSON errors, counted by `route` (the path template:
        counting /v1/catalog/hosts/{host_id} per id would let any client grow /metrics)."""

        async def wrapped(request: Request) -> Response:
            response = await _answer(request)
            fleet.count(route or request.url.path, response.status_code)
            return response

        async def _answer(request: Request) -> Response:
            try:
                return await handler(request)
            except MeshagentError as exc:
                log.info(
                    "request.refused",
                    path=request.url.path,
                    code=exc.code,
                    reason=exc.message,
                    client=request.client.host if request.client else "",
                )
                return error(exc.code, exc.message, exc.hint)
            except Exception as exc:  # the one place an unforeseen failure stops
                return _crashed(request.url.path, exc)

        return wrapped

    @refusals
    async def info(request: Request) -> Response:
        s = authority.material.settings
        return JSONResponse(
            {
                "version": __version__,
                "trust_domain": s.trust_domain,
                "mesh": s.mesh,
                "api_ca": authority.material.api_ca_cert.public_bytes(Encoding.PEM).decode(),
                "ca_pin": authority.ca_pin,
                "server_time": authority.clock().timestamp(),
            }
        )

    @refusals
    async def enroll(request: Request) -> Response:
        doc = await _body(request, {"token_secret": str, "csr": str, "host_name": str, "addresses": list})
        # Passed whole: the service refuses a bad name or address (invalid_request); trimming
        # or filtering here would store something other than what the host asked for.
        result = await blocking(
            authority.enroll, doc["token_secret"], doc["csr"], doc["host_name"], doc["addresses"]
        )
        return JSONResponse(_issued(authority, result))

    @refusals
    async def renew(request: Request) -> Response:
        doc = await _body(request, {"certificate_chain": str, "csr": str, "timestamp": int, "signature": str})
        result = await blocking(
            authority.renew, doc["certificate_chain"], doc["csr"], doc["timestamp"], doc["signature"]
        )
        return JSONResponse(_issued(authority, result))

    @refusals
    async def host_config(request: Request) -> Response:
        """The host's directory; with If-None-Match and ?wait=N, a long poll: 304 when it did
        not change within N s, the new document as soon as it does."""
        bearer = _bearer(request)
        await blocking(authority.authenticate, bearer)  # (refused before the wait is parsed)
        wait = _wait_s(request.query_params.get("wait"))
        tags = request.headers.get("if-none-match")
        # 10,000 hosts' directory: 1.9 MB, 121 KB gzipped (the shared parts compressed once).
        gzip = _accepts_gzip(request.headers.get("accept-encoding"))
        # A client that holds a version this replica still has gets what changed (RFC 3229).
        base = _delta_base(request.headers.get("a-im"), request.headers.get(wire.BASE_HEADER), tags)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        event = watch.admit() if wait > 0 and tags else None
        gone: asyncio.Future[None] | None = None
        try:
            while True:
                # Authenticated again after each wait: a host revoked meanwhile gets its 403.
                rendered = await blocking(_render_for, authority, bearer, gzip, base)
                if not _matches(tags, rendered.etag):
                    return _config_response(rendered, tags)
                remaining = deadline - loop.time()
                if watch.closing:
                    return _not_modified(rendered.etag, retry_after=1, close=True)
                if event is None or remaining <= 0:
                    if wait > 0 and event is None:
                        _waiters_full.warning("full", loop.time(), max_waiters=watch.max_waiters)
                        return _not_modified(rendered.etag, retry_after=wait)  # (not a hot loop)
                    return _not_modified(rendered.etag)
                gone = gone or asyncio.ensure_future(_disconnected(request.receive))
                change = asyncio.ensure_future(event.wait())
                either: set[asyncio.Future[Any]] = {change, gone}
                await asyncio.wait(either, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                if gone.done():
                    return _not_modified(rendered.etag)  # (nobody reads it)
                event = watch.changed()
        finally:
            if gone is not None:
                gone.cancel()
            if event is not None:
                watch.leave()

    @refusals
    async def host_report(request: Request) -> Response:
        """An agent's health report (agent/authority/health.py checks it)."""
        host = await blocking(authority.authenticate, _bearer(request))
        doc = await _json_body(request)
        await blocking(authority.record_report, host, doc)
        return Response(status_code=204)

    @refusals
    async def prometheus_targets(request: Request) -> Response:
        discovery.authorize(authority.material.directory, request.headers.get("authorization", ""))
        port = _port(request.query_params.get("port", "4191"))
        return JSONResponse(await blocking(authority.prometheus_targets, port))

    @refusals
    async def metrics(request: Request) -> Response:
        """The fleet's gauges and this process's request counters, for the holder of the
        Prometheus discovery token (host counts by state are not for every host to read)."""
        discovery.authorize(authority.material.directory, request.headers.get("authorization", ""))
        body = await fleet.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def trust_bundle(request: Request) -> Response:
        return JSONResponse({"trust_bundle": authority.trust_bundle.pem().decode()})

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error(
            code,
            f"{request.method} {request.url.path}: {exc.detail}",
            "see /v1/openapi.json for the API",
        )

    app = Starlette(
        routes=[
            Route("/v1/authority", info, methods=["GET"]),
            Route("/v1/enroll", enroll, methods=["POST"]),
            Route("/v1/renew", renew, methods=["POST"]),
            Route("/v1/host/config", host_config, methods=["GET"]),
            Route("/v1/host/report", host_report, methods=["POST"]),
            Route("/v1/trust-bundle", trust_bundle, methods=["GET"]),
            Route("/v1/prometheus/targets", prometheus_targets, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/openapi.json", openapi, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
            # The service catalog (#20): its JSON under /v1/catalog, its pages under /catalog.
            *CatalogWeb(authority, blocking, refusals).routes(),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.directory_watch = watch  # (for tests and diagnostics)
    return Contained(app)


def _render_for(
    authority: Authority, bearer: str, gzip: bool = False, delta_base: str | None = None
) -> RenderedConfig:
    return authority.render_host_config(authority.authenticate(bearer), gzip, delta_base)


def _port(text: str) -> int:
    """A TCP port from a query parameter: digits only (int() would take " 1_0"), 1..65535."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise RejectedError(
            f"port {text[:20]!r} is not a TCP port",
            "give ?port= a number from 1 to 65535 (the agents' admin port, 4191 by default)",
            code="invalid_request",
        )
    return int(text)


def _crashed(path: str, exc: BaseException) -> JSONResponse:
    # One structured line: the type and message say which bug; a traceback per request would
    # let any client fill the log with 4 KB a request.
    log.error("request.failed", path=path, error_type=type(exc).__name__, error=str(exc)[:200])
    return error("internal", "the authority failed to handle the request", "see the authority's log")


class Contained:
    """The outermost ASGI layer: whatever escapes the app becomes a JSON 500 (when no response
    has started) and one log line, never an exception for uvicorn to print with its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # see the class docstring
            response = _crashed(scope.get("path", ""), exc)
            if not started:
                await response(scope, receive, send)
