"""Route policy for the host's outbound HTTP: the directory's `routes` member as a model, the
per-request rule match and the weighted backend pick. Pure: no I/O, no clock.

Wire form: design-21 §3.3 (one item per parent port). Parsing is entry by entry, as the rest of
the directory: a bad parent item, route, rule, match or backend is left out and handed to
`reject` with a path such as `routes[3].routes[0].rules[2].backends[1]`; every valid one still
applies. Nothing here raises on bad input.

Matching follows Gateway API precedence (design-21 §4.4), flattened at parse time into one
list of candidates per parent, best first, so a request walks the list until one matches.
Picking follows Linkerd's `RandomAvailable` (linkerd2-proxy `linkerd/distribute/src/service/
random.rs`): a random draw by weight; a drawn backend that is not available is left out and
the draw repeated over the rest, so a dead backend's share moves to the live ones.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

from agent.errors import ConfigError
from agent.telemetry.metrics import escape

from .catalog import CatalogEntry
from .services import Reject, ServiceTable

MAX_WEIGHT: Final = 1_000_000  # Gateway's bound on backendRefs[].weight
MAX_REGEX: Final = 1024  # characters of one regular expression (compiled once per directory)
MAX_MILLIS: Final = 2**53  # any finite duration on the wire (floats are exact up to here)


# --- model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A parent, route or backend as Linkerd labels it (`parent_*`, `route_*`, `backend_*`)."""

    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section: str = ""

    def labels(self, scope: str) -> str:
        """`scope_group="",scope_kind="Service",...` in Linkerd's order; routes carry no port
        nor section (`route_group, route_kind, route_namespace, route_name`)."""
        pairs = [
            ("group", self.group),
            ("kind", self.kind),
            ("namespace", self.namespace),
            ("name", self.name),
        ]
        if scope != "route":
            pairs += [("port", "" if self.port is None else str(self.port)), ("section_name", self.section)]
        return ",".join(f'{scope}_{k}="{escape(v)}"' for k, v in pairs)

    def key(self) -> str:
        """`Kind ns/name[:port]`, for logs and /status."""
        port = "" if self.port is None else f":{self.port}"
        return f"{self.kind} {self.namespace}/{self.name}{port}"


@dataclass(frozen=True)
class EndpointRef:
    """One endpoint of a backend. `port` is the port its server listens on; `header_port`, when
    set, is the endpoint's inbound proxy port, dialled with a transport header naming `port`
    (None: dial `port` directly). `identity` None: not meshed, reached in plain TCP."""

    address: str
    port: int
    identity: str | None
    server_name: str | None
    header_port: int | None = None
    # (address, port, identity, header port) as one string: balancer state is keyed by it, and
    # a str caches its hash (a tuple or this dataclass would hash its fields on every lookup).
    key: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.address}|{self.port}|{self.identity}|{self.header_port}")


@dataclass(frozen=True)
class Accrual:
    """Linkerd's consecutive-failures accrual (balancer.linkerd.io/failure-accrual)."""

    max_failures: int = 7
    min_penalty_s: float = 1.0
    max_penalty_s: float = 60.0
    jitter: float = 0.5


@dataclass(frozen=True)
class Backend:
    ref: Ref
    weight: int
    accrual: Accrual | None
    endpoints: tuple[EndpointRef, ...] | None  # Host: rendered by the authority; Service: None

    def resolve(self, services: ServiceTable) -> tuple[EndpointRef, ...]:
        """The endpoints now: rendered ones, else the discovered Service's endpoints serving
        the backend's port (() when the Service is absent: the backend is unavailable)."""
        if self.endpoints is not None:
            return self.endpoints
        port = self.ref.port
        svc = services.by_name(self.ref.namespace, self.ref.name)
        if svc is None or port is None or port not in svc.ports:
            return ()
        opaque = svc.ports[port]
        return tuple(
            EndpointRef(
                ep.address, ep.ports[port], ep.identity, ep.server_name, ep.proxy_port if opaque else None
            )
            for ep in svc.endpoints
            if port in ep.ports
        )


