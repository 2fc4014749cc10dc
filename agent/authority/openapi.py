"""The OpenAPI 3.1 description of the authority's `/v1/` API, served at /v1/openapi.json."""

from __future__ import annotations

from typing import Any

from agent import __version__

_ERROR = {
    "description": "Refused: a stable `code`, a human `message`, and a `hint` saying what to do.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}

_ISSUED = {
    "description": "The host's certificate chain (leaf first) and the mesh trust bundle.",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Issued"}}},
}

# Any request body: `invalid_request` (not a JSON object of the documented fields, nested too
# deep, a string that is not UTF-8, an integer beyond 2**53), `body_too_large` (over 64 KiB,
# refused by Content-Length before any of it is read, or when a streamed body passes it; the
# connection is then closed).
_BAD_BODY = {
    "400": _ERROR,
    "408": {**_ERROR, "description": "request_timeout: the body did not arrive in time (10 s by default)."},
    "413": {**_ERROR, "description": "body_too_large: the body is over 64 KiB (65536 bytes)."},
}

# Any request: `invalid_request` when it is not HTTP/1.1, `head_too_large` past 32 KiB of
# request line and headers, `internal` when the authority fails unforeseen (logged as one line,
# no details to the client).
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}

_ALWAYS = {
    "431": {**_ERROR, "description": "head_too_large: request line and headers over 32 KiB."},
    "500": {**_ERROR, "description": "internal: the authority failed; its log says why."},
}


_CATALOG_AUTH = (
    "Needs Authorization: Bearer <the discovery token> (as /v1/prometheus/targets), or the cookie the "
    "catalog's login form sets."
)
_CATALOG_PAGE = (
    "Server-rendered HTML for people, read-only. Needs the discovery token as a bearer header or the "
    "cookie POST /catalog/login sets; without either, 401 and the login form. Sent with a strict "
    "Content-Security-Policy (default-src 'self'), X-Content-Type-Options: nosniff and "
    "Cache-Control: no-store; its stylesheet and script are /catalog/static/*."
)


