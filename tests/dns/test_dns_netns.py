"""The DNS stub with real kernels: a host namespace `a` whose resolver is dnsmasq on `b`
(198.18.1.2:53). In `a`, meshagent's nft table redirects UDP/TCP 53 to that resolver, and only
that, to the stub on :15053 — while the stub keeps its set element alive. The proofs:

- a cluster name gets the table's address, an unknown one NXDOMAIN;
- every other name gets exactly the bytes the resolver sends to a direct query (EDNS, DO, TC
  and the TCP retry included);
- a flood is bounded (dropped by rate and in-flight caps, counted) and the stub stays alive;
- fail open: the stub SIGKILLed, its element expires and the same queries reach dnsmasq.

Run under `flock /tmp/meshagent-netns.lock`.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.dns import message as m
from agent.netlab import Host, Lab, netns_supported

pytestmark = pytest.mark.netns
pytest.importorskip("dns.message", reason="dnspython (a dev dependency) reads the answers")
import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402

HERE = Path(__file__).parent
RESOLVER = "198.18.1.2"
RESOLVER6 = "2001:db8:1::2"
MARK = 0x1000000
TXT = "x" * 200
RULES = f"""
table inet meshagent_dns {{
  set live4 {{ type ipv4_addr . inet_service; flags timeout; }}
  set live6 {{ type ipv6_addr . inet_service; flags timeout; }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark & {MARK:#x} == {MARK:#x} return comment "the agent's own upstream queries"
    meta l4proto {{ tcp, udp }} ip daddr . th dport @live4 redirect to :15053 comment "while the stub lives"
    meta l4proto {{ tcp, udp }} ip6 daddr . th dport @live6 redirect to :15053 comment "while the stub lives"
  }}
}}
"""


def stub_conf(**over: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "upstreams": [RESOLVER],
        "listen": ["127.0.0.1", "::1"],
        "port": 15053,
        "upstream_mark": MARK,
        "per_source_qps": 50.0,
        "per_source_burst": 100.0,
        "max_inflight": 8,
        "upstream_timeout_s": 1.0,
        "services": [{"name": "orders", "namespace": "shop", "ips": ["10.96.0.10", "fd00::10"]}],
        "live": [
            {
                "set": "inet meshagent_dns live4",
                "element": f"{RESOLVER} . 53",
                "timeout": "3s",
                "every_s": "0.5",
            },
            {
                "set": "inet meshagent_dns live6",
                "element": f"{RESOLVER6} . 53",
                "timeout": "3s",
                "every_s": "0.5",
            },
        ],
    }
    conf.update(over)
    return conf


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Host, Host]]:
    reason = netns_supported() or (
        None if shutil.which("dnsmasq") else "dnsmasq (dnsmasq-base) is not installed"
    )
    if reason or shutil.which("nft") is None:
        pytest.skip(reason or "nft is not installed")
    tmp = tmp_path_factory.mktemp("dns")
    with Lab("md") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b)
        resolver = b.popen(
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={RESOLVER},{RESOLVER6}", "--port=53",
            "--user=root",
            f"--pid-file={tmp}/dnsmasq.pid", "--local-ttl=60",
            "--address=/www.public.example/192.0.2.8",
            *[f"--txt-record=big.public.example,{TXT}{i}" for i in range(8)],
            "--server=/slow.example/198.18.1.99",
        )  # fmt: skip
        a.run("nft", "-f", "-", input=RULES)
        _wait(
            lambda: query(a, m.encode_query("www.public.example", 1), mark=MARK) is not None,
            "dnsmasq answers",
        )
        assert resolver.poll() is None
        yield lab, a, b


def _wait(ok: Any, what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while not ok():
        assert time.monotonic() < end, f"not within {deadline_s}s: {what}"
        time.sleep(0.1)


def query(
    host: Host, data: bytes, tcp: bool = False, mark: int = 0, port: int = 53, server: str = RESOLVER
) -> bytes | None:
    out = host.run(
        sys.executable,
        str(HERE / "dns_client.py"),
        "tcp" if tcp else "udp",
        server,
        str(port),
        data.hex(),
        str(mark),
    )
    text = out.stdout.strip()
    return None if text == "TIMEOUT" else bytes.fromhex(text)


def start_stub(lab: Lab, a: Host, **over: Any) -> Any:
    proc = a.popen(
        sys.executable,
        str(HERE / "stub_runner.py"),
        json.dumps(stub_conf(**over)),
        cwd=str(HERE.parent.parent),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.stderr else ""
    _wait(
        lambda: f"{RESOLVER6} . 53" in a.run("nft", "list", "set", "inet", "meshagent_dns", "live6").stdout,
        "heartbeat",
    )
    return proc


def stats(proc: Any) -> dict[str, int]:
    proc.send_signal(signal.SIGUSR1)
    return json.loads(proc.stdout.readline())


def test_names_answers_and_fail_open(world: tuple[Lab, Host, Host]) -> None:
    lab, a, _ = world
    proc = start_stub(lab, a)

    # a cluster name: the table's address, authoritative, the client's ID and case
    answer = query(a, m.encode_query("Orders.Shop.svc.cluster.local", m.TYPE_A, ident=0x5151, edns_size=1232))
    assert answer is not None
    msg = dns.message.from_wire(answer)
    assert msg.id == 0x5151 and msg.flags & dns.flags.AA
    assert [r.address for r in msg.answer[0]] == ["10.96.0.10"]
    msg = dns.message.from_wire(query(a, m.encode_query("orders.shop.svc.cluster.local", m.TYPE_AAAA)) or b"")
    assert [r.address for r in msg.answer[0]] == ["fd00::10"]
    msg = dns.message.from_wire(query(a, m.encode_query("orders.shop", m.TYPE_A), tcp=True) or b"")
    assert [r.address for r in msg.answer[0]] == ["10.96.0.10"]  # short form, over TCP

    # an unknown cluster name: NXDOMAIN with the zone's SOA
    msg = dns.message.from_wire(query(a, m.encode_query("nope.shop.svc.cluster.local", m.TYPE_A)) or b"")
    assert msg.rcode() == dns.rcode.NXDOMAIN and msg.authority[0].name.to_text() == "cluster.local."

    # other names: exactly the resolver's bytes, same query sent directly (with the agent's mark)
    msg = dns.message.from_wire(
        query(a, m.encode_query("orders.shop.svc.cluster.local", 28), server=RESOLVER6) or b""
    )
    assert [r.address for r in msg.answer[0]] == ["fd00::10"]  # a v6 resolver address is redirected too

    for data, tcp in [
        (m.encode_query("www.public.example", m.TYPE_A, ident=1), False),
        (m.encode_query("WWW.Public.Example", m.TYPE_A, ident=2, edns_size=4096, do=True), False),
        (m.encode_query("www.public.example", m.TYPE_AAAA, ident=3), False),
        (m.encode_query("missing.public.example", m.TYPE_A, ident=4), False),
        (m.encode_query("big.public.example", 16, ident=5), False),  # > 512: TC from the resolver
        (m.encode_query("big.public.example", 16, ident=6), True),  # the client's TCP retry
        (m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A)[:-2] + b"\x00\x03", False),  # class CH
    ]:
        for server in (RESOLVER, RESOLVER6):
            via_stub = query(a, data, tcp=tcp, server=server)
            direct = query(a, data, tcp=tcp, mark=MARK, server=server)
            assert via_stub is not None and via_stub == direct, (data, via_stub, direct)
    big_udp = query(a, m.encode_query("big.public.example", 16, ident=5))
    assert big_udp is not None and m.is_truncated(big_udp)

    counted = stats(proc)
    assert counted["answer"] == 4 and counted["nxdomain"] == 1
    assert counted["forwarded"] == counted["forward_answered"] >= 14
    assert counted.get("dropped_loop", 0) == 0

    # fail open: SIGKILL (no cleanup runs); the element expires and DNS reaches the resolver
    proc.kill()
    proc.wait(timeout=10)
    _wait(
        lambda: "elements" not in a.run("nft", "list", "ruleset").stdout,
        "expiry",
    )
    data = m.encode_query("www.public.example", m.TYPE_A, ident=7)
    assert query(a, data) == query(a, data, mark=MARK) is not None
    assert query(a, data, server=RESOLVER6) == query(a, data, mark=MARK, server=RESOLVER6) is not None
    cluster = query(a, m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A))
    assert (
        cluster is not None and not dns.message.from_wire(cluster).flags & dns.flags.AA
    )  # dnsmasq's, not ours


def test_flood_is_bounded(world: tuple[Lab, Host, Host]) -> None:
    lab, a, _ = world
    proc = start_stub(lab, a)
    try:
        # 600 queries at once from one source to names the resolver cannot answer quickly:
        # at most `max_inflight` are forwarded at a time, the rest beyond the burst is rate-dropped
        a.run(
            sys.executable, str(HERE / "dns_client.py"), "flood", "127.0.0.1", "15053", "600", "slow.example"
        )
        counted = stats(proc)
        assert counted["queries_udp"] == 600
        assert counted["dropped_rate"] >= 1 and counted["dropped_inflight"] >= 1
        assert counted["forwarded"] + counted["dropped_rate"] + counted["dropped_inflight"] == 600
        assert counted["forwarded"] <= 100  # the burst, at most
        assert counted["inflight"] <= 8
        # alive and answering (another source, so another bucket)
        msg = dns.message.from_wire(
            query(a, m.encode_query("orders.shop.svc.cluster.local", m.TYPE_A)) or b""
        )
        assert [r.address for r in msg.answer[0]] == ["10.96.0.10"]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