@dataclass(frozen=True)
class Timeouts:
    request_s: float | None = None  # head received → response end, all attempts ("limit")
    response_s: float | None = None  # request end → response end
    idle_s: float | None = None  # no bytes either way
    attempt_s: float | None = None  # retry.linkerd.io/timeout: per attempt, not on the last one
    backend_request_s: float | None = None  # timeouts.backendRequest: every attempt


NO_TIMEOUTS: Final = Timeouts()


@dataclass(frozen=True)
class RetryPolicy:
    limit: int
    http: tuple[tuple[int, int], ...]
    grpc: frozenset[int]
    backoff_min_s: float = 0.025
    backoff_max_s: float = 0.25
    jitter: float = 1.0
    max_request_bytes: int = 65536

    def retryable_status(self, status: int) -> bool:
        return any(lo <= status <= hi for lo, hi in self.http)


@dataclass(frozen=True)
class Rule:
    route: Ref
    backends: tuple[Backend, ...]
    timeouts: Timeouts
    retry: RetryPolicy | None
    # Cumulative weights, for one bisect per pick.
    cumulative: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.cumulative:
            total, cum = 0, []
            for b in self.backends:
                total += b.weight
                cum.append(total)
            object.__setattr__(self, "cumulative", tuple(cum))

    def pick(self, rng: random.Random, available: Callable[[Backend], bool]) -> Backend | None:
        """A backend by weight among the available ones (None: none is; answer 503 FAIL_FAST).
        Weight 0 is never chosen."""
        cum = self.cumulative
        total = cum[-1] if cum else 0
        if total <= 0:
            return None
        chosen = self.backends[bisect.bisect_right(cum, rng.random() * total)]
        if available(chosen):  # the fast path: one draw
            return chosen
        rest = [b for b in self.backends if b.weight > 0 and b is not chosen]
        while rest:
            total = sum(b.weight for b in rest)
            x = rng.random() * total
            for i, b in enumerate(rest):
                x -= b.weight
                if x < 0 or i == len(rest) - 1:
                    break
            if available(b):
                return b
            rest.pop(i)
        return None


@dataclass(frozen=True)
class BudgetSpec:
    """Linkerd's ServiceProfile retryBudget (defaults from its destination controller)."""

    ratio: float = 0.2
    min_per_s: int = 10
    ttl_s: float = 10.0


@dataclass(frozen=True, slots=True)
class RequestView:
    """What matching reads of a request. `headers`: lower-case names, repeated values joined
    with ", "; `query` without the `?`."""

    method: bytes
    path: str
    query: str
    host: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class PathMatch:
    kind: str  # "Exact" | "PathPrefix" | "RegularExpression"
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind == "Exact":
            return path == self.value
        if self.kind == "PathPrefix":
            # Whole segments: "/api" matches /api, /api/, /api/x, never /apix; "" (from "/") all.
            v = self.value
            return not v or path == v or (path.startswith(v) and path[len(v)] == "/")
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


@dataclass(frozen=True)
class ValueMatch:
    name: str  # lower-case for headers
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, found: str | None) -> bool:
        if found is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(found) is not None
        return found == self.value


@dataclass(frozen=True)
class Match:
    path: PathMatch
    method: bytes | None
    headers: tuple[ValueMatch, ...]
    query: tuple[ValueMatch, ...]

    def matches(self, view: RequestView, query: Callable[[], Mapping[str, list[str]]]) -> bool:
        if self.method is not None and view.method != self.method:
            return False
        if not self.path.matches(view.path):
            return False
        for h in self.headers:
            if not h.matches(view.headers.get(h.name)):
                return False
        if self.query:
            params = query()
            for q in self.query:
                if not any(q.matches(v) for v in params.get(q.name, ())):
                    return False
        return True


MATCH_ALL: Final = Match(PathMatch("PathPrefix", ""), None, (), ())


