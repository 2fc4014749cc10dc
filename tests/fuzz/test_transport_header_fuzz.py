"""Property tests of Linkerd's transport header (agent/proxy/transport_header.py): any bytes in
any reads give NEED_DATA or one final decision, never an exception, never more held than the
bound, the same decision wherever the reads were cut; every valid header round-trips, with
unknown fields of every wire type in between, and the bytes after it are kept exactly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.transport_header import (
    MAX_BODY_LEN,
    MAX_BUFFERED,
    PREFACE,
    REFUSAL_REASONS,
    HeaderReader,
    HeaderRefused,
    NeedData,
    SessionProtocol,
    TransportHeader,
    encode,
    encode_body,
)
from tests.linkerd.wire import prefaced as framed
from tests.linkerd.wire import varint

from .strategies import cut_points, split_at

pytestmark = pytest.mark.timeout(120)


# Bytes that reach every step: no preface, a preface cut anywhere, any length (small ones
# most), bodies of junk or of protobuf-looking fields.
lengths = st.integers(0, 40) | st.integers(0, MAX_BODY_LEN + 10) | st.integers(0, 2**32 - 1)
hostile = st.one_of(
    st.binary(max_size=200),
    st.integers(0, len(PREFACE)).flatmap(lambda n: st.binary(max_size=60).map(lambda b: PREFACE[:n] + b)),
    st.tuples(lengths, st.binary(max_size=300)).map(lambda t: PREFACE + t[0].to_bytes(4, "big") + t[1]),
    st.binary(max_size=120).map(framed),
)


def run(data: bytes, cuts: list[int]) -> tuple[TransportHeader | HeaderRefused, bytes]:
    reader = HeaderReader()
    decided: TransportHeader | HeaderRefused | None = None
    for piece in split_at(data, cuts):
        result = reader.feed(piece)  # whatever the bytes: no exception
        assert reader.buffered <= MAX_BUFFERED
        if decided is not None:
            assert result == decided  # a decision is final
        elif not isinstance(result, NeedData):
            decided = result
            assert reader.buffered == 0
    if decided is None:
        decided = reader.eof()
        assert decided == HeaderRefused("truncated")
    if isinstance(decided, HeaderRefused):
        assert decided.reason in REFUSAL_REASONS
        return decided, b""
    assert 1 <= decided.port <= 0xFFFF
    return decided, reader.rest


@given(hostile, cut_points)
def test_any_bytes_in_any_reads_give_one_decision_within_the_bound(data: bytes, cuts: list[int]) -> None:
    assert run(data, cuts) == run(data, [])  # where the reads were cut does not matter


@given(st.binary(min_size=1, max_size=2000), cut_points)
def test_a_length_over_the_bound_is_refused_whatever_follows(more: bytes, cuts: list[int]) -> None:
    data = PREFACE + (MAX_BODY_LEN + 1).to_bytes(4, "big") + more
    assert run(data, cuts) == (HeaderRefused("too_large"), b"")


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,8}[A-Za-z0-9_])?"
names = (
    st.lists(st.from_regex(_LABEL, fullmatch=True), min_size=1, max_size=6)
    .filter(lambda labels: not labels[-1].isdigit())
    .flatmap(lambda labels: st.sampled_from([".".join(labels), ".".join(labels) + "."]))
)
headers = st.builds(
    TransportHeader,
    port=st.integers(1, 0xFFFF),
    name=st.just("") | names,
    session_protocol=st.none() | st.sampled_from(SessionProtocol),
)


@given(headers, st.binary(max_size=100), cut_points)
def test_valid_headers_round_trip(header: TransportHeader, after: bytes, cuts: list[int]) -> None:
    expected = TransportHeader(header.port, header.name.lower(), header.session_protocol)
    assert run(encode(header) + after, cuts) == (expected, after)


# Unknown fields (numbers 4 and up) of every wire type, groups holding fields of their own.
numbers = st.integers(4, 2**29 - 1)
scalar_fields = st.one_of(
    st.tuples(numbers, st.integers(0, 2**64 - 1)).map(lambda t: varint(t[0] << 3) + varint(t[1])),
    st.tuples(numbers, st.binary(min_size=8, max_size=8)).map(lambda t: varint(t[0] << 3 | 1) + t[1]),
    st.tuples(numbers, st.binary(max_size=20)).map(
        lambda t: varint(t[0] << 3 | 2) + varint(len(t[1])) + t[1]
    ),
    st.tuples(numbers, st.binary(min_size=4, max_size=4)).map(lambda t: varint(t[0] << 3 | 5) + t[1]),
)
unknown_fields = st.recursive(
    scalar_fields,
    lambda inner: st.tuples(numbers, st.lists(inner, max_size=3)).map(
        lambda t: varint(t[0] << 3 | 3) + b"".join(t[1]) + varint(t[0] << 3 | 4)
    ),
    max_leaves=8,
)


@given(headers, st.lists(unknown_fields, max_size=4), st.integers(0, 4), cut_points)
def test_unknown_fields_anywhere_are_skipped(
    header: TransportHeader, unknown: list[bytes], at: int, cuts: list[int]
) -> None:
    body = encode_body(header)
    # Between fields: the body's fields start at known offsets, so insert before or after all.
    body = b"".join(unknown[:at]) + body + b"".join(unknown[at:])
    expected = TransportHeader(header.port, header.name.lower(), header.session_protocol)
    assert run(framed(body), cuts) == (expected, b"")
