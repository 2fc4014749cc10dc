"""Host metadata: parsing, bounds, errors that name the field, the SLO spec syntax."""

from __future__ import annotations

import json

import pytest

from agent.authority.host_meta import (
    MAX_DOC_BYTES,
    HostMeta,
    MetaInvalid,
    Slo,
    loads_meta,
    merge_links,
    merge_slos,
    parse_meta,
    parse_slo_spec,
)


def full_doc() -> dict[str, object]:
    return {
        "owner_team": "payments",
        "owner_contact": "#payments-oncall",
        "description": "Ledger\nthe legacy one",
        "system": "billing",
        "tier": "1",
        "links": [{"title": "runbook", "url": "https://wiki.example/ledger"}],
        "slos": [
            {"name": "availability", "kind": "availability", "objective": 99.9},
            "latency=99:300ms,port=8080",
        ],
    }


def test_round_trip() -> None:
    meta = parse_meta(full_doc())
    assert meta.owner_team == "payments"
    assert meta.links == (("runbook", "https://wiki.example/ledger"),)
    assert meta.slos == (
        Slo("availability", "availability", 99.9),
        Slo("latency", "latency", 99.0, 28, 300, "inbound", 8080),
    )
    assert parse_meta(meta.to_doc()) == meta
    assert loads_meta(meta.to_json()) == meta
    assert loads_meta("") == HostMeta() and HostMeta().empty


def test_links_as_mapping() -> None:
    meta = parse_meta({"links": {"runbook": "http://a.example/", "repo": "https://git.example/x"}})
    assert meta.links == (("runbook", "http://a.example/"), ("repo", "https://git.example/x"))


def test_html_is_text() -> None:
    evil = "<script>alert(1)</script><b>x</b>"
    assert parse_meta({"description": evil, "owner_team": evil}).description == evil


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("availability=99.9", Slo("availability", "availability", 99.9)),
        ("latency=99:300ms", Slo("latency", "latency", 99.0, threshold_ms=300)),
        ("latency=99.5:1s,window=7d", Slo("latency", "latency", 99.5, 7, 1000)),
        (
            "availability=99, window=30, direction=outbound, port=5432, name=db-calls",
            Slo("db-calls", "availability", 99.0, 30, None, "outbound", 5432),
        ),
    ],
)
def test_spec(spec: str, expected: Slo) -> None:
    slo = parse_slo_spec(spec)
    assert slo == expected
    assert parse_slo_spec(slo.spec()) == slo


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        (
            {"slos": ["availability=99.9", {"kind": "availability", "objective": 100, "name": "b"}]},
            "slos[1].objective",
            "must be between 50 and 100 (exclusive), got 100",
        ),
        ({"slos": ["availability=50"]}, "slos[0].objective", "got 50"),
        ({"slos": ["latency=99:250ms"]}, "slos[0].threshold_ms", "not a bucket bound"),
        ({"slos": ["latency=99"]}, "slos[0]", "PERCENT:THRESHOLD"),
        ({"slos": ["availability=99.9", "availability=99"]}, "slos[1].name", "appears twice"),
        ({"slos": ["availability=99.9,window=91d"]}, "slos[0].window_days", "between 1 and 90"),
        ({"slos": ["availability=99.9,port=0"]}, "slos[0].port", "1..65535"),
        ({"slos": ["availability=99.9,direction=sideways"]}, "slos[0].direction", "inbound or outbound"),
        ({"slos": ["availability=99.9,name=Bad Name"]}, "slos[0].name", "[a-z0-9-]"),
        ({"slos": ["availability=abc"]}, "slos[0].objective", "must be a number"),
        ({"slos": ["availability=99.9,colour=red"]}, "slos[0]", "not one of window="),
        ({"slos": ["uptime=99"]}, "slos[0]", "does not start with"),
        ({"slos": [f"availability=99,name=s{i}" for i in range(11)]}, "slos", "at most 10"),
        ({"links": [{"title": "x", "url": "javascript:alert(1)"}]}, "links[0].url", "http(s)"),
        ({"links": [{"title": "x", "url": "ftp://a.example/"}]}, "links[0].url", "http(s)"),
        ({"links": [{"title": "", "url": "https://a.example/"}]}, "links[0].title", "empty"),
        ({"links": {f"l{i}": "https://a.example/" for i in range(11)}}, "links", "at most 10"),
        ({"owner_team": "x" * 201}, "owner_team", "at most 200"),
        ({"description": "x" * 2001}, "description", "at most 2000"),
        ({"owner_team": "a\x1bb"}, "owner_team", "control character"),
        ({"owner_team": "a\nb"}, "owner_team", "control character"),
        ({"description": "a\x00b"}, "description", "control character"),
        ({"owner_team": ["a"]}, "owner_team", "must be text"),
        ({"owner": "a"}, "owner", "unknown field"),
        ({"slos": [{"kind": "availability", "objective": 99, "colour": 1}]}, "slos[0].colour", "unknown"),
        ("just text", "metadata", "mapping"),
    ],
)
def test_refused_naming_the_field(doc: object, field: str, words: str) -> None:
    with pytest.raises(MetaInvalid) as caught:
        parse_meta(doc)
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert words in caught.value.message
    assert caught.value.hint


def test_whole_document_bounded() -> None:
    links = {f"link-{i}": "https://a.example/" + "p" * 1900 for i in range(9)}
    doc = {"description": "d" * 2000, "links": links}
    with pytest.raises(MetaInvalid) as caught:
        parse_meta(doc)
    assert caught.value.field == "metadata"
    assert str(MAX_DOC_BYTES) in caught.value.message
    del links["link-8"], links["link-7"]
    assert len(parse_meta(doc).to_json()) <= MAX_DOC_BYTES


def test_merges() -> None:
    links = merge_links(
        [("a", "https://a/"), ("b", "https://b/")], [("a", "https://a2/"), ("b", ""), ("c", "https://c/")]
    )
    assert links == (("a", "https://a2/"), ("c", "https://c/"))
    slos = merge_slos(
        [parse_slo_spec("availability=99")],
        [parse_slo_spec("availability=99.9"), parse_slo_spec("latency=99:300ms")],
    )
    assert [s.spec() for s in slos] == ["availability=99.9", "latency=99:300ms"]


def test_doc_is_json_plain() -> None:
    assert json.loads(parse_meta(full_doc()).to_json())["slos"][1]["port"] == 8080