@dataclass(frozen=True)
class ParentPolicy:
    parent: Ref
    budget: BudgetSpec
    sources: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    candidates: tuple[tuple[Match, Rule], ...] = ()  # Gateway precedence, best first
    addresses: tuple[str, ...] = ()  # where the app dials it (with parent.port)
    only: Rule | None = None  # the single rule when it matches every request (no work per request)

    def select(self, view: RequestView) -> Rule | None:
        """The rule of the best match (None: no rule matches; answer 404)."""
        if self.only is not None:
            return self.only
        cands = self.candidates
        parsed: list[Mapping[str, list[str]]] = []

        def query() -> Mapping[str, list[str]]:
            if not parsed:
                parsed.append(parse_query(view.query))
            return parsed[0]

        for match, rule in cands:
            if match.matches(view, query):
                return rule
        return None


def parse_query(query: str) -> dict[str, list[str]]:
    """Each name's values, form-decoded (a query match matches any of them, as Linkerd's)."""
    out: dict[str, list[str]] = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(unquote(name.replace("+", " ")), []).append(unquote(value.replace("+", " ")))
    return out


class RouteTable:
    """`(address, port) -> ParentPolicy`: one dict lookup per new outbound connection."""

    def __init__(self, policies: Iterable[ParentPolicy] = ()) -> None:
        self._parents = tuple(policies)
        table: dict[tuple[str, int], ParentPolicy] = {}
        for p in self._parents:
            if p.parent.port is None:
                continue
            for address in p.addresses:
                table.setdefault((address, p.parent.port), p)
        self._table = table

    @classmethod
    def empty(cls) -> RouteTable:
        return cls()

    def __bool__(self) -> bool:
        return bool(self._table)

    def __len__(self) -> int:
        return len(self._parents)

    def lookup(self, address: str, port: int) -> ParentPolicy | None:
        found = self._table.get((address, port))
        if found is None and address.startswith("::ffff:") and "." in address:
            found = self._table.get((address[7:], port))  # IPv4-mapped, as ServiceTable.route
        return found

    def parents(self) -> tuple[ParentPolicy, ...]:
        return self._parents


# --- precedence -------------------------------------------------------------------------------

# Gateway: Exact first, then PathPrefix by length; RegularExpression is implementation-specific.
# Linkerd compares matched lengths, and a regex matches the whole path, so there a matching regex
# beats every matching prefix: placing it between Exact and PathPrefix keeps that (and a regex
# rule next to a catch-all "/" is not dead).
_PATH_RANK: Final = {"Exact": 2, "RegularExpression": 1, "PathPrefix": 0}


def precedence(
    match: Match, created: float, route: Ref, rule_index: int, match_index: int
) -> tuple[Any, ...]:
    """Sort key, ascending = best first (Gateway API HTTPRouteRule precedence: path kind and
    length, method, headers, query; then the oldest route, then ns/name, then rule order)."""
    path_len = len(match.path.value) if match.path.kind != "PathPrefix" else max(1, len(match.path.value))
    return (
        -_PATH_RANK[match.path.kind],
        -path_len,
        0 if match.method is not None else 1,
        -len(match.headers),
        -len(match.query),
        created,
        f"{route.namespace}/{route.name}",
        rule_index,
        match_index,
    )


# --- parsing ----------------------------------------------------------------------------------


class _Bad(ValueError):
    """A field of the entry being parsed is wrong (the message says which and why)."""


def parse_routes(doc: Any, reject: Reject, services: ServiceTable) -> RouteTable:
    """The directory's `routes` member; bad entries go to `reject` and are left out."""
    if doc is None:
        return RouteTable.empty()
    if not isinstance(doc, list):
        reject("routes", doc, "routes must be a list of parent items")
        return RouteTable.empty()
    policies: list[ParentPolicy] = []
    taken: dict[tuple[str, int], str] = {}
    for i, item in enumerate(doc):
        where = f"routes[{i}]"
        try:
            found = _parent_item(item, where, reject, services)
        except Exception as exc:  # one bad item must never take the directory down
            reject(where, item, _reason(exc))
            continue
        for policy in found:
            port = policy.parent.port or 0
            clash = next((a for a in policy.addresses if (a, port) in taken), None)
            if clash is not None:
                reject(where, item, f"{clash}:{port} is already routed by {taken[(clash, port)]}")
                continue
            for a in policy.addresses:
                taken[(a, port)] = policy.parent.key()
            policies.append(policy)
    return RouteTable(policies)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    return str(exc) or type(exc).__name__


