"""Property tests of protocol detection (agent/proxy/detect.py): any first bytes give a decision
or NEED_DATA, never an exception; more bytes never take a decision back; the SNI it reads is what
a real ClientHello carried."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.detect import MAX_PEEK, NEED_DATA, Detected, Protocol, detect

PREFIXES = [
    b"\x16\x03\x01",
    b"\x16\x03\x03\x02\x00\x01",
    b"\x16\x01",
    b"PRI * HTTP/2.0\r\n",
    b"GET ",
    b"HEAD",
    b"CONNECT ",
]
first_bytes = (st.sampled_from(PREFIXES) | st.just(b"")).flatmap(
    lambda prefix: st.binary(max_size=600).map(lambda rest: prefix + rest)
)


@given(first_bytes)
def test_any_first_bytes_give_a_decision_or_need_data(data: bytes) -> None:
    result = detect(data)
    assert result is NEED_DATA or isinstance(result, Detected)
    if isinstance(result, Detected) and result.sni is not None:
        assert result.protocol is Protocol.TLS
        assert result.sni.isascii() and result.sni == result.sni.lower()


@given(first_bytes, st.binary(max_size=200))
def test_more_bytes_never_change_a_decision(data: bytes, more: bytes) -> None:
    result = detect(data)
    if isinstance(result, Detected):
        assert detect(data + more) == result


@given(first_bytes)
def test_every_prefix_of_decided_bytes_waits_or_agrees(data: bytes) -> None:
    # What the listener does: detect on what has come so far, again with each read.
    final = detect(data)
    for i in range(len(data)):
        early = detect(data[:i])
        assert early is NEED_DATA or early == final, (i, early, final)


def test_bytes_past_the_peek_limit_are_decided() -> None:
    # A ClientHello record that claims more than the peek limit: TLS, not a wait for ever.
    header = b"\x16\x03\x01\xff\xff"
    assert detect(header + b"\x01" * (MAX_PEEK - len(header))) == Detected(Protocol.TLS)


@pytest.mark.parametrize("name", ["shop.example", "billing.shop.svc.cluster.local", "X.Example"])
def test_a_real_client_hello_gives_its_sni(name: str) -> None:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert detect(hello) == Detected(Protocol.TLS, name.lower())
    for i in range(1, len(hello)):  # cut anywhere: a wait, then the same answer
        assert detect(hello[:i]) is NEED_DATA
