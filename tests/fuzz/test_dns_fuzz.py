"""Property tests of the DNS stub's codec and decision (agent/dns): any bytes at all are read
without raising, a query is either answered, forwarded or dropped, and every answer is a
well-formed message within the size the client allows."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.dns import message as m
from agent.dns.names import ServiceAddress, build_table
from agent.dns.stub import Answer, Drop, Forward, decide

TABLE = build_table(
    [
        ServiceAddress("orders", "shop", ("10.96.0.10", "fd00::10")),
        ServiceAddress("big", "shop", tuple(f"10.2.0.{i}" for i in range(1, 200))),
    ],
    (b"cluster", b"local"),
    short_forms=True,
)
NAMES = st.sampled_from(
    [
        "orders.shop.svc.cluster.local",
        "big.shop.svc.cluster.local",
        "nope.shop.svc.cluster.local",
        "orders.shop",
        "example.com",
        "shop.svc.cluster.local",
    ]
)


def check(data: bytes) -> None:
    parsed = m.parse_query(data)
    assert isinstance(parsed, m.Query | m.Malformed)
    m.response_matches(data, data)
    for over_tcp in (False, True):
        decision = decide(data, TABLE, 5, over_tcp)
        assert isinstance(decision, Answer | Forward | Drop)
        if isinstance(decision, Answer):
            assert isinstance(parsed, m.Query)
            limit = m.TCP_MAX if over_tcp else parsed.udp_limit()
            assert len(decision.data) <= limit
            assert decision.data[:2] == data[:2]  # the client's ID
            reread = m.parse_query(
                bytes([decision.data[0], decision.data[1], decision.data[2] & 0x7F]) + decision.data[3:]
            )
            assert isinstance(reread, m.Query) and reread.name == parsed.name


@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    check(data)


@given(
    NAMES,
    st.sampled_from([1, 28, 255, 16, 65]),
    st.one_of(st.none(), st.integers(0, 65535)),
    st.binary(max_size=40),
    st.integers(0, 80),
)
def test_mutated_queries(name: str, qtype: int, edns: int | None, junk: bytes, cut: int) -> None:
    data = m.encode_query(name, qtype, ident=1, edns_size=edns)
    check(data)
    check(data + junk)
    check(data[: max(0, len(data) - cut)])
    if junk:
        position = junk[0] % len(data)
        check(data[:position] + junk + data[position + len(junk) :])


@given(st.lists(st.integers(0, 255), min_size=1, max_size=300), st.integers(0, 0x3FFF))
def test_pointer_chains(bytes_: list[int], pointer: int) -> None:
    body = bytes(bytes_)
    data = (
        struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0)
        + body
        + struct.pack("!H", 0xC000 | pointer)
        + b"\x00\x01\x00\x01"
    )
    check(data)
