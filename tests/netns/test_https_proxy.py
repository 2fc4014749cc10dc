"""Enrollment, renewal and the agent's own calls through a real egress proxy (tinyproxy).

    h (host) --198.18.1.0/24-- px (proxies) --198.18.2.0/24-- au (authority, :8443)
    h --198.18.3.0/24-- au       (only for the NO_PROXY test: the authority's other address,
                                  which px reaches too, through 198.18.2.2)

`px` does not route: the host reaches 198.18.2.2 only through a proxy's CONNECT. In px run
tinyproxy on :3128 (Basic auth), a second tinyproxy on :3129 that allows CONNECT to 443 only,
and a TLS-inspecting stand-in on :3130 (tests/netns/tools/tls_intercept_proxy.py).

Run under the shared lock: flock /tmp/meshagent-netns.lock pytest tests/netns/test_https_proxy.py
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import psutil
import pytest

from agent.errors import ExitCode
from agent.netlab import Host, Lab, netns_supported
from tests.support import MESHAGENT

AUTH = "https://198.18.2.2:8443"
AUTH_DIRECT = "https://198.18.3.2:8443"  # the authority's address on the host's own link
USER, PASSWORD = "meshuser", "s3cr3t-pw"
PROXY = f"http://{USER}:{PASSWORD}@198.18.1.2:3128"
PROXY_443_ONLY = "http://198.18.1.2:3129"
INSPECTING = "http://198.18.1.2:3130"
TOOLS = Path(__file__).parent / "tools"

pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="tinyproxy is not installed")


def wait_for(check: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def tinyproxy_conf(tmp: Path, port: int, extra: str) -> Path:
    log = tmp / f"tinyproxy-{port}.log"
    conf = tmp / f"tinyproxy-{port}.conf"
    # No User: it stays root, inside its namespace, so it can write its log in the test's tmp.
    conf.write_text(
        f"Port {port}\nListen 198.18.1.2\nTimeout 30\n"
        f'LogFile "{log}"\nLogLevel Connect\nMaxClients 20\nAllow 198.18.1.0/24\n' + extra
    )
    return conf


@dataclass
class World:
    lab: Lab
    tmp: Path
    h: Host
    px: Host
    au: Host
    inspecting: Popen[str]

    @property
    def authority_dir(self) -> Path:
        return self.tmp / "authority"

    def proxy_log(self, port: int = 3128) -> str:
        return (self.tmp / f"tinyproxy-{port}.log").read_text()

    def connects(self, target: str, port: int = 3128) -> int:
        """CONNECTs to `target` (host:port) tinyproxy on `port` has logged."""
        return len(re.findall(rf"CONNECT {re.escape(target)} ", self.proxy_log(port)))

    def token(self, url: str = AUTH, identity: str = "legacy/app") -> str:
        return self.au.run(
            *MESHAGENT, "authority", "token", "create", "--dir", str(self.authority_dir),
            "--identity", identity, "--url", url,
        ).stdout.strip()  # fmt: skip

    def enroll(self, name: str, *args: str, url: str = AUTH, env: dict[str, str] | None = None) -> Path:
        state = self.tmp / f"state-{name}"
        proc = self.h.run(
            *MESHAGENT, "enroll", self.token(url), "--state-dir", str(state), "--host-name", name,
            "--address", "198.18.1.1", "--json", *args, check=False, env=_env(env),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr
        return state

    def agent_config(self, name: str, state: Path, authority: str = "") -> Path:
        config = self.tmp / f"agent-{name}.toml"
        config.write_text(
            f'[identity]\nstate_dir = "{state}"\n[log]\nlevel = "debug"\n'
            "[intercept]\nenabled = false\n[proxy]\nrefresh_interval_s = 1.0\n" + authority
        )
        return config


# Proxy variables of the machine running the tests must not leak into the host's processes.
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy")


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    return {**{v: "" for v in _PROXY_VARS}, **(extra or {})}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("https-proxy")
    with Lab("hp") as lab:
        h, px, au = lab.host("h"), lab.host("px"), lab.host("au")
        lab.link(h, px)  # h 198.18.1.1, px 198.18.1.2
        lab.link(px, au)  # px 198.18.2.1, au 198.18.2.2
        lab.link(h, au)  # h 198.18.3.1, au 198.18.3.2
        px.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
        px.run("ip", "route", "add", "198.18.3.0/24", "via", "198.18.2.2")  # tinyproxy's own way there
        au.run(
            *MESHAGENT, "authority", "init", "--dir", str(tmp / "authority"), "--trust-domain",
            "cluster.local", "--san", "198.18.2.2",
        )  # fmt: skip
        log = open(tmp / "authority.log", "a")  # noqa: SIM115 - lives as long as the process
        au.popen(
            *MESHAGENT, "authority", "serve", "--dir", str(tmp / "authority"), "--listen", "0.0.0.0:8443",
            stdout=log, stderr=log,
        )  # fmt: skip
        for port, extra in (
            (3128, f"BasicAuth {USER} {PASSWORD}\nConnectPort 8443\n"),
            (3129, "ConnectPort 443\n"),
        ):
            out = open(tmp / f"tinyproxy-{port}.out", "a")  # noqa: SIM115 - lives as long as the process
            px.popen("tinyproxy", "-d", "-c", str(tinyproxy_conf(tmp, port, extra)), stdout=out, stderr=out)
        out = open(tmp / "inspecting.log", "a")  # noqa: SIM115 - lives as long as the process
        inspecting = px.popen(
            sys.executable,
            str(TOOLS / "tls_intercept_proxy.py"),
            "198.18.1.2",
            "3130",
            stdout=out,
            stderr=out,
        )
        wait_for(lambda: "ready" in (tmp / "inspecting.log").read_text(), "the inspecting stand-in")
        wait_for(
            lambda: px.run("curl", "-sfk", f"{AUTH}/healthz", check=False).returncode == 0, "authority up"
        )
        for port in (3128, 3129):
            wait_for(
                lambda p=port: (
                    px.run("sh", "-c", f"ss -ltn | grep -q 198.18.1.2:{p}", check=False).returncode == 0
                ),
                f"tinyproxy :{port}",
            )
        yield World(lab, tmp, h, px, au, inspecting)


def test_the_host_has_no_route_to_the_authority_but_the_proxy(world: World) -> None:
    direct = world.h.run("curl", "-sk", "--max-time", "2", f"{AUTH}/healthz", check=False)
    assert direct.returncode != 0  # no route: only the proxy's CONNECT gets there
    via = world.h.run("curl", "-sfk", "--max-time", "5", "--proxy", PROXY, f"{AUTH}/healthz", env=_env(None))
    assert via.returncode == 0


def test_enroll_renew_and_the_agent_through_tinyproxy(world: World) -> None:
    before = world.connects("198.18.2.2:8443")
    # enroll: --https-proxy, with credentials (Proxy-Authorization) that appear nowhere
    state = world.enroll("legacy1", "--https-proxy", PROXY)
    after_enroll = world.connects("198.18.2.2:8443")
    assert after_enroll >= before + 3  # discovery, the verified clock check, the enrollment
    # renew: the config key
    config = world.agent_config("legacy1", state, f'[authority]\nhttps_proxy = "{PROXY}"\n')
    renew = world.h.run(*MESHAGENT, "renew", "--config", str(config), "--json", check=False, env=_env(None))
    assert renew.returncode == 0, renew.stdout + renew.stderr
    assert world.connects("198.18.2.2:8443") == after_enroll + 1
    # the agent: the directory long poll and the health report, both through the proxy
    log = world.tmp / "agent-legacy1.log"
    out = open(log, "a")  # noqa: SIM115 - lives as long as the process
    agent = world.h.popen(*MESHAGENT, "run", "--config", str(config), stdout=out, stderr=out, env=_env(None))
    try:
        wait_for(
            lambda: "directory.refreshed" in log.read_text() and "health.reported" in log.read_text(),
            "the agent's directory and report",
        )
        assert PASSWORD not in log.read_text()
        assert world.connects("198.18.2.2:8443") >= after_enroll + 3
        # The agent's proxy client is http.client's: its memory goal holds (34 MB measured).
        rss_mb = psutil.Process(agent.pid).memory_info().rss / 2**20
        assert rss_mb < 40, f"idle RSS {rss_mb:.1f} MB"
        hosts = world.au.run(*MESHAGENT, "authority", "hosts", "--dir", str(world.authority_dir)).stdout
        assert "legacy1" in hosts
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    # The agent's renewal process (agent/identity/renew.py), handed the proxy the agent resolved
    # from its config: nothing in its own environment or config says so.
    before = world.connects("198.18.2.2:8443")
    world.h.run(sys.executable, "-c", DAEMON_RENEWAL, str(config), env=_env(None))
    assert world.connects("198.18.2.2:8443") == before + 1


DAEMON_RENEWAL = """
import sys
from pathlib import Path
from agent.config import load_config
from agent.identity.renew import run_renewal
from agent.identity.store import IdentityStore
from agent.identity.transport import resolve_proxy