def _parent_item(item: Any, where: str, reject: Reject, services: ServiceTable) -> list[ParentPolicy]:
    obj = _obj(item, "the item")
    parent_doc = _obj(obj.get("parent"), "parent")
    parent = _ref(parent_doc, "parent", port_required=False)
    addresses: tuple[str, ...]
    ports: tuple[int, ...]
    if parent.kind == "Service":
        svc = services.by_name(parent.namespace, parent.name)
        if svc is None:
            raise _Bad(
                f"parent Service {parent.namespace}/{parent.name} is not among the discovered Services"
            )
        addresses = svc.cluster_ips
        if not addresses:
            raise _Bad(f"parent Service {parent.namespace}/{parent.name} is headless (no cluster IP)")
        if parent.port is None:
            # Every TCP, non-opaque port of the Service (GAMMA): one policy per port, each
            # parsed on its own so a parent-as-backend rule gets that port.
            out: list[ParentPolicy] = []
            seen: set[tuple[str, str]] = set()

            def once(w: str, d: Any, r: str) -> None:
                if (w, r) not in seen:
                    seen.add((w, r))
                    reject(w, d, r)

            for port in sorted(p for p, opaque in svc.ports.items() if not opaque):
                one = {**obj, "parent": {**parent_doc, "port": port}}
                out += _parent_item(one, where, once, services)
            return out
        if parent.port not in svc.ports:
            raise _Bad(f"parent Service {parent.namespace}/{parent.name} has no port {parent.port}")
        else:
            ports = (parent.port,)
    else:
        if parent.port is None:
            raise _Bad("parent.port is required for a parent of kind " + repr(parent.kind))
        addrs = parent_doc.get("addresses")
        if not isinstance(addrs, list) or not addrs:
            raise _Bad("parent.addresses must be a non-empty list of addresses")
        addresses = tuple(dict.fromkeys(_address(a, "parent.addresses[]") for a in addrs))
        ports = (parent.port,)
    budget = _budget(obj.get("budget"))
    sources_doc = obj.get("sources") or []
    if not isinstance(sources_doc, list) or not all(isinstance(s, str) for s in sources_doc):
        raise _Bad("sources must be a list of strings")
    routes_doc = obj.get("routes")
    if not isinstance(routes_doc, list) or not routes_doc:
        raise _Bad("routes must be a non-empty list")
    rules: list[Rule] = []
    keyed: list[tuple[tuple[Any, ...], Match, Rule]] = []
    for j, route_doc in enumerate(routes_doc):
        rwhere = f"{where}.routes[{j}]"
        try:
            parsed = _route(route_doc, rwhere, parent, reject)
        except Exception as exc:  # entry by entry
            reject(rwhere, route_doc, _reason(exc))
            continue
        if parsed is None:
            continue
        route, created, route_rules = parsed
        for k, (matches, rule) in enumerate(route_rules):
            rules.append(rule)
            for m, match in enumerate(matches):
                keyed.append((precedence(match, created, route, k, m), match, rule))
    if not rules:
        reject(where, item, "no route of this parent is valid (its traffic stays on the L4 path)")
        return []
    keyed.sort(key=lambda t: t[0])
    candidates = tuple((m, r) for _, m, r in keyed)
    only = candidates[0][1] if len(candidates) == 1 and candidates[0][0] == MATCH_ALL else None
    # A parent with no port (Service: every non-opaque port) becomes one policy per port.
    return [
        ParentPolicy(
            Ref(parent.group, parent.kind, parent.namespace, parent.name, port, parent.section),
            budget,
            tuple(sources_doc),
            tuple(rules),
            candidates,
            addresses,
            only,
        )
        for port in ports
    ]


