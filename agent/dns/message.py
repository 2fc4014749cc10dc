"""DNS messages, sans-IO: just enough to decide whether a query is ours, and to answer it.

Only the header, the first question and the EDNS OPT record of a query are read; a query the
stub forwards is never re-encoded (it goes upstream as the bytes that came in, and the answer
comes back as the bytes the upstream sent: Istio's DNS proxy re-encoded them and broke large
and non-EDNS answers, istio/istio#29675, #61371, istio/ztunnel#2060).

Bounds (RFC 1035 §2.3.4, §4.2.1; RFC 6891 §6.2.5): a name is at most 255 octets on the wire and
each label at most 63; a compression pointer may only point backwards, so decoding ends; a UDP
answer fits 512 bytes without EDNS, or the requestor's EDNS size clamped to [512, 4096]; what
does not fit is sent empty with TC set, so the client asks again over TCP.

Nothing here raises on input: `parse_query` returns a `Query` or a `Malformed` with a closed
reason (usable as a metric label).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

HEADER_LEN: Final = 12
MAX_NAME: Final = 255
MAX_LABEL: Final = 63
UDP_PLAIN_MAX: Final = 512
UDP_EDNS_MAX: Final = 4096
TCP_MAX: Final = 65535
OUR_EDNS_SIZE: Final = 1232  # what we advertise (the DNS flag day 2020 value)

QR: Final = 0x8000
AA: Final = 0x0400
TC: Final = 0x0200
RD: Final = 0x0100
RA: Final = 0x0080
CD: Final = 0x0010
DO: Final = 0x8000  # in the OPT record's TTL field

TYPE_A: Final = 1
TYPE_SOA: Final = 6
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
BADVERS_EXT: Final = 1  # extended rcode 16 = (1 << 4) | 0

Labels = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Edns:
    udp_size: int
    version: int
    do: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A standard query's parts the stub needs. `name` is lower-cased (ASCII only, as DNS
    compares names); `name_as_sent` keeps the client's case (0x20 randomisation) for the echo."""

    id: int
    flags: int
    name: Labels
    name_as_sent: Labels
    qtype: int
    qclass: int
    edns: Edns | None

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    def udp_limit(self) -> int:
        """The largest UDP answer this client accepts."""
        if self.edns is None:
            return UDP_PLAIN_MAX
        return min(max(self.edns.udp_size, UDP_PLAIN_MAX), UDP_EDNS_MAX)


@dataclass(frozen=True, slots=True)
class Malformed:
    """Why a message is not a query we can read. Reasons: short, not_query, no_question,
    bad_name, name_too_long, bad_pointer, truncated, bad_opt."""

    reason: str


