"""`stop_capture`: at stop nothing new is captured, but a connection already redirected keeps its
NAT while the proxy drains (deleting our nft table there reset it: the namespace lost its
conntrack and NAT hooks; removing our iptables rules did the same, in both flavours and, for
outbound connections, in tproxy mode too). The namespace tests run `nft` and `iptables` only
inside namespaces of their own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.intercept import apply, netlink, render_iptables
from agent.intercept.apply import NFT_HOLD_COMMENT, hold_text
from agent.intercept.errors import InterceptError
from agent.intercept.plan import Plan
from agent.intercept.tools import Step
from agent.netlab import Host, Lab, netns_supported
from tests.netns.intercept_support import require_backend

REPO = Path(__file__).resolve().parents[2]


def test_hold_text_replaces_each_present_table_with_one_that_captures_nothing() -> None:
    text = hold_text(["inet"])
    assert text.startswith("table inet meshagent\ndelete table inet meshagent\n")
    assert NFT_HOLD_COMMENT in text
    assert "type nat hook prerouting" in text and "type nat hook output" in text
    assert "ct state established" in text  # the ct expression that keeps conntrack's hooks
    rules = text.replace(NFT_HOLD_COMMENT, "")
    assert "redirect" not in rules and "tproxy" not in rules and "reject" not in rules
    assert hold_text([]) == ""
    assert hold_text(["ip", "ip6"]).count("type nat hook prerouting") == 2


SAVED = """*nat
:PREROUTING ACCEPT [0:0]
:MESHAGENT_INBOUND - [0:0]
:MESHAGENT_MADE_TABLE - [0:0]
-A PREROUTING -p tcp -m comment --comment "meshagent: inbound capture" -j MESHAGENT_INBOUND
-A PREROUTING -p tcp -j THEIRS
-A MESHAGENT_INBOUND -p tcp -m comment --comment "meshagent: capture" -j REDIRECT --to-ports 4143
COMMIT
*filter
:INPUT ACCEPT [0:0]
:MESHAGENT_INBOUND_GUARD - [0:0]
-A INPUT -p tcp -m comment --comment "meshagent: inbound guard" -j MESHAGENT_INBOUND_GUARD
COMMIT
"""


HOLD_RULE = (
    "-A PREROUTING -p tcp -m conntrack --ctstate ESTABLISHED "
    f'-m comment --comment "{render_iptables.HOLD_COMMENT}"'
)


def test_iptables_hold_removes_capture_keeps_markers_and_adds_one_conntrack_rule() -> None:
    text = render_iptables.hold(SAVED)
    nat, filt = text.split("COMMIT\n")[:2]
    assert (
        '-D PREROUTING -p tcp -m comment --comment "meshagent: inbound capture" -j MESHAGENT_INBOUND' in nat
    )
    assert "-X MESHAGENT_INBOUND\n" in nat
    assert "-X MESHAGENT_MADE_TABLE" not in nat  # the later remove still tidies what we created
    assert "THEIRS" not in text and "REDIRECT" not in text
    assert HOLD_RULE in nat.splitlines() and nat.count("-A ") == 1
    assert "-X MESHAGENT_INBOUND_GUARD" in filt and "-A " not in filt
    # tproxy mode: our only nat built-in chain is OUTPUT; a PREROUTING we created could not be tidied
    tproxy = SAVED.replace("-A PREROUTING -p tcp -m comment", "-A OUTPUT -p tcp -m comment")
    assert "\n-A OUTPUT -p tcp -m conntrack --ctstate ESTABLISHED" in render_iptables.hold(tproxy)
    assert render_iptables.hold("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n") == ""
    # only markers left (a remove cut short): nothing to hold, no restore run for nothing
    markers_only = "*nat\n:PREROUTING ACCEPT [0:0]\n:MESHAGENT_MADE_TABLE - [0:0]\nCOMMIT\n"
    assert render_iptables.hold(markers_only) == ""


def test_iptables_hold_twice_is_once_and_remove_takes_the_hold_and_the_markers() -> None:
    held = (  # what iptables-save prints after the hold above
        "*nat\n:PREROUTING ACCEPT [0:0]\n:MESHAGENT_MADE_TABLE - [0:0]\n-A PREROUTING -p tcp -j THEIRS\n"
        f"{HOLD_RULE}\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"
    )
    again = render_iptables.hold(held)
    assert ("-D" + HOLD_RULE[2:]) in again and again.count(HOLD_RULE) == 1
    removed = render_iptables.transaction(None, held, 4)
    assert ("-D" + HOLD_RULE[2:]) in removed and "-X MESHAGENT_MADE_TABLE" in removed and "-A " not in removed


ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 4143)); s.listen(5)
print("ready", flush=True)
c, _ = s.accept()
while (d := c.recv(100)):
    c.sendall(b"echo:" + d)
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 8080), timeout=5)
for line in sys.stdin:
    try:
        c.sendall(line.strip().encode()); print(c.recv(100).decode() or "closed", flush=True)
    except OSError as exc:
        print(type(exc).__name__, flush=True)
"""
CAPTURE = (
    "table ip meshagent {\n\tchain prerouting_nat {\n\t\ttype nat hook prerouting priority dstnat; "
    "policy accept;\n\t\ttcp dport 8080 tcp flags & (syn | ack) == syn redirect to :4143\n\t}\n}\n"
)
IN_NAMESPACE = (
    "import shutil, sys; from agent.intercept.apply import remove_all, stop_capture; "
    "from agent.intercept.nft import NftBackend; "
    "getattr(sys.modules['agent.intercept.apply'], sys.argv[1])([NftBackend(shutil.which('nft'))])"
)


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    reason = netns_supported() or (None if shutil.which("nft") else "nft is not installed")
    if reason:
        pytest.skip(reason)
    with Lab("sc") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b)
        yield a, b