def _route(
    doc: Any, where: str, parent: Ref, reject: Reject
) -> tuple[Ref, float, list[tuple[tuple[Match, ...], Rule]]] | None:
    obj = _obj(doc, "the route")
    route = _ref(obj, "route", port_required=False, allow_empty=True)
    created = obj.get("created", 0.0)
    if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
        raise _Bad(f"created {created!r} must be a number (seconds since the epoch)")
    rules_doc = obj.get("rules")
    if not isinstance(rules_doc, list) or not rules_doc:
        raise _Bad("rules must be a non-empty list")
    out: list[tuple[tuple[Match, ...], Rule]] = []
    for k, rule_doc in enumerate(rules_doc):
        kwhere = f"{where}.rules[{k}]"
        try:
            parsed = _rule(rule_doc, kwhere, route, parent, reject)
        except Exception as exc:  # entry by entry
            reject(kwhere, rule_doc, _reason(exc))
            continue
        if parsed is not None:
            out.append(parsed)
    if not out:
        reject(where, doc, "no rule of this route is valid")
        return None
    return route, float(created), out


def _rule(
    doc: Any, where: str, route: Ref, parent: Ref, reject: Reject
) -> tuple[tuple[Match, ...], Rule] | None:
    obj = _obj(doc, "the rule")
    matches_doc = obj.get("matches") or []
    if not isinstance(matches_doc, list):
        raise _Bad("matches must be a list")
    matches: list[Match] = []
    for m, match_doc in enumerate(matches_doc):
        try:
            matches.append(_match(match_doc))
        except Exception as exc:  # a rule missing a match would match other requests
            raise _Bad(f"matches[{m}]: {_reason(exc)}") from None
    if not matches:
        matches.append(MATCH_ALL)  # Gateway: no matches = PathPrefix "/"
    backends_doc = obj.get("backends")
    if backends_doc is None or backends_doc == []:
        if parent.kind != "Service":
            raise _Bad("backends must be a non-empty list")
        backends_doc = [{"weight": 1, "ref": {**_ref_doc(parent)}}]  # Linkerd's FirstAvailable{parent}
    if not isinstance(backends_doc, list):
        raise _Bad("backends must be a list")
    backends: list[Backend] = []
    for b, backend_doc in enumerate(backends_doc):
        try:
            backends.append(_backend(backend_doc))
        except Exception as exc:  # entry by entry
            reject(f"{where}.backends[{b}]", backend_doc, _reason(exc))
    if not backends:
        reject(where, doc, "no backend of this rule is valid")
        return None
    timeouts = _timeouts(obj.get("timeouts"))
    retry = _retry(obj.get("retry"))
    return tuple(matches), Rule(route, tuple(backends), timeouts, retry)


def _ref_doc(ref: Ref) -> dict[str, Any]:
    return {
        "group": ref.group,
        "kind": ref.kind,
        "namespace": ref.namespace,
        "name": ref.name,
        "port": ref.port,
        "section": ref.section,
    }


def _match(doc: Any) -> Match:
    obj = _obj(doc, "the match")
    path = MATCH_ALL.path
    if obj.get("path") is not None:
        p = _obj(obj["path"], "path")
        kind, value = p.get("type", "PathPrefix"), p.get("value", "/")
        if kind not in _PATH_RANK:
            raise _Bad(f"path.type {kind!r} must be Exact, PathPrefix or RegularExpression")
        if not isinstance(value, str) or not value:
            raise _Bad("path.value must be a non-empty string")
        if kind == "RegularExpression":
            path = PathMatch(kind, value, _regex(value, "path.value"))
        else:
            if not value.startswith("/"):
                raise _Bad(f"path.value {value!r} must start with /")
            path = PathMatch(kind, value.rstrip("/") if kind == "PathPrefix" else value)
    method = obj.get("method")
    if method is not None:
        if not isinstance(method, str) or not method.isalpha() or not method.isascii():
            raise _Bad(f"method {method!r} must be an HTTP method name")
        method = method.upper().encode()
    headers = tuple(_value_match(h, f"headers[{n}]", lower=True) for n, h in enumerate(_list(obj, "headers")))
    query = tuple(_value_match(q, f"query[{n}]", lower=False) for n, q in enumerate(_list(obj, "query")))
    return Match(path, method, headers, query)