class _Bad(Exception):
    """Internal: unwinds a parse; never leaves this module."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_name(data: bytes, offset: int) -> tuple[Labels, int]:
    """The name at `offset` and the offset just after it (after the first pointer, if any).
    Raises _Bad; callers in this module turn it into a value."""
    labels: list[bytes] = []
    wire = 1  # the root's zero byte
    end = -1
    pos = offset
    floor = offset  # a pointer must point strictly before the position it was read at
    while True:
        if pos >= len(data):
            raise _Bad("truncated")
        length = data[pos]
        if length == 0:
            if end < 0:
                end = pos + 1
            return tuple(labels), end
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise _Bad("truncated")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= floor:
                raise _Bad("bad_pointer")
            if end < 0:
                end = pos + 2
            pos = floor = target
            continue
        if kind != 0:
            raise _Bad("bad_name")  # 0x40 / 0x80: obsolete or unassigned label types
        label = data[pos + 1 : pos + 1 + length]
        if len(label) != length:
            raise _Bad("truncated")
        wire += 1 + length
        if wire > MAX_NAME:
            raise _Bad("name_too_long")
        labels.append(label)
        pos += 1 + length


def _skip_rr(data: bytes, offset: int) -> tuple[int, int, int, int]:
    """(type, class, ttl, offset after) of the resource record at `offset`."""
    _, pos = read_name(data, offset)
    if pos + 10 > len(data):
        raise _Bad("truncated")
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
    pos += 10 + rdlen
    if pos > len(data):
        raise _Bad("truncated")
    return rtype, rclass, ttl, pos


def parse_query(data: bytes) -> Query | Malformed:
    """Read a query: header, first question, and the OPT record if there is one."""
    if len(data) < HEADER_LEN:
        return Malformed("short")
    ident, flags, qd, an, ns, ar = struct.unpack_from("!6H", data, 0)
    if flags & QR:
        return Malformed("not_query")
    if qd != 1:
        return Malformed("no_question")
    try:
        name, pos = read_name(data, HEADER_LEN)
        if pos + 4 > len(data):
            raise _Bad("truncated")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        for _ in range(an + ns):
            pos = _skip_rr(data, pos)[3]
        edns: Edns | None = None
        for _ in range(ar):
            rtype, rclass, ttl, pos = _skip_rr(data, pos)
            if rtype == TYPE_OPT:
                if edns is not None:
                    raise _Bad("bad_opt")  # RFC 6891 §6.1.1: more than one OPT is FORMERR
                edns = Edns(udp_size=rclass, version=(ttl >> 16) & 0xFF, do=bool(ttl & DO))
    except _Bad as bad:
        return Malformed(bad.reason)
    return Query(ident, flags, tuple(label.lower() for label in name), name, qtype, qclass, edns)


def header_id(data: bytes) -> int | None:
    return struct.unpack_from("!H", data, 0)[0] if len(data) >= 2 else None


def response_matches(query: bytes, response: bytes) -> bool:
    """Does `response` answer `query`? Same ID, QR set, and the same question (compared
    without case) when the query had one. Guards against stray and spoofed datagrams."""
    if len(response) < HEADER_LEN or len(query) < HEADER_LEN:
        return False
    if response[:2] != query[:2] or not response[2] & 0x80:
        return False
    qd_query = struct.unpack_from("!H", query, 4)[0]
    if qd_query == 0:
        return True
    try:
        _, end = read_name(query, HEADER_LEN)
    except _Bad:
        return True  # we forwarded something we cannot read: the ID is all there is to match
    end += 4
    span = query[HEADER_LEN:end]
    return response[HEADER_LEN : HEADER_LEN + len(span)].lower() == span.lower()


def is_truncated(message: bytes) -> bool:
    return len(message) >= 4 and bool(message[2] & (TC >> 8))


def encode_name(labels: Labels) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


@dataclass(frozen=True, slots=True)
class Soa:
    """The SOA sent with NXDOMAIN/NODATA inside the cluster domain (RFC 2308 negative caching:
    a resolver caches the negative answer for min(SOA TTL, minimum))."""

    zone: Labels
    ttl: int

    def record(self) -> bytes:
        mname = encode_name((b"ns", b"dns", *self.zone))
        rname = encode_name((b"hostmaster", *self.zone))
        rdata = mname + rname + struct.pack("!5I", 1, 7200, 1800, 86400, self.ttl)
        return encode_name(self.zone) + struct.pack("!HHIH", TYPE_SOA, CLASS_IN, self.ttl, len(rdata)) + rdata


def _opt_record(query: Query, ext_rcode: int) -> bytes:
    assert query.edns is not None
    ttl = (ext_rcode << 24) | (DO if query.edns.do else 0)
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, OUR_EDNS_SIZE, ttl, 0)


def build_response(
    query: Query,
    rcode: int,
    addresses: tuple[str, ...] = (),
    ttl: int = 5,
    soa: Soa | None = None,
    limit: int = TCP_MAX,
) -> bytes:
    """An authoritative answer to `query`: `addresses` as A/AAAA records (the caller picked the
    family), else none; `soa` in the authority section. Answers over `limit` bytes are sent
    with TC set and no records (an RRset is never split, RFC 2181 §9)."""
    ext_rcode = 0
    if query.edns is not None and query.edns.version > 0:
        rcode, ext_rcode, addresses, soa = NOERROR, BADVERS_EXT, (), None  # RFC 6891 §6.1.3
    answers = [_address_record(address, ttl) for address in addresses]
    authority = [soa.record()] if soa is not None else []
    opt = [_opt_record(query, ext_rcode)] if query.edns is not None else []
    message = _assemble(query, rcode, answers, authority, opt, 0)
    if len(message) > limit:
        message = _assemble(query, rcode, [], [], opt, TC)
    return message


def _address_record(address: str, ttl: int) -> bytes:
    packed = ipaddress.ip_address(address).packed
    rtype = TYPE_A if len(packed) == 4 else TYPE_AAAA
    return b"\xc0\x0c" + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(packed)) + packed


def _assemble(query: Query, rcode: int, an: list[bytes], ns: list[bytes], ar: list[bytes], tc: int) -> bytes:
    flags = QR | AA | RA | tc | (query.flags & (RD | CD)) | (query.opcode << 11) | (rcode & 0xF)
    header = struct.pack("!6H", query.id, flags, 1, len(an), len(ns), len(ar))
    question = encode_name(query.name_as_sent) + struct.pack("!HH", query.qtype, query.qclass)
    return b"".join([header, question, *an, *ns, *ar])


def build_error(data: bytes, rcode: int) -> bytes | None:
    """A header-only error answer (FORMERR, SERVFAIL) echoing the ID and RD of whatever came
    in; None when there is not even a header to echo."""
    if len(data) < HEADER_LEN:
        return None
    ident, flags = struct.unpack_from("!HH", data, 0)
    return struct.pack("!6H", ident, QR | RA | (flags & (RD | 0x7800)) | rcode, 0, 0, 0, 0)


def encode_query(
    name: str, qtype: int, ident: int = 0, edns_size: int | None = None, do: bool = False, rd: bool = True
) -> bytes:
    """A query, for tests and the netns harness (the stub itself never builds queries)."""
    labels = tuple(part.encode() for part in name.rstrip(".").split(".") if part)
    header = struct.pack("!6H", ident, RD if rd else 0, 1, 0, 0, 1 if edns_size is not None else 0)
    body = encode_name(labels) + struct.pack("!HH", qtype, CLASS_IN)
    if edns_size is not None:
        body += b"\x00" + struct.pack("!HHIH", TYPE_OPT, edns_size, DO if do else 0, 0)
    return header + body
