"""What `meshagent status` prints and /metrics exports of the agent's own health: failing tasks
first, rejected directory entries, the admin port's and handshakes' counters."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from agent.cli.identity import daemon_lines
from agent.config import AgentConfig, IdentitySettings, ProxySettings
from agent.daemon import Daemon
from agent.errors import StateError

CLIENT = "spiffe://cluster.local/ns/shop/sa/web"
GOOD = {"cidr": "198.18.0.20/32", "ports": [5432], "identity": CLIENT, "server_name": "web.shop"}
BAD = {"cidr": "not-an-ip\x1b[2J/32", "ports": [], "identity": CLIENT, "server_name": "x"}
SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"\\]*"(,[a-z_]+="[^"\\]*")*\})? -?[0-9.e+]+$')


def daemon_with_a_failing_task(tmp_path: Path) -> Daemon:
    daemon = Daemon(AgentConfig(identity=IdentitySettings(state_dir=tmp_path)))
    daemon._directory({"catalog": [BAD, GOOD], "policy": {}})

    calls = 0
    third = asyncio.Event()

    async def failing() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
        raise StateError("cannot write the directory cache: Read-only file system", code="state_unwritable")

    async def fine() -> None:
        await daemon.stop_event.wait()

    async def main() -> None:
        daemon.tasks.base_s = 0.01
        daemon.tasks.start("alpha", fine)
        daemon.tasks.start("directory-refresh", failing)
        await third.wait()
        await asyncio.sleep(0)  # the supervisor records the third failure
        daemon.stop_event.set()
        await daemon.tasks.stop()

    asyncio.run(main())
    return daemon


def test_status_shows_failing_tasks_first_and_rejected_entries(tmp_path: Path) -> None:
    daemon = daemon_with_a_failing_task(tmp_path)
    lines = daemon_lines(daemon.status())
    text = "\n".join(lines)
    assert lines[0].startswith("agent         NOT READY: ")
    assert "task directory-refresh: failed 3 times in a row" in lines[0]
    assert "entries from local; 1 REJECTED (left out)" in text
    rejected = next(line for line in lines if line.startswith("  rejected"))
    assert "catalog[0]" in rejected and "not-an-ip" in rejected
    assert "\x1b" not in text and "\\x1b[2J" in rejected  # the authority's bytes made visible
    tasks = [line for line in lines if line.startswith("  task")]
    assert tasks[0].startswith("  task        directory-refresh  ")
    assert "FAILING 3 in a row" in tasks[0] and "Read-only file system" in tasks[0]
    assert tasks[1].startswith("  task        alpha  ") and "FAILING" not in tasks[1]


def test_metrics_export_rejected_entries_and_task_failures(tmp_path: Path) -> None:
    daemon = daemon_with_a_failing_task(tmp_path)
    body = daemon._metrics({}).body.decode()
    samples = [line for line in body.splitlines() if line and not line.startswith("#")]
    assert all(SAMPLE.match(line) for line in samples), [s for s in samples if not SAMPLE.match(s)]
    assert "meshagent_directory_rejected_entries 1" in samples
    failures = next(
        s for s in samples if s.startswith('meshagent_task_failures_total{task="directory-refresh"}')
    )
    assert int(failures.split()[1]) >= 3
    assert 'meshagent_task_failing{task="directory-refresh"} 3' in samples
    assert 'meshagent_task_failures_total{task="alpha"} 0' in samples
    assert "meshagent_ready 0" in samples
    assert "# TYPE meshagent_task_failures_total counter" in body


def test_metrics_count_connections_whose_accounting_stopped(tmp_path: Path) -> None:
    # An HTTP/2 client holding more unanswered streams than the accounting keeps (defect 1 of
    # #15): the connection's accounting stops, and /metrics says so with bounded labels.
    from typing import Any

    from agent.proxy import http2
    from tests.proxy.test_http2 import Recorder, raw_frame

    class Leg:
        tap: Any = None
        accounting: Any = None

    def stopped(body: str) -> int:
        prefix = 'meshagent_http_accounting_stopped_total{protocol="h2",reason="streams"} '
        return next((int(float(s[len(prefix) :])) for s in body.splitlines() if s.startswith(prefix)), 0)

    daemon = Daemon(AgentConfig(identity=IdentitySettings(state_dir=tmp_path)))
    before = stopped(daemon._metrics({}).body.decode())
    acct = http2.Http2Accounting(Recorder())
    acct.attach(Leg(), Leg())
    acct.client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    headers = b"\x82\x86\x84\x41\x01x"  # GET http://x/
    acct.client(b"".join(raw_frame(0x1, 0x4, 2 * i + 1, headers) for i in range(http2.MAX_OPEN_STREAMS + 1)))
    assert not acct.active
    body = daemon._metrics({}).body.decode()
    assert stopped(body) == before + 1
    assert "# TYPE meshagent_http_accounting_stopped_total counter" in body
    assert daemon.status()["http_accounting_stopped"]["h2:streams"] == before + 1


def test_status_names_a_failing_probe_and_a_failing_report() -> None:
    """Why the cluster may see the host not Ready: the probe, what it saw, and the report's error."""
    doc = {
        "ready": True,
        "services": 3,
        "health": {
            "probes": [
                {
                    "port": 8080,
                    "kind": "http",
                    "ok": False,
                    "detail": "GET /healthz: status 503",
                    "since": 1.0,
                },
                {"port": 5432, "kind": "tcp", "ok": True, "detail": "connected", "since": 1.0},
            ],
            "reports_sent": 4,
            "report_failures": 2,
            "last_report_error": "authority_unreachable: connection refused",
        },
    }
    lines = daemon_lines(doc)
    assert "services      3 in-cluster Services (discovered by the authority)" in lines
    assert "probes        2, 1 FAILING" in lines
    assert "  probe       http :8080 failing: GET /healthz: status 503" in lines
    assert not any(":5432" in line for line in lines)  # a passing probe is not a line
    assert "report        2 failed sends to the authority: authority_unreachable: connection refused" in lines
    quiet = daemon_lines({"ready": True, "health": {"probes": [], "reports_sent": 1}})
    assert not any(line.startswith(("probes", "report", "services")) for line in quiet)


