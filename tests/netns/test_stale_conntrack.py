"""No connection skips the mesh through a stale conntrack entry (issue #15).

The NAT rules only see a conntrack flow's first packet: a new connection whose 4-tuple meets a
stale, un-redirected entry would never be captured. Each case makes such an entry for real (a
SYN or a RST dropped by a temporary nft table, sockets destroyed with `ss -K`), then connects
again from the same source port and asks who answered: the proxy (captured), or a refusal (the
guard's reset), but never the app itself (a bypass).

Both hosts run a conntrack-using firewall (`ct state established,related accept`, as most hosts
do): that is what keeps entries alive while no rules of ours are in. An agent restart is what
the unit does with `remove-rules`: rules removed, later applied again by `run` (`apply_plan`,
which `intercept apply` calls too).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent.netlab import Host, Lab

from .intercept_support import (
    BACKENDS,
    CLIENT_PYTHON,
    PROXY_MARK,
    PROXY_UID,
    WHO,
    meshagent,
    meshagent_json,
    require_backend,
    start_who,
    who,
    write_config,
)

pytestmark = pytest.mark.netns

APP = 8080
HOST_FIREWALL = """\
table inet hostfw {
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
	}
}
"""
# priority raw: before conntrack, so the entry never sees the dropped packet
DROP_RST = """\
table inet stale {
	chain out {
		type filter hook output priority raw; policy accept;
		tcp flags & rst == rst drop
	}
}
"""
DROP_SYN_TO_APP = f"""\
table inet stale {{
	chain in {{
		type filter hook input priority filter; policy accept;
		tcp dport {APP} tcp flags & (syn | ack) == syn drop
	}}
}}
"""
RESET_SYN_TO_APP = f"""\
table inet stale {{
	chain in {{
		type filter hook input priority filter; policy accept;
		tcp dport {APP} tcp flags & (syn | ack) == syn reject with tcp reset
	}}
}}
"""


def temporary(host: Host, ruleset: str) -> None:
    host.run("nft", "-f", "-", input=ruleset)


def done(host: Host) -> None:
    host.run("nft", "delete", "table", "inet", "stale")


def conntrack_state(host: Host, sport: int, dport: int = APP) -> str:
    """The TCP state of `host`'s conntrack entry whose original tuple has these ports ("" if none)."""
    for line in host.run("cat", "/proc/net/nf_conntrack").stdout.splitlines():
        fields = line.split()
        if "tcp" in fields[:3] and f"sport={sport}" in fields and f"dport={dport}" in fields:
            first = fields.index(f"sport={sport}")
            if fields[first + 1] == f"dport={dport}":
                return fields[5]
    return ""


def wait_for(host: Host, sport: int, state: str, port: int = APP) -> None:
    deadline = time.monotonic() + 10
    while conntrack_state(host, sport) != state:
        assert time.monotonic() < deadline, (
            f"no {state} entry for port {sport}: {conntrack_state(host, sport)!r}"
        )
        time.sleep(0.02)


