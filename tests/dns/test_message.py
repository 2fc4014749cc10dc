"""The sans-IO DNS codec (agent/dns/message.py): queries read as written, hostile bytes turned
into a Malformed with a reason, answers that dnspython (an independent implementation) reads
back exactly, and the size rules of RFC 1035 / RFC 6891."""

from __future__ import annotations

import struct

import pytest

from agent.dns import message as m

pytest.importorskip("dns.message", reason="dnspython (a dev dependency) is the independent reader here")
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

HEADER = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)


def q(name: bytes, rest: bytes = b"\x00\x01\x00\x01", header: bytes = HEADER) -> bytes:
    return header + name + rest


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\x00" * 11, "short"),
        (struct.pack("!6H", 1, 0x8000, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", "not_query"),
        (struct.pack("!6H", 1, 0x0100, 0, 0, 0, 0), "no_question"),
        (struct.pack("!6H", 1, 0x0100, 2, 0, 0, 0) + b"\x00" * 10, "no_question"),
        (q(b"\x03abc"), "truncated"),  # label runs past the end
        (q(b"\x05ab"), "truncated"),
        (q(b"\x00", rest=b"\x00\x01"), "truncated"),  # qtype without qclass
        (q(b"\xc0\x0c"), "bad_pointer"),  # points at itself
        (q(b"\x01a\xc0\x0c"), "bad_pointer"),  # points back at its own start: a loop
        (q(b"\x01a\xc0\x0e"), "bad_pointer"),  # points forwards
        (q(b"\xc0"), "truncated"),
        (q(b"\x40abc\x00"), "bad_name"),  # extended label type
        (q(b"\x80abc\x00"), "bad_name"),
        (q(b"\x3f" + b"a" * 63) * 1 + b"", "truncated"),
        (q((b"\x3f" + b"a" * 63) * 4 + b"\x00"), "name_too_long"),  # 4*64+1 = 257 > 255
        (
            struct.pack("!6H", 1, 0x0100, 1, 0, 0, 2)
            + b"\x00\x00\x01\x00\x01"
            + (b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)) * 2,
            "bad_opt",
        ),
        (struct.pack("!6H", 1, 0x0100, 1, 0, 0, 1) + b"\x00\x00\x01\x00\x01" + b"\x00\x00\x29", "truncated"),
        (
            struct.pack("!6H", 1, 0x0100, 1, 0, 0, 1)
            + b"\x00\x00\x01\x00\x01"
            + b"\x00"
            + struct.pack("!HHIH", 41, 512, 0, 9),
            "truncated",
        ),
    ],
    ids=[
        "empty",
        "11-bytes",
        "response",
        "no-question",
        "two-questions",
        "label-past-end",
        "label-short",
        "no-qclass",
        "self-pointer",
        "pointer-loop",
        "forward-pointer",
        "half-pointer",
        "label-type-0x40",
        "label-type-0x80",
        "name-no-end",
        "name-257",
        "two-opts",
        "opt-cut",
        "opt-rdata-past-end",
    ],
)
def test_malformed(data: bytes, reason: str) -> None:
    assert m.parse_query(data) == m.Malformed(reason)


def test_names_of_255_octets_are_read_and_256_are_not() -> None:
    # 3 labels of 63 + one of 61: 3*64 + 62 + 1 = 255
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"
    parsed = m.parse_query(q(name))
    assert isinstance(parsed, m.Query) and len(parsed.name) == 4
    longer = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"b" * 62 + b"\x00"
    assert m.parse_query(q(longer)) == m.Malformed("name_too_long")


def test_backward_pointer_is_followed() -> None:
    # question name "x" + pointer to a name stored in... the header can hold no name, so build
    # an answer-section RR whose owner points back into the question, and an OPT after it
    data = (
        struct.pack("!6H", 7, 0x0100, 1, 1, 0, 1)
        + b"\x03foo\x03bar\x00\x00\x01\x00\x01"
        + b"\x01x\xc0\x0c"
        + struct.pack("!HHIH", 1, 1, 60, 4)
        + b"\x01\x02\x03\x04"
        + b"\x00"
        + struct.pack("!HHIH", 41, 4096, 0x8000, 0)
    )
    parsed = m.parse_query(data)
    assert isinstance(parsed, m.Query)
    assert parsed.name == (b"foo", b"bar")
    assert parsed.edns == m.Edns(udp_size=4096, version=0, do=True)


def test_query_fields_and_case() -> None:
    data = m.encode_query("OrDers.Shop.svc.Cluster.LOCAL", m.TYPE_AAAA, ident=0xBEEF, edns_size=1400, do=True)
    parsed = m.parse_query(data)
    assert isinstance(parsed, m.Query)
    assert parsed.id == 0xBEEF and parsed.opcode == 0 and parsed.flags & m.RD
    assert parsed.name == (b"orders", b"shop", b"svc", b"cluster", b"local")
    assert parsed.name_as_sent[0] == b"OrDers"
    assert (parsed.qtype, parsed.qclass) == (m.TYPE_AAAA, m.CLASS_IN)
    assert parsed.edns == m.Edns(1400, 0, True)


