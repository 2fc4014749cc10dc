"""The name table (agent/dns/names.py) and the decision for one message (agent/dns/stub.py):
what the stub owns, what it answers, and that everything else is forwarded untouched."""

from __future__ import annotations

import pytest

from agent.dns import message as m
from agent.dns.names import EMPTY, MISSING, NOT_OURS, Found, ServiceAddress, build_table, domain_labels
from agent.dns.stub import FORWARD, Answer, Drop, RateLimiter, decide

SERVICES = [
    ServiceAddress("orders", "shop", ("10.96.0.10", "fd00::10")),
    ServiceAddress("web", "shop", ("10.96.0.20",)),
    ServiceAddress("v6only", "shop", ("fd00::30",)),
    ServiceAddress("headless", "shop", ()),
    ServiceAddress("Bad_Name", "shop", ("10.0.0.1",)),
    ServiceAddress("typo", "shop", ("10.0.0.999", "10.96.0.40")),
]
DOMAIN = domain_labels("cluster.local")
assert isinstance(DOMAIN, tuple)
TABLE = build_table(SERVICES, DOMAIN, short_forms=False)
SHORT = build_table(SERVICES, DOMAIN, short_forms=True)


def labels(name: str) -> tuple[bytes, ...]:
    return tuple(p.encode() for p in name.split(".") if p)


@pytest.mark.parametrize(
    ("name", "short", "expected"),
    [
        ("orders.shop.svc.cluster.local", False, Found(("10.96.0.10",), ("fd00::10",), True)),
        ("web.shop.svc.cluster.local", False, Found(("10.96.0.20",), (), True)),
        ("headless.shop.svc.cluster.local", False, Found((), (), True)),
        ("typo.shop.svc.cluster.local", False, Found(("10.96.0.40",), (), True)),
        ("nope.shop.svc.cluster.local", False, MISSING),
        ("orders.other.svc.cluster.local", False, MISSING),
        ("shop.svc.cluster.local", False, EMPTY),
        ("other.svc.cluster.local", False, MISSING),
        ("svc.cluster.local", False, EMPTY),
        ("_http._tcp.orders.shop.svc.cluster.local", False, MISSING),
        ("orders.shop.svc.cluster.local.shop.svc.cluster.local", False, MISSING),
        ("cluster.local", False, NOT_OURS),
        ("x.pod.cluster.local", False, NOT_OURS),
        ("example.com", False, NOT_OURS),
        ("svc.cluster.local.example.com", False, NOT_OURS),
        ("local", False, NOT_OURS),
        ("", False, NOT_OURS),
        ("orders.shop", False, NOT_OURS),
        ("orders.shop", True, Found(("10.96.0.10",), ("fd00::10",), False)),
        ("orders.shop.svc", True, Found(("10.96.0.10",), ("fd00::10",), False)),
        ("orders.shop.svc.", True, Found(("10.96.0.10",), ("fd00::10",), False)),
        ("example.com", True, NOT_OURS),  # an unknown a.b is someone else's name
        ("nope.shop", True, NOT_OURS),
        ("nope.shop.svc", True, NOT_OURS),
        ("orders.shop.com", True, NOT_OURS),
        ("orders", True, NOT_OURS),
    ],
    ids=lambda v: str(v) if isinstance(v, str | bool) else "",
)
def test_lookup(name: str, short: bool, expected: object) -> None:
    assert (SHORT if short else TABLE).lookup(labels(name)) == expected


def test_bad_entries_are_skipped_with_reasons() -> None:
    assert len(TABLE) == 5
    reasons = dict(TABLE.skipped)
    assert "DNS labels" in reasons["Bad_Name.shop"]
    assert "'10.0.0.999' is not an IP address" in reasons["typo.shop"]


def test_duplicates_merge_in_order() -> None:
    table = build_table(
        [
            ServiceAddress("a", "b", ("10.0.0.2", "10.0.0.1")),
            ServiceAddress("a", "b", ("10.0.0.1", "10.0.0.3")),
        ],
        DOMAIN,
    )
    assert table.lookup(labels("a.b.svc.cluster.local")) == Found(
        ("10.0.0.2", "10.0.0.1", "10.0.0.3"), (), True
    )


@pytest.mark.parametrize(
    ("domain", "ok"),
    [
        ("cluster.local", True),
        ("Corp.Example.COM.", True),
        ("", False),
        ("a..b", False),
        ("-a.b", False),
        ("a b", False),
    ],
)
def test_domain_labels(domain: str, ok: bool) -> None:
    assert isinstance(domain_labels(domain), tuple) is ok


def test_custom_cluster_domain() -> None:
    corp = domain_labels("k8s.corp.example")
    assert isinstance(corp, tuple)
    table = build_table(SERVICES, corp)
    assert isinstance(table.lookup(labels("orders.shop.svc.k8s.corp.example")), Found)
    assert table.lookup(labels("orders.shop.svc.cluster.local")) == NOT_OURS
    assert table.lookup(labels("www.k8s.corp.example")) == NOT_OURS  # outside svc.: forwarded


# -- decide(): one message in, one decision out


def answer_of(name: str, qtype: int, table: object = TABLE, **kw: object) -> Answer:
    decision = decide(m.encode_query(name, qtype, ident=77, **kw), table, 5, over_tcp=False)  # type: ignore[arg-type]
    assert isinstance(decision, Answer), decision
    return decision