def test_a_redirected_connection_survives_stop_capture_then_remove_all_removes_the_table(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    b.run("nft", "-f", "-", input=CAPTURE)  # b is the only user of conntrack and NAT there
    echo = b.popen(sys.executable, "-c", ECHO)
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"  # listening
    client = a.popen(
        sys.executable, "-c", CLIENT, b.addr4[0], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert client.stdin is not None and client.stdout is not None

    def say(word: str) -> str:
        client.stdin.write(word + "\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        return client.stdout.readline().strip()  # type: ignore[union-attr]

    assert say("one") == "echo:one"  # redirected to the "proxy" on 4143
    b.run(sys.executable, "-c", IN_NAMESPACE, "stop_capture", env={"PYTHONPATH": str(REPO)})
    held = b.run("nft", "list", "table", "ip", "meshagent").stdout
    assert "redirect to" not in held and "draining" in held
    assert say("two") == "echo:two"  # still translated while "draining"
    b.run(sys.executable, "-c", IN_NAMESPACE, "remove_all", env={"PYTHONPATH": str(REPO)})
    assert "meshagent" not in b.run("nft", "list", "tables").stdout
    client.stdin.close()
    client.wait(10)


# ---- every backend and inbound mode, with the real plan -------------------------------------

BACKENDS = ("nft", "iptables-nft", "iptables-legacy")
TOOL = {"nft": "nft", "iptables-nft": "iptables-nft-restore", "iptables-legacy": "iptables-legacy-restore"}
SERVERS = """
import socket, sys, threading
def listen(family, port, transparent):
    s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:  # TPROXY hands connections only to a transparent socket (as the agent's)
        s.setsockopt(*((socket.IPPROTO_IPV6, 75) if family == socket.AF_INET6 else (socket.SOL_IP, 19)), 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port)); s.listen(16)
    return s
def serve(s, name):
    while True:
        c, _ = s.accept()
        threading.Thread(target=echo, args=(c, name), daemon=True).start()
def echo(c, name):
    while (d := c.recv(100)):
        c.sendall(name.encode() + b":" + d)
for family in (socket.AF_INET, socket.AF_INET6):  # all bound and listening before "ready"
    for port, name, transparent in ((8080, "app", False), (4143, "inbound", sys.argv[1] == "tproxy"),
                                    (4140, "outbound", False)):
        s = listen(family, port, transparent)
        threading.Thread(target=serve, args=(s, name), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""
ONCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 8080), timeout=5)
c.sendall(b"new"); print(c.recv(100).decode() or "closed")
"""
LIBRARY = """
import json, sys
from agent.config import InterceptSettings
from agent.intercept import apply
from agent.intercept.plan import build_plan
if sys.argv[1] == "apply":
    settings = InterceptSettings(backend=sys.argv[2], inbound_mode=sys.argv[3], proxy_user=4190)
    apply.apply_plan(build_plan(settings), apply.get_backend(sys.argv[2]))
else:
    getattr(apply, sys.argv[1])()
print(json.dumps(apply.status()))
"""


def _library(host: Host, *args: str) -> dict[str, object]:
    out = host.run(sys.executable, "-c", LIBRARY, *args, env={"PYTHONPATH": str(REPO)}).stdout
    doc: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return doc


def _ruleset(host: Host, backend: str) -> str:
    """Every rule `host`'s kernel holds for `backend`, bodies included, both families."""
    if backend == "nft":
        return str(host.run("nft", "list", "ruleset").stdout)
    save = TOOL[backend].replace("-restore", "-save")
    return "".join(str(host.run(tool).stdout) for tool in (save, save.replace("iptables", "ip6tables")))


def _talker(host: Host, to: str) -> Callable[[str], str]:
    """A connection from `host` to to:8080, kept open: say(word) sends it and returns the reply."""
    client = host.popen(
        sys.executable, "-c", CLIENT, to, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert client.stdin is not None and client.stdout is not None
    stdin, stdout = client.stdin, client.stdout

    def say(word: str) -> str:
        stdin.write(word + "\n")
        stdin.flush()
        return stdout.readline().strip()

    return say


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_and_mode_keeps_draining_connections_and_captures_nothing_new(
    hosts: tuple[Host, Host], backend: str, mode: str
) -> None:
    """The real plan on b; a connection from a to b's app and one from b to a's app are captured
    by b's "proxy"; after `stop_capture` both keep working while new connections reach the apps
    themselves; after `remove_all` nothing of ours is left (rules, tables, policy routes)."""
    a, b = hosts
    for tool in (TOOL[backend], TOOL[backend].replace("iptables", "ip6tables")):  # (both families)
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    require_backend(b, backend)  # (a kernel without legacy iptables skips it)
    applied = _library(b, "apply", backend, mode)
    assert applied["applied"] and bool(applied["routes"]) == (mode == "tproxy")
    assert applied["holding"] == []
    for host, host_mode in ((a, "redirect"), (b, mode)):  # a has no rules: its "proxy" never answers
        servers = host.popen(sys.executable, "-c", SERVERS, host_mode)
        assert servers.stdout is not None and servers.stdout.readline().strip() == "ready"
    # one connection each way per family: a -> b's app (inbound), b -> a's app (outbound)
    talkers = {
        f"IPv{f} {way}": _talker(src, dst.ip(f))
        for f in (4, 6)
        for way, src, dst in (("in", a, b), ("out", b, a))
    }

    def all_say(word: str) -> dict[str, str]:
        return {name: say(word) for name, say in talkers.items()}

    def expect(word: str) -> dict[str, str]:
        return {name: f"{name.split()[1]}bound:{word}" for name in talkers}

    assert all_say("one") == expect("one")  # captured
    held = _library(b, "stop_capture")
    # tproxy: no policy route is left, and the draining connection needs none: TPROXY only took
    # connections to this host's own addresses, whose packets route locally and find the
    # accepted socket by their 4-tuple
    assert held["routes"] == []
    assert all_say("two") == expect("two"), f"a draining connection broke; b holds {held}"
    rules = _ruleset(b, backend)  # rule bodies: status() names only chains and jumps
    assert "draining" in rules and held["holding"] == [backend] and held["applied"] is False
    assert not any(word in rules for word in ("REDIRECT", "TPROXY", "redirect to", "tproxy to")), rules
    new = {
        f"IPv{f} {way}": src.run(sys.executable, "-c", ONCE, dst.ip(f), check=False).stdout.strip()
        for f in (4, 6)
        for way, src, dst in (("in", a, b), ("out", b, a))
    }
    assert set(new.values()) == {"app:new"}, f"a connection opened while draining was captured: {new}"
    assert all_say("three") == expect("three")
    removed = _library(b, "remove_all")
    assert removed == {"backends": {}, "routes": [], "applied": False, "holding": [], "dns": None}
    if backend != "iptables-legacy":  # (legacy tables cannot be deleted) what we created is gone too
        assert b.run("nft", "list", "tables").stdout.strip() == ""


class _HoldFailsBackend:
    """A backend whose first transaction (the hold) fails and whose next ones succeed."""

    name = "flaky"

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.fail_next = True

    def render(self, plan: Plan) -> str:
        return ""

    def steps(self, plan: Plan | None) -> list[Step]:
        return [Step(("true",), "", "remove our rules")]

    def run(self, steps: list[Step]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise InterceptError("restore failed: a rule changed under us", "")
        self.ran += [step.what for step in steps]

    def owned(self) -> dict[str, Any]:
        return {}


def test_a_failed_hold_removes_everything_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold that fails would leave full capture pointing at a proxy about to exit (refused
    connections for as long as nobody removes it): `stop_capture` removes everything instead."""
    monkeypatch.setattr(netlink, "remove_routes", lambda: 0)  # (the test's own namespace is not ours)
    backend = _HoldFailsBackend()
    state = apply.stop_capture([backend])
    assert backend.ran == ["remove our rules"] and state.backends == ("flaky",)


def test_status_tells_a_hold_from_capture() -> None:
    """`status()` counts a hold as not applied (it captures nothing): `meshagent check` fails on
    a drain cut short instead of reporting rules present."""
    capture = {"ipv4": {"nat": {"chains": ["MESHAGENT_INBOUND"], "jumps": [SAVED.splitlines()[4]]}}}
    held = {"ipv4": {"nat": {"chains": ["MESHAGENT_MADE_TABLE"], "jumps": [HOLD_RULE]}}}
    assert apply.is_hold(held) and not apply.is_hold(capture)
    assert apply.is_hold({"ip meshagent": hold_text(["ip"])}) and not apply.is_hold({"ip meshagent": CAPTURE})