@pytest.mark.parametrize(
    ("edns_size", "limit"),
    [(None, 512), (0, 512), (511, 512), (1232, 1232), (4096, 4096), (65535, 4096)],
)
def test_udp_limit(edns_size: int | None, limit: int) -> None:
    parsed = m.parse_query(m.encode_query("a.b", 1, edns_size=edns_size))
    assert isinstance(parsed, m.Query) and parsed.udp_limit() == limit


def _query(name: str, qtype: int, **kw: object) -> tuple[bytes, m.Query]:
    data = m.encode_query(name, qtype, ident=4321, **kw)  # type: ignore[arg-type]
    parsed = m.parse_query(data)
    assert isinstance(parsed, m.Query)
    return data, parsed


def test_answer_read_back_by_dnspython() -> None:
    data, query = _query("Orders.shop.svc.cluster.local", m.TYPE_A, edns_size=1232, do=True)
    wire = m.build_response(query, m.NOERROR, ("10.96.0.10", "10.96.0.11"), ttl=7)
    msg = dns.message.from_wire(wire)
    request = dns.message.from_wire(data)
    assert request.is_response(msg)
    assert msg.id == 4321 and msg.rcode() == dns.rcode.NOERROR
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.AA and msg.flags & dns.flags.RD
    assert msg.question[0].name.to_text() == "Orders.shop.svc.cluster.local."  # case echoed
    (rrset,) = msg.answer
    assert rrset.ttl == 7 and sorted(r.address for r in rrset) == ["10.96.0.10", "10.96.0.11"]
    assert msg.edns == 0 and msg.ednsflags & dns.flags.DO and msg.payload == m.OUR_EDNS_SIZE


def test_aaaa_and_nxdomain_with_soa() -> None:
    _, query = _query("orders.shop.svc.cluster.local", m.TYPE_AAAA)
    msg = dns.message.from_wire(m.build_response(query, m.NOERROR, ("fd00::10",)))
    assert [r.address for r in msg.answer[0]] == ["fd00::10"] and msg.answer[0].rdtype == dns.rdatatype.AAAA
    assert msg.edns == -1  # no OPT asked, none sent
    soa = m.Soa((b"cluster", b"local"), 5)
    msg = dns.message.from_wire(m.build_response(query, m.NXDOMAIN, soa=soa))
    assert msg.rcode() == dns.rcode.NXDOMAIN and not msg.answer
    (auth,) = msg.authority
    assert auth.name.to_text() == "cluster.local." and auth[0].minimum == 5 and auth.ttl == 5


def test_too_big_for_udp_is_sent_empty_with_tc() -> None:
    _, query = _query("big.shop.svc.cluster.local", m.TYPE_A)
    addresses = tuple(f"10.0.{i // 256}.{i % 256}" for i in range(40))  # 40 * 16 + 44 > 512
    wire = m.build_response(query, m.NOERROR, addresses, limit=query.udp_limit())
    assert len(wire) <= 512 and m.is_truncated(wire)
    assert not dns.message.from_wire(wire).answer
    full = m.build_response(query, m.NOERROR, addresses)  # TCP: everything
    assert not m.is_truncated(full) and len(dns.message.from_wire(full).answer[0]) == 40


def test_edns_version_above_zero_gets_badvers() -> None:
    data = bytearray(m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A, edns_size=1232))
    data[-5] = 1  # OPT TTL = ext-rcode(8) version(8) flags(16): version 1
    query = m.parse_query(bytes(data))
    assert isinstance(query, m.Query) and query.edns is not None and query.edns.version == 1
    msg = dns.message.from_wire(m.build_response(query, m.NOERROR, ("10.0.0.1",)))
    assert msg.rcode() == dns.rcode.BADVERS and not msg.answer


@pytest.mark.parametrize(
    ("response", "matches"),
    [
        (lambda qw: qw[:2] + bytes([qw[2] | 0x80]) + qw[3:], True),
        (lambda qw: qw[:2] + bytes([qw[2] | 0x80]) + qw[3:].upper(), True),  # 0x20 case change
        (lambda qw: qw, False),  # QR not set: our own query reflected
        (lambda qw: b"\x00\x00" + bytes([qw[2] | 0x80]) + qw[3:], False),  # other ID
        (lambda qw: qw[:2] + bytes([qw[2] | 0x80]) + qw[3:12] + b"\x03xyz" + qw[16:], False),
        (lambda qw: qw[:11], False),
    ],
    ids=["same", "case", "not-response", "other-id", "other-question", "short"],
)
def test_response_matches(response: object, matches: bool) -> None:
    query = m.encode_query("abc.example", m.TYPE_A, ident=0x4242)
    assert m.response_matches(query, response(query)) is matches  # type: ignore[operator]


def test_build_error_echoes_id_and_rd() -> None:
    query = m.encode_query("x.y", m.TYPE_A, ident=99)
    msg = dns.message.from_wire(m.build_error(query, m.SERVFAIL) or b"")
    assert msg.id == 99 and msg.rcode() == dns.rcode.SERVFAIL and msg.flags & dns.flags.RD
    assert m.build_error(b"\x00" * 5, m.FORMERR) is None