def hold(host: Host, ip: str, sport: int, how: str = "open", port: int = APP) -> subprocess.Popen[str]:
    argv = [CLIENT_PYTHON, WHO, "connect", ip, str(port), "--sport", str(sport), "--hold", how]
    proc = host.popen(*argv, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "connected"
    return proc


def vanish(client: Host, server: Host, sport: int, proc: subprocess.Popen[str]) -> None:
    """Both sockets of a connection gone without a RST anyone's conntrack sees."""
    temporary(client, DROP_RST)
    temporary(server, DROP_RST)
    client.run("ss", "-K", "-t", "sport", "=", f":{sport}")
    server.run("ss", "-K", "-t", "dport", "=", f":{sport}")
    proc.kill()
    proc.wait(timeout=10)
    done(client)
    done(server)


def make_stale(client: Host, server: Host, state: str, sport: int, family: int = 4, port: int = APP) -> None:
    """Leave `client` and `server` with a conntrack entry for client:sport -> server:APP in `state`."""
    ip = server.ip(family)
    if state == "CLOSE":  # the server reset the connection
        proc = hold(client, ip, sport, port=port)
        server.run("ss", "-K", "-t", "dport", "=", f":{sport}")
        wait_for(client, sport, "CLOSE", port)
        proc.kill()
        proc.wait(timeout=10)
    elif state == "SYN_SENT":  # no answer
        temporary(server, DROP_SYN_TO_APP)
        assert "error" in who(client, ip, APP, sport=sport, timeout=0.5)
        done(server)
    elif state == "ESTABLISHED":  # both sockets gone
        vanish(client, server, sport, hold(client, ip, sport, port=port))
    elif state == "CLOSE_WAIT":  # the server closed, then both sockets went
        proc = hold(client, ip, sport, "answered", port)
        wait_for(client, sport, "CLOSE_WAIT", port)  # the client's ACK of the server's FIN is out
        vanish(client, server, sport, proc)
    else:
        raise ValueError(state)


@pytest.fixture
def hosts(lab: Lab, two_hosts: tuple[Host, Host]) -> tuple[Host, Host]:
    a, b = two_hosts
    for host, name in ((a, "a"), (b, "b")):
        host.run("nft", "-f", "-", input=HOST_FIREWALL)
        start_who(host, f"app-{name}", f":::{APP}")
        start_who(host, f"outbound-{name}", ":::4140")
        start_who(host, f"inbound-{name}", ":::4143")
        start_who(host, f"ssh-{name}", ":::22")
    return a, b


def config(tmp_path: Path, backend: str) -> Path:
    return write_config(tmp_path / "agent.toml", backend=backend, proxy_user=PROXY_UID, proxy_mark=PROXY_MARK)


CLIENT_STATES = ("CLOSE", "SYN_SENT", "ESTABLISHED", "CLOSE_WAIT")


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_agent_restart(hosts: tuple[Host, Host], tmp_path: Path, backend: str) -> None:
    """Client host a: entries made while its agent was stopped; after the restart's apply, the
    app's new connection on the same 4-tuple goes to the proxy."""
    a, b = hosts
    require_backend(a, backend)
    cfg = config(tmp_path, backend)
    meshagent(a, "intercept", "apply", "--config", str(cfg))
    meshagent(a, "intercept", "remove")  # the agent stops (remove-rules)
    cases = [(state, 4, 41000 + i) for i, state in enumerate(CLIENT_STATES)] + [("ESTABLISHED", 6, 41100)]
    made = {}
    for state, family, sport in cases:
        make_stale(a, b, state, sport, family)
        made[(state, family)] = conntrack_state(a, sport)
    assert made == {(s, f): s for s, f, _ in cases}, "each stale state was made"
    meshagent(a, "intercept", "apply", "--config", str(cfg))  # the agent is back
    answered = {(s, f): who(a, b.ip(f), APP, sport=p).get("role") for s, f, p in cases}
    assert answered == {(s, f): "outbound-a" for s, f, _ in cases}


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_agent_restart(hosts: tuple[Host, Host], tmp_path: Path, backend: str) -> None:
    """Server host b: a client's stale entries (after the app's reset, or both sockets gone)
    must not carry a new plaintext connection past the inbound proxy (and its policy)."""
    a, b = hosts
    require_backend(b, backend)
    cfg = config(tmp_path, backend)
    cases = [("CLOSE", 4, 42000), ("ESTABLISHED", 4, 42001), ("ESTABLISHED", 6, 42002)]
    for state, family, sport in cases:
        make_stale(a, b, state, sport, family)
    made = {(s, f): conntrack_state(b, p) for s, f, p in cases}
    assert made == {(s, f): s for s, f, _ in cases}, "each stale state was made"
    meshagent(b, "intercept", "apply", "--config", str(cfg))
    answered = {(s, f): who(a, b.ip(f), APP, sport=p).get("role") for s, f, p in cases}
    assert answered == {(s, f): "inbound-b" for s, f, _ in cases}


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_failed_connect_leaves_no_open_door(
    hosts: tuple[Host, Host], tmp_path: Path, backend: str
) -> None:
    """No restart: the proxy's own connect (exempt by uid) gets no answer and leaves SYN_SENT;
    the app's later connection from the same source port is refused, never sent in clear."""
    a, b = hosts
    require_backend(a, backend)
    meshagent(a, "intercept", "apply", "--config", str(config(tmp_path, backend)))
    results = {}
    for family, sport, exempt in ((4, 43000, {"user": PROXY_UID}), (6, 43001, {"mark": PROXY_MARK})):
        temporary(b, DROP_SYN_TO_APP)
        assert "error" in who(a, b.ip(family), APP, sport=sport, timeout=0.5, **exempt)
        done(b)
        assert conntrack_state(a, sport) == "SYN_SENT"
        reply = who(a, b.ip(family), APP, sport=sport)
        results[family] = reply.get("role", "refused" if "error" in reply else "?")
        # and the next connection, from another port, is meshed as usual
        assert who(a, b.ip(family), APP).get("role") == "outbound-a"
    assert results == {4: "refused", 6: "refused"}


def test_cleanup_spares_live_excluded_and_nated_entries(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """Only the stale entry of a captured flow goes: a live connection opened before the rules,
    a stale SSH entry, and a connection someone else NATed all keep theirs."""
    a, b = hosts
    docker = (
        "table ip docker {\n chain out {\n type nat hook output priority -150;\n"
        f" tcp dport 9999 dnat to {b.ip4}:{APP}\n }}\n}}\n"
    )
    a.run("nft", "-f", "-", input=docker)
    live = hold(a, b.ip4, 44000)
    make_stale(a, b, "ESTABLISHED", 44001, port=22)
    make_stale(a, b, "ESTABLISHED", 44002)
    assert "role" in who(a, b.ip4, 9999, sport=44003)  # DNATed by "docker", answered, closed
    before = {p: conntrack_state(a, p, port) for p, port in ((44000, APP), (44001, 22), (44003, 9999))}
    assert before == {44000: "ESTABLISHED", 44001: "ESTABLISHED", 44003: "TIME_WAIT"}
    state = meshagent_json(a, "intercept", "apply", "--config", str(config(tmp_path, "nft")))
    assert state["conntrack_cleared"] == [f"{a.ip4}:44002->{b.ip4}:{APP} ESTABLISHED"]
    assert conntrack_state(a, 44002) == ""
    after = {p: conntrack_state(a, p, port) for p, port in ((44000, APP), (44001, 22), (44003, 9999))}
    assert after == before
    assert live.stdin is not None
    live.stdin.close()
    assert live.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("side", "mode", "backend"),
    [
        ("client", "redirect", "nft"),
        ("server", "redirect", "nft"),
        ("server", "redirect", "iptables-nft"),
        ("server", "tproxy", "nft"),
        ("server", "tproxy", "iptables-nft"),
    ],
)
def test_guard_alone(hosts: tuple[Host, Host], tmp_path: Path, side: str, mode: str, backend: str) -> None:
    """A connection live while the rules went in keeps its entry (the cleanup never touches a
    socket's); when both its sockets vanish later, nothing deletes the entry: the guard alone
    refuses the next connection on that 4-tuple (inbound: the policy is never skipped). In
    tproxy mode it also refuses what TPROXY could not take (no transparent listener: the agent
    is down, rules kept) instead of letting it reach the app."""
    a, b = hosts
    meshed = a if side == "client" else b
    settings: dict[str, Any] = {"inbound_mode": mode}
    if mode == "tproxy":  # TPROXY needs a transparent listener
        settings["inbound_port"] = 4144
        transparent = start_who(b, "inbound-b", ":::4144", transparent=True)
    cfg = write_config(
        tmp_path / "agent.toml", backend=backend, proxy_user=PROXY_UID, proxy_mark=PROXY_MARK, **settings
    )
    live = hold(a, b.ip4, 45000)
    state = meshagent_json(meshed, "intercept", "apply", "--config", str(cfg))
    assert state["conntrack_cleared"] == []
    vanish(a, b, 45000, live)
    assert conntrack_state(meshed, 45000) == "ESTABLISHED"
    reply = who(a, b.ip4, APP, sport=45000)
    assert reply.get("role", "refused" if "error" in reply else "?") == "refused", reply
    expected = "outbound-a" if side == "client" else "inbound-b"
    assert who(a, b.ip4, APP).get("role") == expected, "other connections are captured as usual"
    if mode == "tproxy":
        transparent.terminate()
        transparent.wait(timeout=10)
        assert "error" in who(a, b.ip4, APP), "with the proxy down, tproxy fails closed"