def _json_body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "meshagent authority",
        "version": __version__,
        "description": (
            "Enrolls hosts into the mesh: join tokens for certificates, renewal by proof of possession. "
            "Bounds: bodies up to 64 KiB, request line and headers up to 32 KiB; a client has 10 s "
            "(by default) for the TLS handshake and each request head, 10 s for a body, and an "
            "idle connection is closed after 5 s. Every error is JSON {code, message, hint}."
        ),
    },
    "paths": {
        "/v1/authority": {
            "get": {
                "summary": "The authority's trust domain, its API CA (checked against a token's pin), clock",
                "responses": {
                    "200": {
                        "description": "Authority info",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/AuthorityInfo"}}
                        },
                    },
                    **_ALWAYS,
                },
            }
        },
        "/v1/enroll": {
            "post": {
                "summary": "Exchange a single-use join token and a CSR for a certificate",
                "requestBody": _json_body("EnrollRequest"),
                "responses": {"200": _ISSUED, **_BAD_BODY, "401": _ERROR, "403": _ERROR, **_ALWAYS},
            }
        },
        "/v1/renew": {
            "post": {
                "summary": "Renew with proof of possession of the current key (never the join token)",
                "requestBody": _json_body("RenewRequest"),
                "responses": {"200": _ISSUED, **_BAD_BODY, "403": _ERROR, **_ALWAYS},
            }
        },
        "/v1/host/config": {
            "get": {
                "summary": "This host's directory: the catalog, its authorization policy, the in-cluster "
                "Services; a long poll with ?wait and If-None-Match",
                "description": "Authorization: Bearer <api_token>, the host token returned with every "
                "certificate (enroll and renew); a renewal supersedes the previous one. The ETag is the "
                "sha256 of the document's canonical JSON (sorted keys, no spaces, ASCII) without "
                "generated_at. Long poll: send it back as If-None-Match with ?wait=N: the answer is the "
                "new document as soon as it changes (a registry write by any process, new discovery "
                "results, a trust bundle edit; noticed within about a second), or 304 after N seconds. "
                "Waiting requests are bounded per worker; past the bound the answer comes at once with "
                "Retry-After: poll again no sooner. Deltas (RFC 3229): a host holding a document sends "
                "A-IM: meshagent-delta, its ETag in If-None-Match and its Meshagent-Directory-Version in "
                "Meshagent-Delta-Base; when the authority still holds that version it answers 226 with "
                "what changed ({base, version, set, remove, splice}; agent/identity/delta.py), otherwise "
                "the whole document as a 200. The client checks the rebuilt document's sha256 against "
                "the new ETag and fetches in full on a mismatch.",
                "parameters": [
                    {
                        "name": "wait",
                        "in": "query",
                        "description": "seconds to hold the request while the directory is the one "
                        "If-None-Match names (0: answer at once)",
                        "schema": {"type": "number", "minimum": 0, "maximum": 60, "default": 0},
                    },
                    {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    {
                        "name": "A-IM",
                        "in": "header",
                        "description": "meshagent-delta: answer with a delta when the base is known",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "Meshagent-Delta-Base",
                        "in": "header",
                        "description": "the Meshagent-Directory-Version of the document held",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "catalog, policy, trust bundle, services",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            "Meshagent-Directory-Version": {"schema": {"type": "string"}},
                        },
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/HostConfig"}}
                        },
                    },
                    "226": {
                        "description": "IM Used: the changes since the version Meshagent-Delta-Base names",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            "IM": {"schema": {"type": "string"}},
                            "Delta-Base": {"schema": {"type": "string"}},
                            "Meshagent-Directory-Version": {"schema": {"type": "string"}},
                        },
                        "content": {
                            "application/vnd.meshagent.directory-delta+json": {"schema": {"type": "object"}}
                        },
                    },
                    "304": {
                        "description": "Not modified: still the document If-None-Match names (after "
                        "waiting, or at once with Retry-After when the authority's waiters are full)",
                        "headers": {
                            "ETag": {"schema": {"type": "string"}},
                            "Retry-After": {"schema": {"type": "integer"}},
                        },
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "403": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/v1/host/report": {
            "post": {
                "summary": "This host's health report: agent readiness and its app probes",
                "description": "Authorization: Bearer <api_token>, as /v1/host/config. The last report "
                "decides the host's Ready condition (Kubernetes export and controller, `authority hosts`).",
                "requestBody": _json_body("HostReport"),
                "responses": {
                    "204": {"description": "stored"},
                    **_BAD_BODY,
                    "401": _ERROR,
                    "403": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/v1/prometheus/targets": {
            "get": {
                "summary": "Prometheus http_sd_configs: every enrolled, unrevoked host's metrics endpoint",
                "description": "Needs Authorization: Bearer <the token in the authority directory's "
                "prometheus-token file> (meshagent authority prometheus-token).",
                "parameters": [
                    {
                        "name": "port",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 4191},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "[{targets: [host:port], labels: "
                        "{namespace, serviceaccount, identity, host, host_id, deployment, pod}}]",
                        "content": {"application/json": {"schema": {"type": "array"}}},
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/v1/catalog": {
            "get": {
                "summary": "The service catalog's fleet: each host's owner, tier, state, SLO status, lowest "
                "budget left and last change, and the dependency graph (nodes, edges) from Prometheus",
                "description": _CATALOG_AUTH + " The same document as `meshagent authority catalog show "
                "--json`. When Prometheus is unset or does not answer, `prometheus_error` says why and "
                "edges and budgets are empty; the registry's facts are still there.",
                "responses": {
                    "200": {
                        "description": "{hosts: [{host, owner_team, tier, system, state, slo_status, "
                        "budget_remaining, budgets, last_change}], nodes: [{identity, hosts}], edges: "
                        "[{src, dst, src_host, dst_host, requests, rps, success_rate, p99_ms}], "
                        "prometheus_error}",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "503": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/v1/catalog/hosts/{host_id}": {
            "get": {
                "summary": "One host's card: metadata, state, SLO budgets, edges in and out, recent changes",
                "description": _CATALOG_AUTH + " The same document as `meshagent authority catalog show "
                "HOST --json`; `host_id` is the host's id, or its name when one unrevoked host has it.",
                "parameters": [
                    {"name": "host_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "{host, meta, state, state_text, slo_status, budgets: [{slo, sli, "
                        "remaining, burn_1h, burn_6h, exhaustion_s, status}], edges_in, edges_out, changes: "
                        "[{id, at, kind, detail, actor}], prometheus_error}",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": {
                        **_ERROR,
                        "description": "host_ambiguous: several unrevoked hosts have that name",
                    },
                    "401": _ERROR,
                    "404": {**_ERROR, "description": "not_found: no host with that id or name"},
                    "503": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/catalog": {
            "get": {
                "summary": "The service catalog's page (HTML): the fleet as a list and as a dependency graph",
                "description": _CATALOG_PAGE,
                "responses": {"200": {"description": "text/html"}, "401": {"description": "the login form"}},
            }
        },
        "/catalog/hosts/{host_id}": {
            "get": {
                "summary": "A host's page (HTML): its card, edges, budget burn chart and changes",
                "description": _CATALOG_PAGE,
                "parameters": [
                    {"name": "host_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "text/html"},
                    "401": {"description": "the login form"},
                    "404": {"description": "no such host (an HTML page)"},
                },
            }
        },
        "/catalog/login": {
            "get": {"summary": "The login form (HTML)", "responses": {"200": {"description": "text/html"}}},
            "post": {
                "summary": "Log in to the catalog's pages with the discovery token",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {
                                    "token": {"type": "string"},
                                    "next": {"type": "string", "description": "a /catalog path"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "303": {
                        "description": "Logged in: Set-Cookie meshagent_catalog (HttpOnly; Secure; "
                        "SameSite=Strict; 12 h), to `next`"
                    },
                    "401": {"description": "not the discovery token: the form again"},
                    "404": {"description": "the authority has no discovery token"},
                },
            },
        },
        "/catalog/logout": {
            "post": {
                "summary": "Forget the catalog's cookie",
                "responses": {"303": {"description": "to the login form"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "The fleet's gauges and this process's request counters (Prometheus text)",
                "description": "Needs Authorization: Bearer <the discovery token>, as /v1/prometheus/targets",
                "responses": {
                    "200": {"description": "text/plain; version=0.0.4"},
                    "401": _ERROR,
                    "404": _ERROR,
                    **_ALWAYS,
                },
            }
        },
        "/v1/trust-bundle": {
            "get": {
                "summary": "The current mesh trust bundle (one or more roots)",
                "responses": {
                    "200": {
                        "description": "PEM bundle",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"trust_bundle": {"type": "string"}},
                                }
                            }
                        },
                    },
                    **_ALWAYS,
                },
            }
        },
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "examples": [
                            "invalid_request",
                            "token_used",
                            "token_expired",
                            "host_revoked",
                            "body_too_large",
                            "request_timeout",
                            "head_too_large",
                            "internal",
                        ],
                    },
                    "message": {"type": "string"},
                    "hint": {"type": "string"},
                },
            },
            "AuthorityInfo": {
                "type": "object",
                "properties": {
                    "version": {"type": "string"},
                    "trust_domain": {"type": "string"},
                    "mesh": {"type": "string"},
                    "api_ca": {
                        "type": "string",
                        "description": "PEM of the API CA; its SPKI sha256 is the token's pin",
                    },
                    "ca_pin": {"type": "string"},
                    "server_time": {
                        "type": "number",
                        "description": "Unix time, for clock-skew checks",
                    },
                },
            },
            "EnrollRequest": {
                "type": "object",
                "required": ["token_secret", "csr", "host_name", "addresses"],
                "properties": {
                    "token_secret": {
                        "type": "string",
                        "description": "The secret part of the join token",
                    },
                    "csr": {
                        "type": "string",
                        "description": "PEM CSR for an ECDSA P-256 key made on the host",
                    },
                    "host_name": {"type": "string"},
                    "addresses": {"type": "array", "items": {"type": "string"}},
                },
            },
            "RenewRequest": {
                "type": "object",
                "required": ["certificate_chain", "csr", "timestamp", "signature"],
                "properties": {
                    "certificate_chain": {
                        "type": "string",
                        "description": "The current certificate (PEM, leaf first)",
                    },
                    "csr": {"type": "string", "description": "PEM CSR for the new key"},
                    "timestamp": {"type": "integer", "description": "Unix time of the request"},
                    "signature": {
                        "type": "string",
                        "description": "base64 ECDSA-SHA256 by the current key over "
                        "'meshagent-renew-v1\\n' + timestamp + '\\n' + sha256(csr)",
                    },
                },
            },
            "Issued": {
                "type": "object",
                "properties": {
                    "host_id": {"type": "string"},
                    "spiffe_id": {"type": "string"},
                    "dns_name": {"type": "string"},
                    "certificate_chain": {"type": "string"},
                    "trust_bundle": {"type": "string"},
                    "not_after": {"type": "string", "format": "date-time"},
                    "server_time": {"type": "number"},
                    "api_token": {"type": "string", "description": "Bearer token for /v1/host/config"},
                },
            },
            "HostConfig": {
                "type": "object",
                "required": ["host_id", "catalog", "policy", "trust_bundle", "generated_at", "services"],
                "properties": {
                    "host_id": {"type": "string"},
                    "catalog": {"type": "array", "items": {"$ref": "#/components/schemas/CatalogEntry"}},
                    "services": {
                        "type": "array",
                        "description": "In-cluster Services discovered by the controller (empty without "
                        "one); hand-written catalog entries and enrolled hosts win over them",
                        "items": {"$ref": "#/components/schemas/Service"},
                    },
                    "policy": {
                        "type": "object",
                        "description": "{default: {default, allow}, ports: {PORT: {default, allow}}}",
                    },
                    "trust_bundle": {"type": "string", "description": "PEM, one or more roots"},
                    "discovery": {"$ref": "#/components/schemas/DiscoveryState"},
                    "routes": {
                        "type": "array",
                        "description": "Traffic policy for outbound HTTP (#21): one item per parent port "
                        "(a Service or the hosts of an identity) with its routes, compiled from the "
                        "operator's HTTPRoute/TrafficSplit/ServiceProfile objects; the same for every "
                        "host. Absent: keep the routes held (an authority from before #21, or discovery "
                        "not answered yet); []: none. A change is sent whole in a delta's `set`.",
                        "items": {"$ref": "#/components/schemas/RouteParent"},
                    },
                    "revoked": {
                        "type": "array",
                        "description": "Revoked hosts whose certificates have not expired: agents refuse "
                        "and cut connections with them (by serial; by identity once no unrevoked host "
                        "holds it)",
                        "items": {
                            "type": "object",
                            "required": ["host_id", "serials", "addresses", "revoked_at"],
                            "properties": {
                                "host_id": {"type": "string"},
                                "serials": {"type": "array", "items": {"type": "string"}},
                                "addresses": {"type": "array", "items": {"type": "string"}},
                                "identity": {"type": "string"},
                                "revoked_at": {"type": "string", "format": "date-time"},
                            },
                        },
                    },
                    "generated_at": {"type": "number", "description": "Unix time"},
                },
            },
            "DiscoveryState": {
                "type": "object",
                "description": "Only when the authority runs its Kubernetes controller with discovery: "
                "whether `services` is current (ok) or the last known Services kept while the "
                "Kubernetes API is unreachable. Changes (and the ETag with it) only on a transition.",
                "required": ["source", "state", "since", "updated_at"],
                "properties": {
                    "source": {"type": "string", "enum": ["kubernetes"]},
                    "state": {"type": "string", "enum": ["ok", "unreachable"]},
                    "since": {
                        "type": ["number", "null"],
                        "description": "Unix time the API became unreachable; null when ok",
                    },
                    "updated_at": {
                        "type": ["number", "null"],
                        "description": "Unix time the served Services last changed; null: none yet",
                    },
                },
            },
            "Service": {
                "type": "object",
                "required": ["name", "namespace", "cluster_ips", "ports", "endpoints"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "cluster_ips": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {"type": "string"},
                        "description": "at most one IPv4 and one IPv6; empty: headless",
                    },
                    "ports": {
                        "type": "array",
                        "description": "the Service's TCP ports",
                        "items": {
                            "type": "object",
                            "required": ["port", "name", "protocol", "opaque"],
                            "properties": {
                                "port": _PORT,
                                "name": {"type": "string"},
                                "protocol": {"const": "TCP"},
                                "opaque": {
                                    "type": "boolean",
                                    "description": "config.linkerd.io/opaque-ports: dial the endpoint's "
                                    "proxy_port with Linkerd's transport header",
                                },
                            },
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "description": "ready endpoints only",
                        "items": {"$ref": "#/components/schemas/ServiceEndpoint"},
                    },
                },
            },
            "ServiceEndpoint": {
                "type": "object",
                "required": ["address", "ports", "identity", "server_name", "proxy_port", "source"],
                "properties": {
                    "address": {"type": "string"},
                    "ports": {
                        "type": "object",
                        "description": "Service port (as a string) -> this endpoint's target port",
                        "additionalProperties": _PORT,
                    },
                    "identity": {
                        "type": ["string", "null"],
                        "description": "SPIFFE ID; null: not meshed (served without TLS)",
                    },
                    "server_name": {"type": ["string", "null"], "description": "SNI; null with identity"},
                    "proxy_port": {
                        "oneOf": [_PORT, {"type": "null"}],
                        "description": "the endpoint's inbound proxy port",
                    },
                    "source": {
                        "type": "string",
                        "description": "pod:NS/NAME, externalworkload:NS/NAME or endpointslice:NS/NAME",
                    },
                },
            },
            "HostReport": {
                "type": "object",
                "description": "Checked by agent/authority/health.py parse_report (bounded strings and "
                "lists, finite times); refused whole with invalid_request naming the field",
                "required": ["agent_version", "ready", "reason", "refresh_interval_s"],
                "properties": {
                    "agent_version": {"type": "string"},
                    "ready": {"type": "boolean"},
                    "reason": {"type": "string"},
                    "directory_updated_at": {"type": ["number", "null"]},
                    "refresh_interval_s": {"type": "number"},
                    "probes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": _PORT,
                                "kind": {"enum": ["tcp", "http", "exec"]},
                                "ok": {"type": "boolean"},
                                "detail": {"type": "string"},
                                "since": {"type": "number"},
                            },
                        },
                    },
                    "certificate": {
                        "type": ["object", "null"],
                        "required": ["serial", "not_after"],
                        "properties": {
                            "serial": {"type": "string", "pattern": "^[0-9a-fA-F]{1,64}$"},
                            "not_after": {"type": "number"},
                            "renewal_error": {"type": "string", "maxLength": 1000},
                        },
                    },
                    "interception": {
                        "type": ["object", "null"],
                        "required": ["applied", "backend"],
                        "properties": {
                            "applied": {"type": "boolean"},
                            "backend": {"type": "string", "maxLength": 32},
                        },
                    },
                    "listeners": {
                        "type": ["object", "null"],
                        "maxProperties": 8,
                        "additionalProperties": {"type": "string", "maxLength": 64},
                    },
                    "last_error": {"type": "string", "maxLength": 1000},
                    "addresses": {
                        "type": "array",
                        "maxItems": 64,
                        "items": {"type": "string", "description": "IP address"},
                    },
                },
            },
            "RouteRef": {
                "type": "object",
                "description": "A policy object's or backend's reference (Linkerd's metric labels)",
                "required": ["group", "kind", "namespace", "name"],
                "properties": {
                    "group": {
                        "type": "string",
                        "examples": ["", "meshagent.io", "gateway.networking.k8s.io"],
                    },
                    "kind": {"type": "string", "examples": ["Service", "Host", "HTTPRoute", "default"]},
                    "namespace": {"type": "string"},
                    "name": {"type": "string"},
                    "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
                    "section": {"type": "string"},
                },
            },
            "RouteParent": {
                "type": "object",
                "description": "The policy of one parent port: a Service (matched by its cluster IPs, "
                "from `services`) or the enrolled hosts of an identity (matched by `addresses`)",
                "required": ["parent", "budget", "sources", "routes"],
                "properties": {
                    "parent": {
                        "allOf": [{"$ref": "#/components/schemas/RouteRef"}],
                        "properties": {"addresses": {"type": "array", "items": {"type": "string"}}},
                    },
                    "budget": {
                        "type": "object",
                        "description": "retry budget per parent (ServiceProfile retryBudget)",
                        "required": ["ratio", "min_per_s", "ttl_s"],
                        "properties": {
                            "ratio": {"type": "number", "minimum": 0},
                            "min_per_s": {"type": "number", "minimum": 0},
                            "ttl_s": {"type": "number", "exclusiveMinimum": 0},
                        },
                    },
                    "sources": {"type": "array", "items": {"type": "string"}, "description": "Kind ns/name"},
                    "routes": {
                        "type": "array",
                        "items": {
                            "allOf": [{"$ref": "#/components/schemas/RouteRef"}],
                            "required": ["rules"],
                            "properties": {
                                "created": {"type": "number", "description": "precedence ties, Unix time"},
                                "rules": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/RouteRule"},
                                },
                            },
                        },
                    },
                },
            },
            "RouteRule": {
                "type": "object",
                "required": ["matches", "backends"],
                "properties": {
                    "matches": {
                        "type": "array",
                        "description": "any one matches (Gateway API precedence); empty: every request",
                        "items": {
                            "type": "object",
                            "properties": {
                                "path": {"type": ["object", "null"], "required": ["type", "value"]},
                                "method": {"type": ["string", "null"], "description": "null: any"},
                                "headers": {"type": "array", "items": {"type": "object"}},
                                "query": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    },
                    "backends": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["weight", "ref"],
                            "properties": {
                                "weight": {"type": "integer", "minimum": 0},
                                "ref": {"$ref": "#/components/schemas/RouteRef"},
                                "endpoints": {
                                    "type": "array",
                                    "description": "Host backends only: the identity's unrevoked hosts "
                                    "(Service backends take theirs from `services`)",
                                    "items": {
                                        "type": "object",
                                        "required": ["address", "port", "identity", "server_name"],
                                        "properties": {
                                            "address": {"type": "string"},
                                            "port": _PORT,
                                            "identity": {"type": ["string", "null"]},
                                            "server_name": {"type": ["string", "null"]},
                                        },
                                    },
                                },
                                "accrual": {
                                    "type": ["object", "null"],
                                    "description": "consecutive-failures breaker; null: off",
                                },
                            },
                        },
                    },
                    "timeouts": {
                        "type": ["object", "null"],
                        "description": "request_ms, response_ms, idle_ms, attempt_ms, backend_request_ms "
                        "(null: none)",
                    },
                    "retry": {
                        "type": ["object", "null"],
                        "description": "limit, http [[lo, hi]], grpc [codes], backoff_min_ms, "
                        "backoff_max_ms, jitter, max_request_bytes; null: no retries",
                    },
                },
            },
            "CatalogEntry": {
                "type": "object",
                "description": "Connections to cidr (and ports) must reach a server proving identity",
                "required": ["cidr", "ports", "identity", "server_name"],
                "properties": {
                    "cidr": {"type": "string", "examples": ["10.96.0.0/12", "198.18.0.10/32"]},
                    "ports": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "description": "empty: every port",
                    },
                    "identity": {"type": "string", "description": "SPIFFE ID"},
                    "server_name": {"type": "string", "description": "SNI; the certificate's DNS SAN"},
                    "opaque_port": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 65535,
                        "description": "Present when the destination's linkerd2-proxy expects Linkerd's "
                        "transport header on this port: dial it with ALPN transport.l5d.io/v1 and "
                        "name the original port in the header",
                    },
                    "source": {"type": "string", "description": "host:<id> or static:<id>"},
                },
            },
        }
    },
}