config = load_config(Path(sys.argv[1]), required=True)
proxy = resolve_proxy(config.authority.https_proxy, config.authority.no_proxy)  # as Daemon does
run_renewal(IdentityStore(config.identity.state_dir), proxy)
"""


def test_no_proxy_goes_direct(world: World) -> None:
    before = world.connects("198.18.3.2:8443")
    world.enroll(
        "legacy-direct", url=AUTH_DIRECT, env={"HTTPS_PROXY": PROXY, "NO_PROXY": "localhost,198.18.3.0/24"}
    )
    assert world.connects("198.18.3.2:8443") == before
    # the same environment without the exemption: through the proxy, which tinyproxy logs
    world.enroll("legacy-via", url=AUTH_DIRECT, env={"HTTPS_PROXY": PROXY, "NO_PROXY": "localhost"})
    assert world.connects("198.18.3.2:8443") >= before + 3


def _failed_enroll(world: World, proxy: str) -> tuple[int, str]:
    proc = world.h.run(
        *MESHAGENT, "enroll", world.token(), "--state-dir", str(world.tmp / "state-refused"),
        "--https-proxy", proxy, check=False, env=_env(None),
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def test_proxy_refusals_say_which_hop_and_why(world: World) -> None:
    code, out = _failed_enroll(world, f"http://{USER}:wrong-password@198.18.1.2:3128")
    assert code == ExitCode.UNREACHABLE, out
    # tinyproxy 1.11 answers a CONNECT without valid credentials 401 (squid: 407): both say so
    assert re.search("HTTP 40[17]", out) and "credentials" in out and "wrong-password" not in out
    code, out = _failed_enroll(world, PROXY_443_ONLY)
    assert code == ExitCode.UNREACHABLE, out
    assert "HTTP 403" in out and "forbids 198.18.2.2:8443" in out
    code, out = _failed_enroll(world, "http://198.18.1.2:3999")  # nothing listens there
    assert code == ExitCode.UNREACHABLE, out
    assert "cannot reach the proxy http://198.18.1.2:3999" in out


def test_a_tls_inspecting_proxy_is_refused_by_the_pin(world: World) -> None:
    code, out = _failed_enroll(world, INSPECTING)
    assert "CONNECT 198.18.2.2:8443" in (world.tmp / "inspecting.log").read_text()  # it was in the way
    assert code == ExitCode.TRUST, out
    assert "pin mismatch" in out and "TLS-inspecting proxy" in out and "198.18.2.2:8443" in out
    # The agent's own calls (the standard-library transport), the proxy from the environment
    # this time (a unit's Environment=HTTPS_PROXY=...): refused too, nothing applied.
    state = world.enroll("legacy2", "--https-proxy", PROXY)
    config = world.agent_config("legacy2", state)
    log = world.tmp / "agent-legacy2.log"
    out_file = open(log, "a")  # noqa: SIM115 - lives as long as the process
    agent = world.h.popen(
        *MESHAGENT, "run", "--config", str(config), stdout=out_file, stderr=out_file,
        env=_env({"HTTPS_PROXY": INSPECTING}),
    )  # fmt: skip
    try:
        wait_for(
            lambda: "health.report_failed" in log.read_text() and "pin mismatch" in log.read_text(),
            "the agent's calls refused",
        )
        text = log.read_text()
        assert "directory.refreshed" not in text and "health.reported " not in text
        assert "authority_untrusted" in text
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    renew = world.h.run(
        *MESHAGENT, "renew", "--config", str(config), check=False, env=_env({"HTTPS_PROXY": INSPECTING})
    )
    assert renew.returncode == ExitCode.TRUST and "TLS-inspecting proxy" in renew.stderr
