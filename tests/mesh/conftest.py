"""A small mesh in network namespaces: an authority "cluster" host and two agent hosts.

    cl (authority, unmeshed client) --198.18.1.0/24-- a (meshed client)
    cl --198.18.2.0/24-- b (legacy server)        a --198.18.3.0/24-- b

Each agent host is enrolled at the authority and runs `meshagent run` with interception.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

import pytest

from agent.netlab import Host, Lab, netns_supported
from tests.support import MESHAGENT, metric_sum

AUTH_PORT = 8443


@dataclass
class Agent:
    host: Host
    state: Path
    config: Path
    log: Path
    proc: Popen[str] | None = None

    def start(self) -> None:
        # Only this run's lines count: a restart appends to the same log, where the previous
        # run's "daemon.ready" would otherwise end the wait before the new agent is ready.
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = self.host.popen(*MESHAGENT, "run", "--config", str(self.config), stdout=out, stderr=out)
        ready = lambda: b"daemon.ready" in self.log.read_bytes()[offset:]  # noqa: E731
        wait_for(ready, f"{self.host.name}: agent ready", self)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=30)


def wait_for(check: object, what: str, agent: Agent | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(f"{what}: agent exited {agent.proc.returncode}:\n{agent.log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{agent.log.read_text()}" if agent else ""))


def fresh_metrics(
    host: Host, url: str = "http://127.0.0.1:4191/metrics", agent: Agent | None = None, timeout: float = 20
) -> str:
    """An agent's /metrics from a pull that every worker answered (no
    `meshagent_worker_snapshot_stale` 1; the inline proxy has no pull). A worker late for the
    supervisor's 1 s pull is served from its previous dump, which an exact count cannot trust.
    A worker answers its control frames in order, so such a pull also proves every worker applied
    what the supervisor broadcast before it (a reload's or refresh's directory: no reply awaited)."""
    text: list[str] = []

    def complete() -> bool:
        out = host.run("curl", "-sf", "--max-time", "10", url, check=False)
        text[:] = [out.stdout]
        return out.returncode == 0 and metric_sum(out.stdout, "meshagent_worker_snapshot_stale") == 0

    wait_for(complete, f"{host.name}: a /metrics every worker answered", agent, timeout)
    return text[0]


@dataclass
class Mesh:
    lab: Lab
    tmp: Path
    cl: Host
    a: Host
    b: Host
    agents: dict[str, Agent] = field(default_factory=dict)
    cleanup: list[Path] = field(default_factory=list)  # directories outside tmp_path to delete

    @property
    def authority_dir(self) -> Path:
        return self.tmp / "authority"

    def iface(self, host: Host, link: int) -> str:
        """The veth device of `host` on link N (see agent/netlab.py's naming)."""
        side = (
            "a" if host.addr4[[int(x.split(".")[2]) for x in host.addr4].index(link)].endswith(".1") else "b"
        )
        return f"{self.lab.tag[-9:]}{side}{link}"

    def cli(self, host: Host, *args: str) -> str:
        return host.run(*MESHAGENT, *args).stdout

    def enroll(
        self,
        host: Host,
        identity: str,
        url_ip: str,
        addresses: list[str],
        inbound_policy: str = "all-unauthenticated",
        extra_config: str = "",
        token_args: tuple[str, ...] = (),
    ) -> Agent:
        token = self.cli(
            self.cl,
            "authority",
            "token",
            "create",
            "--dir",
            str(self.authority_dir),
            "--identity",
            identity,
            "--url",
            f"https://{url_ip}:{AUTH_PORT}",
            *token_args,  # e.g. --port http=8080 (the ports a TrafficSplit root of hosts uses)
        ).strip()
        state = self.tmp / f"state-{host.name}"
        self.cli(
            host,
            "enroll",
            token,
            "--state-dir",
            str(state),
            "--host-name",
            host.name,
            *[f"--address={a}" for a in addresses],
        )
        config = self.tmp / f"agent-{host.name}.toml"
        config.write_text(
            f'[identity]\nstate_dir = "{state}"\n'
            '[log]\nlevel = "debug"\n'
            # Test clients run as root: only the proxy's mark exempts its own traffic.
            "[intercept]\nproxy_user = 65534\n"
            "[proxy]\nrefresh_interval_s = 1.0\ndrain_timeout_s = 2.0\n"
            f'[inbound]\ndefault_policy = "{inbound_policy}"\n' + extra_config
        )
        agent = Agent(host, state, config, self.tmp / f"agent-{host.name}.log")
        self.agents[host.name] = agent
        return agent


def serve_authority(m: Mesh, tmp_path: Path, *args: str) -> None:
    """`authority serve` (with `args`, e.g. "--prometheus", URL) in the mesh's `cl` host, once
    it answers (the lab ends it)."""
    log = open(tmp_path / "authority.log", "a")  # noqa: SIM115 - lives as long as the process
    m.cl.popen(
        *MESHAGENT,
        "authority",
        "serve",
        "--dir",
        str(m.authority_dir),
        "--listen",
        f"0.0.0.0:{AUTH_PORT}",
        *args,
        stdout=log,
        stderr=log,
    )
    wait_for(
        lambda: (
            m.cl.run("curl", "-sfk", f"https://198.18.1.1:{AUTH_PORT}/healthz", check=False).returncode == 0
        ),
        "authority up",
    )


def stop_agents(m: Mesh) -> None:
    """Stop every agent still running (before the lab ends the rest)."""
    for agent in m.agents.values():
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop()


@contextlib.contextmanager
def build_mesh(tmp_path: Path, *init_args: str) -> Iterator[Mesh]:
    """The three hosts, the authority serving in `cl`; everything removed on exit."""
    with Lab("mm") as lab:
        cl, a, b = lab.host("cl"), lab.host("a"), lab.host("b")
        lab.link(cl, a)
        lab.link(cl, b)
        lab.link(a, b)
        m = Mesh(lab, tmp_path, cl, a, b)
        cl.run(
            *MESHAGENT,
            "authority",
            "init",
            "--dir",
            str(m.authority_dir),
            "--trust-domain",
            "cluster.local",
            "--san",
            "198.18.1.1",
            "--san",
            "198.18.2.1",
            *init_args,
        )
        serve_authority(m, tmp_path)
        try:
            yield m
        finally:
            stop_agents(m)
            lab.close()  # ends every process before their directories go
            for path in m.cleanup:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    reason = netns_supported()
    if reason:
        pytest.skip(reason)
    with build_mesh(tmp_path) as m:
        yield m


PY = sys.executable