def _value_match(doc: Any, what: str, lower: bool) -> ValueMatch:
    obj = _obj(doc, what)
    kind, name, value = obj.get("type", "Exact"), obj.get("name"), obj.get("value")
    if not isinstance(name, str) or not name:
        raise _Bad(f"{what}.name must be a non-empty string")
    if not isinstance(value, str):
        raise _Bad(f"{what}.value must be a string")
    if kind == "Exact":
        return ValueMatch(name.lower() if lower else name, value)
    if kind == "RegularExpression":
        return ValueMatch(name.lower() if lower else name, value, _regex(value, f"{what}.value"))
    raise _Bad(f"{what}.type {kind!r} must be Exact or RegularExpression")


def _regex(value: str, what: str) -> re.Pattern[str]:
    if len(value) > MAX_REGEX:
        raise _Bad(f"{what} is longer than {MAX_REGEX} characters")
    try:
        return re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        raise _Bad(f"{what} {value!r} is not a regular expression: {exc}") from None


def _backend(doc: Any) -> Backend:
    obj = _obj(doc, "the backend")
    weight = obj.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise _Bad(f"weight {weight!r} must be a whole number 0-{MAX_WEIGHT}")
    ref = _ref(_obj(obj.get("ref"), "ref"), "ref", port_required=True)
    accrual = _accrual(obj.get("accrual"))
    eps = obj.get("endpoints")
    endpoints: tuple[EndpointRef, ...] | None
    if eps is None:
        if ref.kind != "Service":
            raise _Bad(f"endpoints are required for a backend of kind {ref.kind!r}")
        endpoints = None
    else:
        if not isinstance(eps, list):
            raise _Bad("endpoints must be a list")
        endpoints = tuple(_endpoint(e, f"endpoints[{n}]") for n, e in enumerate(eps))
    return Backend(ref, weight, accrual, endpoints)


def _endpoint(doc: Any, what: str) -> EndpointRef:
    obj = _obj(doc, what)
    address = _address(obj.get("address"), f"{what}.address")
    port = _port(obj.get("port"), f"{what}.port")
    identity, server_name = obj.get("identity"), obj.get("server_name")
    if identity is not None:
        # The catalog's own rules: either form of identity, kept as the SPIFFE ID.
        try:
            entry = CatalogEntry.from_doc({"cidr": address, "identity": identity, "server_name": server_name})
        except ConfigError as exc:
            raise _Bad(f"{what}: " + exc.message.rpartition(" is invalid: ")[2]) from None
        identity, server_name = entry.identity, entry.server_name
    elif server_name is not None:
        raise _Bad(f"{what}.server_name without an identity")
    header_port = obj.get("header_port")
    return EndpointRef(
        address,
        port,
        identity,
        server_name,
        None if header_port is None else _port(header_port, f"{what}.header_port"),
    )


def _accrual(doc: Any) -> Accrual | None:
    if doc is None:
        return None
    obj = _obj(doc, "accrual")
    n = obj.get("max_failures", 7)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 2**31:
        raise _Bad(f"accrual.max_failures {n!r} must be a whole number >= 1")
    lo = _millis(obj.get("min_penalty_ms", 1000), "accrual.min_penalty_ms")
    hi = _millis(obj.get("max_penalty_ms", 60000), "accrual.max_penalty_ms")
    if lo is None or hi is None or hi <= 0 or lo > hi:
        raise _Bad("accrual penalties must satisfy 0 <= min_penalty_ms <= max_penalty_ms, max > 0")
    jitter = _number(obj.get("jitter", 0.5), "accrual.jitter", 0.0, 100.0)
    return Accrual(n, lo, hi, jitter)


def _timeouts(doc: Any) -> Timeouts:
    if doc is None:
        return NO_TIMEOUTS
    obj = _obj(doc, "timeouts")

    def get(key: str) -> float | None:
        value = _millis(obj.get(key), f"timeouts.{key}")
        return value or None  # 0 = none (GEP-1742)

    return Timeouts(
        get("request_ms"), get("response_ms"), get("idle_ms"), get("attempt_ms"), get("backend_request_ms")
    )