@pytest.mark.parametrize(
    ("name", "qtype", "outcome", "rcode", "ancount", "nscount"),
    [
        ("orders.shop.svc.cluster.local", m.TYPE_A, "answer", m.NOERROR, 1, 0),
        ("orders.shop.svc.cluster.local", m.TYPE_AAAA, "answer", m.NOERROR, 1, 0),
        ("orders.shop.svc.cluster.local", m.TYPE_ANY, "answer", m.NOERROR, 2, 0),
        ("ORDERS.Shop.SVC.cluster.local", m.TYPE_A, "answer", m.NOERROR, 1, 0),
        ("web.shop.svc.cluster.local", m.TYPE_AAAA, "nodata", m.NOERROR, 0, 1),
        ("v6only.shop.svc.cluster.local", m.TYPE_A, "nodata", m.NOERROR, 0, 1),
        ("orders.shop.svc.cluster.local", 16, "nodata", m.NOERROR, 0, 1),  # TXT
        ("orders.shop.svc.cluster.local", 65, "nodata", m.NOERROR, 0, 1),  # HTTPS
        ("headless.shop.svc.cluster.local", m.TYPE_A, "nodata", m.NOERROR, 0, 1),
        ("shop.svc.cluster.local", m.TYPE_A, "nodata", m.NOERROR, 0, 1),
        ("nope.shop.svc.cluster.local", m.TYPE_A, "nxdomain", m.NXDOMAIN, 0, 1),
        ("nope.shop.svc.cluster.local", m.TYPE_AAAA, "nxdomain", m.NXDOMAIN, 0, 1),
    ],
)
def test_decide_answers(name: str, qtype: int, outcome: str, rcode: int, ancount: int, nscount: int) -> None:
    answer = answer_of(name, qtype)
    assert answer.outcome == outcome
    assert answer.data[:2] == (77).to_bytes(2, "big")
    assert answer.data[3] & 0xF == rcode
    assert int.from_bytes(answer.data[6:8], "big") == ancount
    assert int.from_bytes(answer.data[8:10], "big") == nscount


def test_short_form_nodata_carries_no_soa() -> None:
    answer = answer_of("web.shop", m.TYPE_AAAA, table=SHORT)
    assert answer.outcome == "nodata" and answer.data[8:10] == b"\x00\x00"


@pytest.mark.parametrize(
    "data",
    [
        m.encode_query("example.com", m.TYPE_A),
        m.encode_query("cluster.local", m.TYPE_SOA),
        m.encode_query("orders.shop", m.TYPE_A),  # short forms off
        m.encode_query("x.pod.cluster.local", m.TYPE_A),
        # opcode NOTIFY for a name we own: not a QUERY, not ours to answer
        bytes([0, 1, 0x20, 0]) + m.encode_query("orders.shop.svc.cluster.local", 1)[4:],
        # class CH (version.bind-style) for a name we own
        m.encode_query("orders.shop.svc.cluster.local", 1)[:-2] + b"\x00\x03",
        # unreadable: two questions, a looping pointer, a cut OPT: the upstream answers those
        bytes(m.encode_query("a.b", 1)[:4]) + b"\x00\x02" + m.encode_query("a.b", 1)[6:],
        m.encode_query("a.b", 1)[:12] + b"\x01a\xc0\x0c\x00\x01\x00\x01",
        m.encode_query("orders.shop.svc.cluster.local", 1, edns_size=512)[:-3],
    ],
    ids=["public", "apex-soa", "short-off", "pod-name", "notify", "class-ch", "two-q", "loop", "cut-opt"],
)
def test_decide_forwards_what_is_not_ours(data: bytes) -> None:
    assert decide(data, TABLE, 5, over_tcp=False) is FORWARD


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"\x00\x01", "short"), (b"\x00\x01\x80" + b"\x00" * 9, "not_query")],
)
def test_decide_drops_only_headerless_and_responses(data: bytes, reason: str) -> None:
    assert decide(data, TABLE, 5, over_tcp=False) == Drop(reason)


def test_udp_truncation_and_tcp_room() -> None:
    many = build_table(
        [ServiceAddress("big", "shop", tuple(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(60)))], DOMAIN
    )
    query = m.encode_query("big.shop.svc.cluster.local", m.TYPE_A)
    udp = decide(query, many, 5, over_tcp=False)
    assert isinstance(udp, Answer) and udp.outcome == "truncated" and len(udp.data) <= 512
    tcp = decide(query, many, 5, over_tcp=True)
    assert isinstance(tcp, Answer) and tcp.outcome == "answer" and len(tcp.data) > 512
    edns = decide(
        m.encode_query("big.shop.svc.cluster.local", m.TYPE_A, edns_size=4096), many, 5, over_tcp=False
    )
    assert isinstance(edns, Answer) and edns.outcome == "answer"


# -- RateLimiter


def test_rate_limiter_burst_then_rate() -> None:
    limiter = RateLimiter(rate=10.0, burst=3.0)
    assert [limiter.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0.0)  # another source has its own bucket
    assert not limiter.allow("a", 0.05)  # half a token
    assert limiter.allow("a", 0.1)
    assert [limiter.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1.0, max_sources=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
