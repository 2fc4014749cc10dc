"""Property tests of what a host claims at enrollment (agent/identity/names.py): host names are
RFC 1123 names (shown in tables, logs and Prometheus labels: no control character gets in) and
addresses are one reachable unicast address each, in canonical form; anything else is
InvalidName."""

from __future__ import annotations

import ipaddress
import string

from hypothesis import given
from hypothesis import strategies as st

from agent.identity.names import InvalidName, validate_host_address, validate_host_name

HOST_CHARS = string.ascii_letters + string.digits + "-"


def is_host_name(text: str) -> bool:
    return 0 < len(text) <= 253 and all(
        1 <= len(label) <= 63 and all(c in HOST_CHARS for c in label) and label[0] != "-" and label[-1] != "-"
        for label in text.split(".")
    )


junk = st.sampled_from(["", "\n", "\r", "\x00", "\x1b[2J", "\t", " ", "\u202e", "é", ".", "-", "_"])
nearly_host = st.builds(
    lambda labels, inner, tail: ".".join(labels) + inner + tail,
    st.lists(st.text(HOST_CHARS, min_size=1, max_size=10), min_size=1, max_size=4),
    junk,
    junk,
)


@given(nearly_host | st.text(max_size=80))
def test_a_host_name_meets_rfc_1123_or_is_refused(text: str) -> None:
    try:
        validate_host_name(text)
    except InvalidName as exc:
        assert exc.message.isprintable()  # (repr'd, and cut: a table can show it)
        return
    assert is_host_name(text), repr(text)


addresses = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(
        ["not-an-ip", "10.0.0.0/8", "1.2.3.4:80", "fe80::1%eth0", "::ffff:10.0.0.1", "010.0.0.1"]
    ),
    st.builds(lambda ip, tail: str(ip) + tail, st.ip_addresses(), junk),
    st.text(max_size=40),
)


@given(addresses)
def test_an_address_is_one_reachable_unicast_address_or_is_refused(text: str) -> None:
    try:
        canonical = validate_host_address(text)
    except InvalidName:
        return
    ip = ipaddress.ip_address(canonical)
    assert str(ip) == canonical and ip == ipaddress.ip_address(text)
    assert not (ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local), canonical