def _retry(doc: Any) -> RetryPolicy | None:
    if doc is None:
        return None
    obj = _obj(doc, "retry")
    limit = obj.get("limit", 1)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 65535:
        raise _Bad(f"retry.limit {limit!r} must be a whole number 0-65535")
    ranges: list[tuple[int, int]] = []
    http = obj.get("http")
    for r in [[500, 599]] if http is None else http if isinstance(http, list) else [None]:
        if (
            not isinstance(r, list)
            or len(r) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in r)
            or r[0] > r[1]
        ):
            raise _Bad(f"retry.http {r!r} must be [low, high] status codes 100-599")
        ranges.append((r[0], r[1]))
    grpc = obj.get("grpc") or []
    if not isinstance(grpc, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 16 for c in grpc
    ):
        raise _Bad(f"retry.grpc {grpc!r} must be a list of gRPC codes 0-16")
    lo = _millis(obj.get("backoff_min_ms", 25), "retry.backoff_min_ms")
    hi = _millis(obj.get("backoff_max_ms", 250), "retry.backoff_max_ms")
    if lo is None or hi is None or hi <= 0 or lo > hi:
        raise _Bad("retry backoff must satisfy 0 <= backoff_min_ms <= backoff_max_ms, max > 0")
    jitter = _number(obj.get("jitter", 1.0), "retry.jitter", 0.0, 100.0)
    max_bytes = obj.get("max_request_bytes", 65536)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 <= max_bytes <= 2**31:
        raise _Bad(f"retry.max_request_bytes {max_bytes!r} must be a whole number >= 0")
    if limit == 0:
        return None
    return RetryPolicy(limit, tuple(ranges), frozenset(grpc), lo, hi, jitter, max_bytes)


def _budget(doc: Any) -> BudgetSpec:
    """tower's TpsBudget bounds (as the proxy enforces them for a ServiceProfile)."""
    if doc is None:
        return BudgetSpec()
    obj = _obj(doc, "budget")
    ratio = _number(obj.get("ratio", 0.2), "budget.ratio", 0.0, 1000.0)
    per_s = obj.get("min_per_s", 10)
    if isinstance(per_s, bool) or not isinstance(per_s, int) or not 0 <= per_s < 2**31 - 1:
        raise _Bad(f"budget.min_per_s {per_s!r} must be a whole number >= 0")
    ttl = _number(obj.get("ttl_s", 10.0), "budget.ttl_s", 1.0, 60.0)
    return BudgetSpec(ratio, per_s, ttl)


def _ref(obj: Mapping[str, Any], what: str, port_required: bool, allow_empty: bool = False) -> Ref:
    def text(key: str, required: bool) -> str:
        value = obj.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str) or len(value) > 253 or (required and not value):
            raise _Bad(
                f"{what}.{key} must be {'a non-empty' if required else 'a'} string (<= 253 characters)"
            )
        return value

    kind = text("kind", True)
    name = text("name", True)
    namespace = text("namespace", not allow_empty)
    port = obj.get("port")
    if port is None:
        if port_required:
            raise _Bad(f"{what}.port is required")
    else:
        port = _port(port, f"{what}.port")
    return Ref(text("group", False), kind, namespace, name, port, text("section", False))


def _obj(doc: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise _Bad(f"{what} must be an object")
    return doc


def _list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"{key} must be a list")
    return value


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} {value!r} is not an IP address")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise _Bad(f"{what} {value!r} is not an IP address") from None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.compressed


def _port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Bad(f"{what} {value!r} is not a port number (1-65535)")
    return value


def _number(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _Bad(f"{what} {value!r} must be a number {lo:g}-{hi:g}")
    return float(value)


def _millis(value: Any, what: str) -> float | None:
    """Milliseconds on the wire (None/absent: unset) → seconds."""
    if value is None:
        return None
    # Any duration the authority accepts (Gateway's up to 4 x 99999h, Linkerd's days) must
    # parse here: a refusal would drop the whole rule on every agent.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_MILLIS:
        raise _Bad(f"{what} {value!r} must be a finite number of milliseconds >= 0")
    return float(value) / 1000.0
