"""`meshagent run` with `[dns] enabled = true`, in network namespaces with real kernels: host `a`
runs the agent, whose resolv.conf names dnsmasq on `b` (198.18.1.2 and 2001:db8:1::2); the
agent's directory (its cache file, as a restart reads it) holds the Service `orders.shop`.
dnsmasq also answers `orders.shop.svc.cluster.local` itself, with another address, so whoever
answered is visible.

- the cluster name gets the Service's cluster IP (A over UDP and TCP, AAAA via the v6 resolver);
- other names get exactly the resolver's bytes (the same query sent direct, with the agent's mark);
- a flood is bounded and counted, the agent stays alive and answering;
- resolv.conf is byte-identical before, during and after;
- SIGHUP with a changed directory: the new Service's name is answered;
- TCP capture (intercept) on as well: TCP DNS to the resolver still reaches the stub;
- SIGTERM: the redirect goes at once; SIGSTOP (hung) and SIGKILL: it lapses by its own
  timeout (fail open), SIGCONT brings it back, and `meshagent intercept remove` deletes the
  table the dead agent left.

Run under `flock /tmp/meshagent-netns.lock`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.dns import message as m
from agent.netlab import Host, Lab, netns_supported
from tests.support import MESHAGENT, issue_identity

pytestmark = pytest.mark.netns
pytest.importorskip("dns.message", reason="dnspython (a dev dependency) reads the answers")
import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.rcode  # noqa: E402

HERE = Path(__file__).parent
RESOLVER, RESOLVER6 = "198.18.1.2", "2001:db8:1::2"
MARK = 0x1000000  # intercept.proxy_mark's default: the agent's upstream queries carry it
CLUSTER_IP, CLUSTER_IP6 = "198.19.0.10", "fd00::10"
DNSMASQ_SAYS = "192.0.2.99"  # dnsmasq's own answer for the cluster name
NAME = "orders.shop.svc.cluster.local"
SERVICES = [
    {
        "name": "orders",
        "namespace": "shop",
        "cluster_ips": [CLUSTER_IP, CLUSTER_IP6],
        "ports": [{"port": 80, "name": "http", "protocol": "TCP", "opaque": False}],
        "endpoints": [],
    }
]


class World:
    def __init__(self, lab: Lab, a: Host, tmp: Path) -> None:
        self.lab, self.a, self.tmp = lab, a, tmp
        self.resolv = tmp / "resolv.conf"
        self.config = tmp / "agent.toml"
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        seen = self.log.stat().st_size if self.log.exists() else 0  # an earlier run's lines
        out = open(self.log, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = self.a.popen(*MESHAGENT, "run", "--config", str(self.config), stdout=out, stderr=out)
        self.wait(lambda: "daemon.ready" in self.log.read_text()[seen:], "agent ready")
        return self.proc

    def wait(self, check: Callable[[], object], what: str, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while not check():
            if self.proc is not None and self.proc.poll() is not None and "ready" in what:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            assert time.monotonic() < end, f"not within {timeout}s: {what}\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def query(self, data: bytes, tcp: bool = False, mark: int = 0, server: str = RESOLVER) -> bytes | None:
        out = self.a.run(
            sys.executable,
            str(HERE / "dns_client.py"),
            "tcp" if tcp else "udp",
            server,
            "53",
            data.hex(),
            str(mark),
        ).stdout.strip()
        return None if out == "TIMEOUT" else bytes.fromhex(out)

    def addresses(self, name: str, qtype: int = m.TYPE_A, **kw: Any) -> list[str]:
        answer = self.query(m.encode_query(name, qtype), **kw)
        assert answer is not None, name
        msg = dns.message.from_wire(answer)
        return [r.address for rrset in msg.answer for r in rrset]

    def state_doc(self, services: list[dict[str, Any]]) -> None:
        """The directory as the agent caches it (read at start and on SIGHUP)."""
        doc = {"catalog": [], "policy": {}, "services": services}
        (self.tmp / "state" / "host-config.json").write_text(json.dumps(doc))

    def admin(self, path: str) -> str:
        return self.a.run("curl", "-sf", f"http://127.0.0.1:4191{path}").stdout

    def table(self) -> str:
        return self.a.run("nft", "list", "tables").stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = netns_supported()
    for tool in ("dnsmasq", "nft", "curl"):
        reason = reason or (None if shutil.which(tool) else f"{tool} is not installed")
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("agentdns")
    state = tmp / "state"
    issue_identity(tmp / "authority", "shop/billing", state)  # the authority itself never runs
    with Lab("ad") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b)
        w = World(lab, a, tmp)
        w.state_doc(SERVICES)
        w.resolv.write_text(
            f"# a host's resolv.conf\nnameserver {RESOLVER}\nnameserver {RESOLVER6}\noptions edns0\n"
        )
        w.config.write_text(
            f'[identity]\nstate_dir = "{state}"\n[log]\nlevel = "debug"\n'
            # TCP capture on too: TCP DNS to the resolver must reach the stub, not the proxy.
            # Test clients run as root: only the agent's mark exempts its own traffic.
            "[intercept]\nproxy_user = 65534\n"
            "[proxy]\nrefresh_interval_s = 300\ndrain_timeout_s = 1.0\n"
            f'[dns]\nenabled = true\nresolv_conf = "{w.resolv}"\n'
            "per_source_qps = 50\nper_source_burst = 100\nmax_inflight = 8\n"
        )
        b.popen(
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={RESOLVER},{RESOLVER6}", "--port=53",
            "--user=root", f"--pid-file={tmp}/dnsmasq.pid", "--local-ttl=60",
            "--address=/www.public.example/192.0.2.8",
            f"--address=/{NAME}/{DNSMASQ_SAYS}",
            *[f"--txt-record=big.public.example,{'x' * 200}{i}" for i in range(8)],
            "--server=/slow.example/198.18.1.99",
        )  # fmt: skip
        w.wait(lambda: w.addresses("www.public.example") == ["192.0.2.8"], "dnsmasq answers")
        try:
            yield w
        finally:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(timeout=10)


def test_run_answers_cluster_names_forwards_the_rest_and_stops_clean(world: World) -> None:
    w = world
    before = w.resolv.read_bytes()
    proc = w.start()
    assert "meshagent_dns" in w.table()

    # the Service's name: its cluster IPs, authoritative, over UDP and TCP, via either resolver
    answer = w.query(m.encode_query("Orders.Shop.svc.cluster.local", m.TYPE_A, ident=0x5151))
    assert answer is not None
    msg = dns.message.from_wire(answer)
    assert msg.id == 0x5151 and msg.flags & dns.flags.AA
    assert [r.address for r in msg.answer[0]] == [CLUSTER_IP]
    assert w.addresses(NAME, tcp=True) == [CLUSTER_IP]
    assert w.addresses(NAME, m.TYPE_AAAA, server=RESOLVER6) == [CLUSTER_IP6]
    nx = dns.message.from_wire(w.query(m.encode_query("nope.shop.svc.cluster.local", m.TYPE_A)) or b"")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert w.addresses("orders.shop") == []  # short forms are off by default: forwarded, dnsmasq has none

    # everything else: exactly the resolver's bytes
    for data, tcp in [
        (m.encode_query("www.public.example", m.TYPE_A, ident=1), False),
        (m.encode_query("WWW.Public.Example", m.TYPE_A, ident=2, edns_size=4096, do=True), False),
        (m.encode_query("missing.public.example", m.TYPE_A, ident=3), False),
        (m.encode_query("big.public.example", 16, ident=4), False),  # TC from the resolver
        (m.encode_query("big.public.example", 16, ident=5), True),
    ]:
        for server in (RESOLVER, RESOLVER6):
            via_stub = w.query(data, tcp=tcp, server=server)
            assert via_stub is not None and via_stub == w.query(data, tcp=tcp, mark=MARK, server=server)

    status = json.loads(w.admin("/status"))["dns"]
    assert status["enabled"] and status["redirect_installed"] and status["names"] == 1
    assert status["stub_addresses"] == status["upstreams"] == [RESOLVER, RESOLVER6]
    assert status["counts"]["answer"] == 3 and status["counts"]["nxdomain"] == 1
    assert status["counts"]["forwarded"] == status["counts"]["forward_answered"] >= 11
    assert status["counts"]["dropped_loop"] == 0
    assert 'meshagent_dns_responses_total{outcome="answer"} 3' in w.admin("/metrics")
    assert w.resolv.read_bytes() == before

    # a directory change (here the cache re-read on SIGHUP; the refresh loop calls the same
    # `_use`) reaches the stub's names
    w.state_doc([*SERVICES, {**SERVICES[0], "name": "payments", "cluster_ips": ["198.19.0.20"]}])
    proc.send_signal(signal.SIGHUP)
    w.wait(lambda: w.addresses("payments.shop.svc.cluster.local") == ["198.19.0.20"], "the new name")
    w.state_doc(SERVICES)

    # a flood through the redirect, to a name whose upstream never answers: bounded and counted.
    # Each of its queries is forwarded or dropped (by rate or the in-flight cap), nothing else.
    def counts() -> dict[str, int]:
        return json.loads(w.admin("/status"))["dns"]["counts"]  # type: ignore[no-any-return]

    def moved(now: dict[str, int], key: str) -> int:
        return now[key] - was[key]

    was = counts()
    w.a.run(sys.executable, str(HERE / "dns_client.py"), "flood", RESOLVER, "53", "600", "slow.example")
    w.wait(
        lambda: (
            (now := counts())
            and moved(now, "dropped_rate") >= 1
            and moved(now, "dropped_inflight") >= 1
            and moved(now, "queries_udp")
            == moved(now, "forwarded") + moved(now, "dropped_rate") + moved(now, "dropped_inflight")
        ),
        "the flood dropped by rate and in-flight caps, and counted",
    )
    now = counts()
    assert 100 <= moved(now, "queries_udp") <= 600 and moved(now, "forwarded") < 200
    assert json.loads(w.admin("/status"))["dns"]["inflight"] <= 8
    w.wait(lambda: w.addresses(NAME) == [CLUSTER_IP], "answering after the flood")  # its bucket refills
    assert proc.poll() is None

    # a clean stop: the table goes before the agent exits; DNS reaches the resolver directly
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert "meshagent_dns" not in w.table()
    assert w.addresses(NAME) == [DNSMASQ_SAYS]
    assert w.resolv.read_bytes() == before


def test_hang_and_sigkill_fail_open_and_remove_cleans_up(world: World) -> None:
    w = world
    before = w.resolv.read_bytes()
    proc = w.start()
    assert w.addresses(NAME) == [CLUSTER_IP]
    direct = m.encode_query(NAME, m.TYPE_A, ident=9)

    def lapsed() -> bool:
        # Until the elements expire a query meets the frozen or dead stub and times out, as
        # the app's would once (its resolver retries); then the resolver answers.
        return w.query(direct) == w.query(direct, mark=MARK) is not None

    # hung (SIGSTOP): nobody refreshes the elements, DNS goes straight to the resolver; back
    # (SIGCONT), the next heartbeat redirects again
    proc.send_signal(signal.SIGSTOP)
    w.wait(lapsed, "the redirect lapses while the agent hangs", 15)
    proc.send_signal(signal.SIGCONT)
    w.wait(lambda: w.addresses(NAME) == [CLUSTER_IP], "the redirect is back")

    proc.kill()  # no cleanup runs: only the set's timeout can end the redirect
    proc.wait(timeout=10)
    w.wait(lapsed, "the redirect lapses after SIGKILL", 15)
    assert w.addresses(NAME) == [DNSMASQ_SAYS]
    data = m.encode_query("www.public.example", m.TYPE_A, ident=7)
    assert w.query(data) == w.query(data, mark=MARK) is not None
    assert w.query(data, server=RESOLVER6) == w.query(data, mark=MARK, server=RESOLVER6) is not None
    assert "meshagent_dns" in w.table()  # left behind, inert
    # TCP DNS, like all captured TCP, waits for the unit's ExecStopPost: `intercept remove`
    removed = w.a.run(*MESHAGENT, "intercept", "remove").stdout
    assert "meshagent_dns" in removed and "meshagent_dns" not in w.table()
    assert w.query(data, tcp=True, server=RESOLVER6) == w.query(data, tcp=True, mark=MARK, server=RESOLVER6)
    assert w.resolv.read_bytes() == before