def test_status_shows_the_dns_stub() -> None:
    dns = {
        "enabled": True,
        "redirect_installed": False,
        "stub_addresses": ["198.18.1.1"],
        "names": 2,
        "counts": {"answer": 3, "nxdomain": 1, "forwarded": 7, "dropped_rate": 2, "tcp_refused": 1},
        "heartbeat_failures": 1,
        "last_error": "nft: table busy",
    }
    lines = daemon_lines({"ready": True, "dns": dns})
    assert (
        "dns           2 names, NOT redirecting 198.18.1.1; answered 4, forwarded 7, dropped 3, "
        "heartbeat FAILING: nft: table busy"
    ) in lines
    off = daemon_lines({"ready": True, "dns": {"enabled": False}})
    assert not any(line.startswith("dns") for line in off)


def test_status_says_how_the_authority_is_reached(tmp_path: Path) -> None:
    from agent.config import AuthoritySettings

    config = AgentConfig(
        identity=IdentitySettings(state_dir=tmp_path),
        authority=AuthoritySettings(https_proxy="http://ops:hunter2@198.18.7.7:3128"),
    )
    lines = daemon_lines(Daemon(config).status())
    proxy = [line for line in lines if line.startswith("proxy ")]
    shown = "via http://ops:***@198.18.7.7:3128 (from config authority.https_proxy)"
    assert proxy == [f"proxy         authority {shown}"]
    direct = daemon_lines(Daemon(AgentConfig(identity=IdentitySettings(state_dir=tmp_path))).status())
    assert [line for line in direct if line.startswith("proxy ")] == ["proxy         authority direct"]


def test_status_says_which_relay_carries_l4_connections(tmp_path: Path) -> None:
    """`proxy.native_relay` on: the compiled relay (built where the tests run); off: Python's."""
    for native, shown in ((True, "native"), (False, "python")):
        proxy = ProxySettings(native_relay=native)
        config = AgentConfig(identity=IdentitySettings(state_dir=tmp_path), proxy=proxy)
        status = Daemon(config).status()
        assert status["relay"] == shown
        assert f"relay         {shown}" in daemon_lines(status)


def test_chain_verifications_show_in_stat_and_metrics() -> None:
    """/status `handshakes` carries the verification caches' counts (tls.py chain_checks):
    `meshagent stat` says them and /metrics exports them as one counter family."""
    from agent.telemetry.agent_metrics import render_agent

    status = {"handshakes": {"limit": 4, "active": 0, "chains_verified": 2, "chains_cached": 5}}
    line = next(line for line in daemon_lines(status) if line.startswith("handshakes"))
    assert line.endswith("peer chains verified 2, from cache 5"), line
    body = "\n".join(render_agent(status))
    assert "# TYPE meshagent_tls_chain_verifications_total counter" in body
    assert 'meshagent_tls_chain_verifications_total{result="verified"} 2' in body
    assert 'meshagent_tls_chain_verifications_total{result="cached"} 5' in body
