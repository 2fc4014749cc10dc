"""Which conntrack entries the cleanup deletes: pure selection, no kernel (the namespace test
tests/netns/test_stale_conntrack.py does it for real)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from agent.config import InterceptSettings
from agent.intercept.conntrack import Address, Flow, local_sockets, stale
from agent.intercept.plan import Plan, build_plan

HERE = ipaddress.ip_address("198.18.1.1")
HERE6 = ipaddress.ip_address("2001:db8:1::1")
PEER = ipaddress.ip_address("198.18.1.2")
LOCAL: frozenset[Address] = frozenset({HERE, HERE6})


def make(**kw: Any) -> Plan:
    result = build_plan(InterceptSettings(proxy_user=4190, **kw), authority=[("198.18.9.9", 8443)])
    assert isinstance(result, Plan), result
    return result


def out(dport: int, dst: str = "198.18.1.2", **kw: Any) -> Flow:
    return Flow(4, HERE, 40000, ipaddress.ip_address(dst), dport, nat=kw.pop("nat", False), **kw)


def inn(dport: int, src: str = "198.18.1.2", **kw: Any) -> Flow:
    return Flow(4, ipaddress.ip_address(src), 40000, HERE, dport, nat=kw.pop("nat", False), **kw)


CASES = [
    pytest.param({}, out(8080), True, id="outbound-app"),
    pytest.param({}, inn(8080), True, id="inbound-app"),
    pytest.param({}, Flow(6, HERE6, 1, ipaddress.ip_address("2001:db8:1::2"), 80, False), True, id="ipv6"),
    pytest.param(
        {"ipv6": False},
        Flow(6, HERE6, 1, ipaddress.ip_address("2001:db8:1::2"), 80, False),
        False,
        id="ipv6-off",
    ),
    pytest.param({}, out(8080, nat=True), False, id="nated-by-anyone"),
    pytest.param({}, out(8080, state="TIME_WAIT"), False, id="time-wait-is-replaced-by-a-new-syn"),
    pytest.param({}, out(8080, state="CLOSE"), True, id="close-is-not"),
    pytest.param({}, out(8080, zone=3), False, id="other-zone"),
    pytest.param({}, out(22), False, id="ssh-out"),
    pytest.param({}, inn(22), False, id="ssh-in"),
    pytest.param({}, inn(4191), False, id="admin-port"),
    pytest.param({}, inn(4143), False, id="proxy-listener"),
    pytest.param({}, out(8443, dst="198.18.9.9"), False, id="authority"),
    pytest.param({}, out(80, dst="198.18.9.9"), True, id="authority-address-other-port"),
    pytest.param({}, out(8080, dst="127.0.0.1"), False, id="loopback"),
    pytest.param({}, out(8080, dst="198.18.1.1"), False, id="own-address"),
    pytest.param({}, Flow(4, PEER, 1, ipaddress.ip_address("198.18.2.9"), 80, False), False, id="forwarded"),
    pytest.param({"outbound_skip_cidrs": ["198.18.1.0/24"]}, out(8080), False, id="skipped-cidr"),
    pytest.param({"outbound_cidrs": ["198.18.7.0/24"]}, out(8080), False, id="not-a-captured-cidr"),
    pytest.param({"outbound_ports": [80]}, out(8080), False, id="not-a-captured-port"),
    pytest.param({"inbound_ports": [80]}, inn(8080), False, id="not-a-captured-inbound-port"),
    pytest.param({"inbound_skip_cidrs": ["198.18.1.0/24"]}, inn(8080), False, id="skipped-source"),
    pytest.param({"skip_uids": [0]}, out(8080), True, id="uid-unknown-from-the-entry"),
    pytest.param({"inbound_mode": "tproxy"}, inn(8080), True, id="tproxy-inbound"),
]


@pytest.mark.parametrize(("settings", "flow", "deleted"), CASES)
def test_selection(settings: dict[str, Any], flow: Flow, deleted: bool) -> None:
    assert stale(make(**settings), [flow], LOCAL, frozenset()) == ([flow] if deleted else [])


def test_a_live_socket_keeps_its_entry() -> None:
    o, i = out(8080), inn(8080)
    sockets = frozenset({((HERE, 40000), (PEER, 8080)), ((HERE, 8080), (PEER, 40000))})
    assert stale(make(), [o, i], LOCAL, sockets) == []


def test_proc_net_tcp_parsing(tmp_path: Path) -> None:
    tcp = tmp_path / "tcp"
    tcp.write_text(
        "  sl  local_address rem_address   st\n"
        "   0: 0101A8C0:9C40 0201A8C0:1F90 01 00000000:00000000\n"  # 192.168.1.1:40000 -> .2:8080
    )
    tcp6 = tmp_path / "tcp6"
    tcp6.write_text(
        "  sl  local_address                         remote_address\n"
        "   0: 0000000000000000FFFF00000101A8C0:1F90 0000000000000000FFFF00000201A8C0:9C40 01\n"
        "   1: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:9C41 01\n"
    )
    a, b = ipaddress.ip_address("192.168.1.1"), ipaddress.ip_address("192.168.1.2")
    six_a, six_b = ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")
    assert local_sockets([tcp, tcp6, tmp_path / "missing"]) == {
        ((a, 40000), (b, 8080)),
        ((a, 8080), (b, 40000)),
        ((six_a, 22), (six_b, 40001)),
    }


def test_a_failing_child_is_an_intercept_error() -> None:
    """The netlink children's failures reach the caller as values it can act on."""
    from agent.intercept.errors import InterceptError
    from agent.intercept.tools import child

    with pytest.raises(InterceptError, match=r"failed \(exit 1\)"):
        child("no_such_module", [], None, 30)
