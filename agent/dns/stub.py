"""What the stub does with one message, and how much it takes from one source: pure functions,
no sockets (the server in `agent.dns.server` only moves bytes).

The rule: answer only what we positively own — a standard QUERY, class IN, for a name the
table owns — and forward everything else as the bytes that came in, including messages we
cannot read (the upstream answers those as it always did). Only two things are dropped: what
is too short to carry a DNS header, and DNS *responses* sent to us (answering or forwarding
them would make the stub a reflector).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.dns import message as m
from agent.dns.names import Empty, Found, Missing, NameTable, NotOurs


@dataclass(frozen=True, slots=True)
class Answer:
    data: bytes
    outcome: str  # "answer", "nodata", "nxdomain", "truncated", "badvers": a closed set


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the message upstream unchanged."""


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str  # "short", "not_query"


FORWARD = Forward()
Decision = Answer | Forward | Drop


def decide(data: bytes, table: NameTable, ttl: int, over_tcp: bool) -> Decision:
    query = m.parse_query(data)
    if isinstance(query, m.Malformed):
        return Drop(query.reason) if query.reason in ("short", "not_query") else FORWARD
    if query.opcode != 0 or query.qclass != m.CLASS_IN:
        return FORWARD
    found = table.lookup(query.name)
    if isinstance(found, NotOurs):
        return FORWARD
    limit = m.TCP_MAX if over_tcp else query.udp_limit()
    soa = m.Soa(table.cluster_domain, ttl)
    if isinstance(found, Missing):
        return _answer(query, m.NXDOMAIN, (), ttl, soa, limit, "nxdomain")
    if isinstance(found, Empty):
        return _answer(query, m.NOERROR, (), ttl, soa, limit, "nodata")
    assert isinstance(found, Found)
    addresses = _addresses(found, query.qtype)
    if not addresses:
        return _answer(query, m.NOERROR, (), ttl, soa if found.in_zone else None, limit, "nodata")
    return _answer(query, m.NOERROR, addresses, ttl, None, limit, "answer")


def _addresses(found: Found, qtype: int) -> tuple[str, ...]:
    if qtype == m.TYPE_A:
        return found.v4
    if qtype == m.TYPE_AAAA:
        return found.v6
    if qtype == m.TYPE_ANY:
        return found.v4 + found.v6
    return ()  # MX, TXT, HTTPS, SRV, ... of a service name: it has none (NODATA)


def _answer(
    query: m.Query,
    rcode: int,
    addresses: tuple[str, ...],
    ttl: int,
    soa: m.Soa | None,
    limit: int,
    outcome: str,
) -> Answer:
    data = m.build_response(query, rcode, addresses, ttl, soa, limit)
    if query.edns is not None and query.edns.version > 0:
        outcome = "badvers"
    elif m.is_truncated(data):
        outcome = "truncated"
    return Answer(data, outcome)


class RateLimiter:
    """A token bucket per source address: `rate` queries a second, `burst` at once. At most
    `max_sources` buckets are kept (the oldest goes first), so a flood from many addresses
    costs bounded memory; a source forgotten that way starts again with a full bucket."""

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, last seen)

    def allow(self, source: str, now: float) -> bool:
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self.max_sources:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[source] = (tokens, now)  # re-inserted: dict order is least recently seen first
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
