from __future__ import annotations

from pathlib import Path

import pytest

from agent.dns.upstreams import parse_resolv_conf, read_upstreams


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n", ("127.0.0.53",)),
        (
            "nameserver 10.0.0.2\nnameserver 2001:db8::53\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n",
            ("10.0.0.2", "2001:db8::53", "10.0.0.3"),
        ),
        ("# nameserver 1.1.1.1\n;nameserver 8.8.8.8\nnameserver 9.9.9.9 # quad9\n", ("9.9.9.9",)),
        ("nameserver dns.example\nnameserver 300.1.1.1\nnameserver\n", ()),
        ("nameserver fe80::1%eth0\n", ("fe80::1%eth0",)),
        ("  nameserver   192.0.2.1  \nnameserver 192.0.2.1\n", ("192.0.2.1",)),
        ("", ()),
    ],
    ids=["resolved", "max-three", "comments", "not-addresses", "link-local-scope", "spaces-dupes", "empty"],
)
def test_parse_resolv_conf(text: str, expected: tuple[str, ...]) -> None:
    assert parse_resolv_conf(text) == expected


def test_read_upstreams_says_why(tmp_path: Path) -> None:
    assert "cannot read" in str(read_upstreams(tmp_path / "missing"))
    (tmp_path / "r").write_text("search example\n")
    assert "names no nameserver" in str(read_upstreams(tmp_path / "r"))
    (tmp_path / "r").write_text("nameserver 192.0.2.53\n")
    assert read_upstreams(tmp_path / "r") == ("192.0.2.53",)
