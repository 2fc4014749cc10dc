"""`stop_capture`: at stop nothing new is captured, but a connection already redirected keeps its
NAT while the proxy drains (deleting our nft table there reset it: the namespace lost its
conntrack and NAT hooks). The namespace test runs `nft` only inside a namespace of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.intercept.apply import HOLD_COMMENT, hold_text
from agent.netlab import Host, Lab, netns_supported

REPO = Path(__file__).resolve().parents[2]


def test_hold_text_replaces_each_present_table_with_one_that_captures_nothing() -> None:
    text = hold_text(["inet"])
    assert text.startswith("table inet meshagent\ndelete table inet meshagent\n")
    assert HOLD_COMMENT in text
    assert "type nat hook prerouting" in text and "type nat hook output" in text
    assert "ct state established" in text  # the ct expression that keeps conntrack's hooks
    rules = text.replace(HOLD_COMMENT, "")
    assert "redirect" not in rules and "tproxy" not in rules and "reject" not in rules
    assert hold_text([]) == ""
    assert hold_text(["ip", "ip6"]).count("type nat hook prerouting") == 2


ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 4143)); s.listen(5)
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
    b.popen(sys.executable, "-c", ECHO)
    time.sleep(0.3)
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
