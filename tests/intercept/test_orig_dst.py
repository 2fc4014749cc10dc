"""orig_dst on a plain loopback connection (no firewall): the socket's own address, via=socket.

The redirected (nat) and TPROXY cases are proven with real rules in tests/netns.
"""

from __future__ import annotations

import socket

import pytest

from agent.intercept.orig_dst import OriginalDst, original_dst


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"]
)
def test_not_redirected(family: socket.AddressFamily, host: str) -> None:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection((host, port), timeout=10):
            conn, _ = listener.accept()
            with conn:
                assert original_dst(conn) == OriginalDst(host, port, "socket")


def test_str() -> None:
    assert str(OriginalDst("2001:db8::1", 80, "nat")) == "[2001:db8::1]:80"
    assert str(OriginalDst("198.18.0.1", 80, "nat")) == "198.18.0.1:80"
