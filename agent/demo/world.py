"""The demo's small world, built in network namespaces and always taken down again.

    cluster  198.18.1.1 | 198.18.2.1   the authority, and a meshed client (identity demo/client)
    web      198.18.1.2                a legacy host running nginx (shop/web)
    cache    198.18.2.2                a legacy host running redis (shop/cache)
    web 198.18.3.1 <-> cache 198.18.3.2  a direct link, for the call that policy refuses

Every host runs `meshagent run` with interception; the client's calls to nginx and redis are
plain HTTP and RESP, and cross the wire as mutual TLS 1.3. Each step reports what it proved.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any

from agent.errors import MeshagentError
from agent.netlab import Host, Lab

from .apps import nginx, redis, wait_until

MESHAGENT = [sys.executable, "-m", "agent.cli"]
PREFIX = "meshdemo"
TD = "cluster.local"
AUTHORITY = "198.18.1.1"
AUTH_PORT = 8443
REQUIRED = ("ip", "nft", "nginx", "redis-server", "redis-cli", "curl", "tshark")


class DemoError(MeshagentError):
    code = "demo_failed"


Report = Callable[[dict[str, Any]], None]


def preflight() -> None:
    import os

    if os.geteuid() != 0:
        raise DemoError("the demo builds network namespaces and needs root", "run it with sudo")
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"missing tools: {', '.join(missing)}", "install them with scripts/bootstrap")


@dataclass
class Agent:
    host: Host
    identity: str
    addresses: list[str]
    state: Path
    config: Path
    log: Path
    proc: Popen[str] | None = None


@dataclass
class World:
    lab: Lab
    workdir: Path
    cluster: Host
    web: Host
    cache: Host
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def authority_dir(self) -> Path:
        return self.workdir / "authority"

    def cli(self, host: Host, *args: str) -> str:
        return host.run(*MESHAGENT, *args).stdout


def build_world(keep: bool) -> World:
    """Namespaces and links; the lab prefix lets `meshagent demo down` find a kept world."""
    lab = Lab(PREFIX)
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-"))
    cluster, web, cache = lab.host("cluster"), lab.host("web"), lab.host("cache")
    lab.link(cluster, web)
    lab.link(cluster, cache)
    lab.link(web, cache)
    if keep:
        (workdir / "world.json").write_text(json.dumps({"namespaces": [h.ns for h in lab.hosts]}))
    return World(lab, workdir, cluster, web, cache)


def kept_workdirs() -> list[Path]:
    """Work directories of worlds left up with --keep (they hold a world.json)."""
    return [p.parent for p in Path(tempfile.gettempdir()).glob("meshagent-demo-*/world.json")]


def start_authority(world: World) -> None:
    world.cli(
        world.cluster,
        "authority",
        "init",
        "--dir",
        str(world.authority_dir),
        "--trust-domain",
        TD,
        "--san",
        AUTHORITY,
        "--san",
        "198.18.2.1",
    )
    log = open(world.workdir / "authority.log", "a")  # noqa: SIM115 - lives as long as the process
    world.cluster.popen(
        *MESHAGENT,
        "authority",
        "serve",
        "--dir",
        str(world.authority_dir),
        "--listen",
        f"0.0.0.0:{AUTH_PORT}",
        stdout=log,
        stderr=log,
    )
    wait_until(
        lambda: (
            world.cluster.run(
                "curl", "-sfk", f"https://{AUTHORITY}:{AUTH_PORT}/healthz", check=False
            ).returncode
            == 0
        ),
        "the authority",
    )
    # Central policy: only the client may talk to the cache.
    world.cli(
        world.cluster,
        "authority",
        "policy",
        "set",
        "--dir",
        str(world.authority_dir),
        "--identity",
        "shop/cache",
        "--default",
        "deny",
        "--allow",
        f"spiffe://{TD}/ns/demo/sa/client",
    )


def enroll(
    world: World, host: Host, identity: str, url_ip: str, addresses: list[str], inbound_policy: str
) -> tuple[Agent, dict[str, Any], float]:
    """Token, enroll, config; returns the agent, its identity document and when the token was made."""
    token_at = time.monotonic()
    token = world.cli(
        world.cluster,
        "authority",
        "token",
        "create",
        "--dir",
        str(world.authority_dir),
        "--identity",
        identity,
        "--url",
        f"https://{url_ip}:{AUTH_PORT}",
    ).strip()
    state = world.workdir / f"state-{host.name}"
    doc = json.loads(
        world.cli(
            host,
            "enroll",
            token,
            "--state-dir",
            str(state),
            "--host-name",
            host.name,
            "--json",
            *[f"--address={a}" for a in addresses],
        )
    )
    config = world.workdir / f"agent-{host.name}.toml"
    config.write_text(
        f'[identity]\nstate_dir = "{state}"\n'
        # Demo clients run as root: the proxy's own traffic is exempted by its SO_MARK instead.
        "[intercept]\nproxy_user = 65534\n"
        "[proxy]\nrefresh_interval_s = 2.0\ndrain_timeout_s = 1.0\n"
        f'[inbound]\ndefault_policy = "{inbound_policy}"\n'
    )
    agent = Agent(host, identity, addresses, state, config, world.workdir / f"agent-{host.name}.log")
    world.agents[host.name] = agent
    return agent, doc, token_at


def start_agent(agent: Agent) -> None:
    log = open(agent.log, "a")  # noqa: SIM115
    agent.proc = agent.host.popen(*MESHAGENT, "run", "--config", str(agent.config), stdout=log, stderr=log)

    def ready() -> bool:
        if agent.proc is not None and agent.proc.poll() is not None:
            raise DemoError(f"the agent on {agent.host.name} exited: {agent.log.read_text()[-1500:]}")
        return agent.host.run("curl", "-sf", "http://127.0.0.1:4191/ready", check=False).returncode == 0

    wait_until(ready, f"the agent on {agent.host.name}")


def capture(world: World, host: Host, link: int, out: Path) -> Popen[str]:
    dev = f"{world.lab.tag[-9:]}b{link}"
    proc = host.popen("tshark", "-q", "-i", dev, "-w", str(out), "-f", "tcp")
    wait_until(lambda: out.exists() and out.stat().st_size > 0, "the packet capture")
    return proc


def wire_report(host: Host, pcap: Path, port: int, marker: str) -> dict[str, Any]:
    """What the capture shows: TLS 1.3 handshakes on the app port, and whether `marker` leaked."""
    as_tls = ["-d", f"tcp.port=={port},tls"]
    hello13 = host.run(
        "tshark",
        "-r",
        str(pcap),
        *as_tls,
        "-Y",
        "tls.handshake.type == 2 && tls.handshake.extensions.supported_version == 0x0304",
        "-T",
        "fields",
        "-e",
        "tcp.stream",
    ).stdout.split()
    app_data = host.run(
        "tshark", "-r", str(pcap), *as_tls, "-Y", "tls.app_data", "-T", "fields", "-e", "tcp.stream"
    ).stdout.split()
    return {
        "tls13_handshakes": len(set(hello13)),
        "tls_application_records": len(app_data),
        "payload_in_clear": marker.encode() in pcap.read_bytes(),
    }


def run_demo(report: Report, duration: float | None, keep: bool, wait_forever: Callable[[], None]) -> None:
    """Build, prove, and (unless `keep`) remove the world. `report` gets one dict per step."""
    preflight()
    started = time.monotonic()
    world = build_world(keep)
    try:
        report(
            {
                "step": "world",
                "ok": True,
                "hosts": {
                    "cluster": "198.18.1.1 / 198.18.2.1 (authority + meshed client)",
                    "web": "198.18.1.2 (nginx)",
                    "cache": "198.18.2.2 (redis)",
                },
            }
        )
        start_authority(world)
        report(
            {"step": "authority", "ok": True, "url": f"https://{AUTHORITY}:{AUTH_PORT}", "trust_domain": TD}
        )
        marker = "demo-payload-" + secrets.token_hex(6)
        nginx(world.web, world.workdir, 80, body=f"hello from the legacy web host ({marker})\n")
        redis(world.cache)
        report({"step": "apps", "ok": True, "web": "nginx on :80", "cache": "redis on :6379"})

        plan = [
            (world.web, "shop/web", AUTHORITY, ["198.18.1.2", "198.18.3.1"], "all-authenticated"),
            (world.cache, "shop/cache", "198.18.2.1", ["198.18.2.2", "198.18.3.2"], "all-authenticated"),
            (world.cluster, "demo/client", AUTHORITY, ["198.18.1.1", "198.18.2.1"], "all-unauthenticated"),
        ]
        token_times: dict[str, float] = {}
        for host, identity, url_ip, addresses, policy in plan:
            agent, doc, token_at = enroll(world, host, identity, url_ip, addresses, policy)
            token_times[host.name] = token_at
            report(
                {
                    "step": "enroll",
                    "ok": True,
                    "host": host.name,
                    "spiffe_id": doc["spiffe_id"],
                    "dns_name": doc["dns_name"],
                    "not_after": doc["not_after"],
                    "enroll_seconds": doc["enroll_seconds"],
                }
            )
        for agent in world.agents.values():
            start_agent(agent)
        report({"step": "agents", "ok": True, "ready": sorted(world.agents)})

        # First mTLS request through each legacy host: the time from its token to serving mTLS.
        pcap = world.workdir / "web-link.pcap"
        tshark = capture(world, world.web, 1, pcap)
        got = world.cluster.run("curl", "-sS", "--max-time", "10", "http://198.18.1.2/", check=False)
        served = time.monotonic()
        if marker not in got.stdout:
            raise DemoError(f"the client's call to nginx failed: {got.stderr.strip()}")
        pong = world.cluster.run("redis-cli", "-h", "198.18.2.2", "ping", check=False).stdout.strip()
        if pong != "PONG":
            raise DemoError(f"the client's call to redis failed: {pong!r}")
        report(
            {
                "step": "first_mtls",
                "ok": True,
                "token_to_mtls_seconds": {
                    "web": round(served - token_times["web"], 2),
                    "cache": round(time.monotonic() - token_times["cache"], 2),
                },
            }
        )

        # Traffic: HTTP with some server errors, and a redis benchmark.
        script = (
            "import urllib.request, urllib.error\nok = fail = 0\nfor i in range(100):\n"
            "    path = '/fail' if i % 10 == 9 else '/'\n    try:\n"
            "        urllib.request.urlopen('http://198.18.1.2' + path, timeout=5).read(); ok += 1\n"
            "    except urllib.error.HTTPError:\n        fail += 1\nprint(ok, fail)\n"
        )
        ok, fail = map(int, world.cluster.run("python3", "-c", script, timeout=120).stdout.split())
        bench = world.cluster.run(
            "redis-benchmark",
            "-h",
            "198.18.2.2",
            "-n",
            "1000",
            "-c",
            "5",
            "-t",
            "set,get",
            "-q",
            "--csv",
            timeout=120,
            check=False,
        )
        report(
            {
                "step": "traffic",
                "ok": bench.returncode == 0 and ok == 90,
                "http": {"ok": ok, "server_errors": fail},
                "redis_benchmark": bench.stdout.strip().splitlines(),
            }
        )

        time.sleep(0.5)
        tshark.terminate()
        tshark.wait(timeout=20)
        wire = wire_report(world.web, pcap, 80, marker)
        report({"step": "wire", "ok": wire["tls13_handshakes"] > 0 and not wire["payload_in_clear"], **wire})

        stat = json.loads(world.cli(world.web, "stat", "--json", "--config", str(world.agents["web"].config)))
        report({"step": "stat", "ok": bool(stat["rows"]), "host": "web", "rows": stat["rows"]})

        # A refused call: the web host (shop/web) is not allowed to talk to the cache.
        refused = world.web.run("redis-cli", "-h", "198.18.3.2", "ping", check=False)
        cache_log = world.agents["cache"].log
        wait_until(lambda: "not_authorized" in cache_log.read_text(), "the refusal in the cache's log")
        report(
            {
                "step": "refused",
                "ok": refused.stdout.strip() != "PONG",
                "from": f"spiffe://{TD}/ns/shop/sa/web",
                "to": "cache:6379",
                "reason": "not_authorized (policy: only demo/client)",
            }
        )

        report(
            {
                "step": "ready",
                "ok": True,
                "elapsed_seconds": round(time.monotonic() - started, 1),
                "duration": duration,
                "try": try_commands(world),
            }
        )
        if duration is None:
            wait_forever()
        else:
            time.sleep(duration)
    finally:
        if keep:
            report(
                {
                    "step": "kept",
                    "ok": True,
                    "namespaces": [h.ns for h in world.lab.hosts],
                    "remove_with": "meshagent demo down",
                }
            )
        else:
            world.lab.close()
            shutil.rmtree(world.workdir, ignore_errors=True)
            report({"step": "removed", "ok": True})


def try_commands(world: World) -> list[str]:
    c, w = world.cluster.ns, world.web.ns
    cfg = world.agents["web"].config
    return [
        f"ip netns exec {c} curl http://198.18.1.2/            # the client's plain HTTP, mTLS on the wire",
        f"ip netns exec {c} redis-cli -h 198.18.2.2 ping       # RESP through the mesh",
        f"ip netns exec {w} redis-cli -h 198.18.3.2 ping       # refused: shop/web may not call the cache",
        f"ip netns exec {w} {' '.join(MESHAGENT)} stat --config {cfg}",
        f"ip netns exec {w} curl -s http://127.0.0.1:4191/metrics | grep ^response_total",
        f"ip netns exec {w} tshark -i {world.lab.tag[-9:]}b1 -d tcp.port==80,tls -Y tls",
    ]
