"""The authority's HTTPS API (`/v1/`), on Starlette: thin handlers over `service.Authority`.

Errors are JSON `{"code", "message", "hint"}` with a stable `code`; the OpenAPI description is
served at `/v1/openapi.json`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import __version__
from agent.errors import MeshagentError, RejectedError
from agent.logs import get_logger

from . import discovery
from .openapi import OPENAPI
from .service import Authority, EnrollResult

log = get_logger("meshagent.authority.api")

MAX_BODY = 64 * 1024

# HTTP status per refusal code; anything unlisted is a 400.
STATUS = {
    "token_unknown": 401,
    "unauthenticated": 401,
    "token_used": 403,
    "token_expired": 403,
    "host_revoked": 403,
    "host_unknown": 403,
    "stale_certificate": 403,
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


def error(code: str, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse({"code": code, "message": message, "hint": hint}, status_code=STATUS.get(code, 400))


async def _body(request: Request, fields: dict[str, type]) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise RejectedError(f"request body over {MAX_BODY} bytes", code="body_too_large")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RejectedError("request body is not JSON", code="invalid_request") from None
    if not isinstance(doc, dict):
        raise RejectedError("request body must be a JSON object", code="invalid_request")
    for name, kind in fields.items():
        if not isinstance(doc.get(name), kind):
            raise RejectedError(f"field {name!r} is missing or not a {kind.__name__}", code="invalid_request")
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


def create_app(authority: Authority) -> Starlette:
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
        addresses = [a for a in doc["addresses"] if isinstance(a, str)][:64]
        result = authority.enroll(doc["token_secret"], doc["csr"], doc["host_name"][:253], addresses)
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
        try:
            port = int(request.query_params.get("port", "4191"))
        except ValueError:
            raise RejectedError("port must be a number", code="invalid_request") from None
        return JSONResponse(authority.prometheus_targets(port))

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

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("request.crashed", path=request.url.path, error=repr(exc))
        return error("internal", "the authority failed to handle the request", "see the authority's log")

    return Starlette(
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
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
