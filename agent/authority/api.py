"""The authority's HTTPS API (`/v1/`), on Starlette: thin handlers over `service.Authority`.

Errors are JSON `{"code", "message", "hint"}` with a stable `code`; the OpenAPI description is
served at `/v1/openapi.json`. Nothing a client sends reaches uvicorn as an exception: bad input
is a 400, anything unforeseen a JSON 500 and one log line (never a traceback per request).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.errors import MeshagentError, RejectedError
from agent.logs import get_logger

from . import discovery
from .openapi import OPENAPI
from .service import Authority, EnrollResult

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
}

_API_HINT = "see /v1/openapi.json for the API"


def error(code: str, message: str, hint: str = "") -> JSONResponse:
    doc = {"code": code, "message": message, "hint": hint}
    response = JSONResponse(doc, status_code=STATUS.get(code, 400))
    if code == "body_too_large":
        # The rest of the body is never read: close rather than parse it to find the next request.
        response.headers["connection"] = "close"
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


async def _body(request: Request, fields: dict[str, type]) -> dict[str, Any]:
    raw = await _read_body(request)
    try:
        doc = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise RejectedError("request body is not JSON", _API_HINT, code="invalid_request") from None
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


def create_app(authority: Authority) -> Contained:
    Handler = Callable[[Request], Awaitable[Response]]

    def refusals(handler: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
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
        result = authority.enroll(doc["token_secret"], doc["csr"], doc["host_name"], doc["addresses"])
        return JSONResponse(_issued(authority, result))

    @refusals
    async def renew(request: Request) -> Response:
        doc = await _body(request, {"certificate_chain": str, "csr": str, "timestamp": int, "signature": str})
        result = authority.renew(doc["certificate_chain"], doc["csr"], doc["timestamp"], doc["signature"])
        return JSONResponse(_issued(authority, result))

    @refusals
    async def host_config(request: Request) -> Response:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not bearer:
            raise RejectedError(
                "this endpoint needs Authorization: Bearer <the host token issued with its certificate>",
                code="unauthenticated",
            )
        host = authority.authenticate(bearer.strip())
        return JSONResponse(authority.host_config(host))

    @refusals
    async def prometheus_targets(request: Request) -> Response:
        discovery.authorize(authority.material.directory, request.headers.get("authorization", ""))
        return JSONResponse(authority.prometheus_targets(_port(request.query_params.get("port", "4191"))))

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
            Route("/v1/trust-bundle", trust_bundle, methods=["GET"]),
            Route("/v1/prometheus/targets", prometheus_targets, methods=["GET"]),
            Route("/v1/openapi.json", openapi, methods=["GET"]),
            Route("/healthz", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    return Contained(app)


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
