"""Benchmark: meshagent's data plane against haproxy and stunnel doing the same two mTLS hops.

    .venv/bin/python -m bench.dataplane [--duration 10] [--rounds 3] [--rate 1000] [--quick]
                                        [--workers auto] [--pin] [--profile]   (as root)

Everything runs in network namespaces made for the run and deleted at the end (even on Ctrl-C
or a failure); the root namespace is never touched and traffic stays on 198.18.0.0/15:

    cl (authority) ──198.18.1.0/24── a (client side) ──198.18.3.0/24── b (server side)
         └───────────────────198.18.2.0/24──────────────────────────────────┘

    b: nginx (1 worker) on :8080 (the port meshagent captures) and :8081 (the same server,
       never captured), serving /small.txt (128 B) and /big.bin (256 MiB, fallocate).
    1. direct     wrk on a -> 198.18.3.2:8081                                    (no proxy)
    2. haproxy    wrk -> 127.0.0.1:15001 haproxy(a) =TLS=> :9443 haproxy(b) -> :8081
    3. stunnel    wrk -> 127.0.0.1:15002 stunnel(a) =TLS=> :9444 stunnel(b) -> :8081
    4. meshagent  wrk -> 198.18.3.2:8080, redirected by a's rules to meshagent(a) =TLS=>
                  redirected by b's rules to meshagent(b) -> :8080

The TLS hop is the same for all three: TLS 1.3 only, each side presenting the ECDSA P-256
certificate the meshagent authority issued to its host (a: bench/client, b: bench/server),
each verifying the other's chain to the authority's bundle, the client checking the server's
mesh DNS name (and SNI = that name); no per-connection logs. haproxy and stunnel are L4 relays
here (haproxy `mode tcp`), as meshagent is.

As users run them (the default): no CPU pinning; haproxy without an `nbthread` line (a thread
per CPU, its default); meshagent with `proxy.workers = --workers` ("auto": a worker per CPU).
Session resumption is off everywhere in the main table (haproxy `no-ssl-reuse`,
`no-tls-tickets`, no session cache; stunnel `sessionResume = no`; meshagent
`proxy.tls_resumption = false`), so every new connection is a full handshake. `--pin` then
runs the old setup in a second lab as an extra table, "pinned: one core per host (haproxy
nbthread 1, meshagent inline: one process)": every process of host a on CPU 0 and of b on CPU 1
(taskset), two one-core machines.

Measures (each target in turn, the order rotating per round; with --rounds N the median):
- requests/s: `wrk -t1 -c50 -dD` on keep-alive connections, GET /small.txt; plus the CPU
  seconds the two proxies' process trees used meanwhile (psutil: every thread, and for
  meshagent the supervisor and its workers too), per request.
- new TLS connections/s (cps): the same with `-H "Connection: close"` (one request per
  connection, so one full TLS 1.3 handshake per request through both hops).
- failed: wrk's socket errors + non-2xx responses, over the rps and cps runs.
- latency: bench.loadgen's open-loop constant-rate client (wrk2-style, corrected for
  coordinated omission) at --rate requests/s over 10 keep-alive connections, p50/p99.
- bulk: `curl -o /dev/null` of /big.bin, MB/s (10^6 bytes), median of a few transfers.
- memory: Σ PSS (shared pages counted once, as the cgroup does) and Σ RSS over each proxy's
  process tree, idle after start (before any connection), then with 1,000 open keep-alive
  connections through it (bench.loadgen hold; still before any load), and idle again after
  all the load. meshagent: the `meshagent run` process (the supervisor) and its workers.
Passes after the main measures (meshagent's daemons restarted for each; not with --pin):
- cps_resumed: new connections/s with resumption as each ships it: meshagent's defaults
  against a second haproxy pair with its defaults (tickets and session cache on); b's
  meshagent_tls_resumed_total afterwards proves resumption happened.
- scaling: meshagent alone with 1 and 2 workers: req/s and CPU us per request, conn/s and
  CPU us per connection.
- memory: b's idle Σ PSS (and Σ RSS) with the inline proxy (0) and 1, 2 and 4 workers.
- churn (--churn N): N new connections with resumption on; b's Σ PSS before and after (goal:
  < 10 MB growth once memory-return ran) and both hosts' /status session figures.
- metrics cost: requests/s with metrics on and off (--no-metrics-cost skips it).
- --profile adds a pass after the measures (not in the figures): py-spy (--gil) on both
  daemons (with workers: one worker of each) under the keep-alive and the Connection: close
  load; the collapsed stacks go to bench/results/dataplane-profile-*.txt and the top frames to
  the JSON and the output.

Around every measure the CPU used by processes outside the benchmark is recorded
(`others_cpu_pct`; a shared machine is the usual cause of an odd figure), and before each one
the run waits (up to --wait-quiet seconds, 10 minutes in all) while they use more than 10 % of
a CPU. The load average at the start is in the JSON and the table's title.

Prints a table with meshagent's ratios to haproxy, stunnel and direct; writes
bench/results/dataplane.json. Needs root, iproute2, nftables, nginx, haproxy, stunnel4, wrk, curl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from agent.identity.store import IdentityStore
from agent.netlab import Host, Lab, namespaces, netns_supported
from agent.telemetry.process import tree_memory

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MESHAGENT = [PY, "-m", "agent.cli"]
PY_SPY = str(Path(sys.executable).parent / "py-spy")

B_IP = "198.18.3.2"  # b's address on the a-b link (a is .1)
APP_PORT = 8080  # nginx, captured by meshagent
PLAIN_PORT = 8081  # the same nginx, never captured
HAPROXY_IN, HAPROXY_TLS = 15001, 9443
HAPROXY_RESUME_IN, HAPROXY_RESUME_TLS = 15003, 9445  # haproxy's defaults: session resumption on
STUNNEL_IN, STUNNEL_TLS = 15002, 9444
AUTH_PORT = 8443
SMALL, BIG = "/small.txt", "/big.bin"
TARGETS = ("direct", "haproxy", "stunnel", "meshagent")
PROXIES = TARGETS[1:]
WRK_CONNECTIONS = 50
LATENCY_CONNECTIONS = 10
PINNED_TITLE = "pinned: one core per host (haproxy nbthread 1, meshagent inline: one process)"


class BenchError(Exception):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise BenchError(f"timed out waiting for {what}")


@dataclass
class Target:
    name: str
    host: str
    port: int
    procs: list[psutil.Process] = field(default_factory=list)  # the proxy on a, then on b

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


@dataclass
class Setup:
    lab: Lab
    tmp: Path
    cl: Host
    a: Host
    b: Host
    targets: dict[str, Target] = field(default_factory=dict)
    logs: list[Path] = field(default_factory=list)
    server_name: str = ""
    pin: bool = False
    # The agents' [proxy] keys (TOML values); a pass overrides some for its restarts.
    agent_proxy: dict[str, str] = field(default_factory=dict)
    resume: Target | None = None  # haproxy with its defaults, for the cps_resumed pass

    def cpu(self, host: Host) -> list[str]:
        """`taskset` for a process of host a (CPU 0) or b (CPU 1): two one-core "machines"."""
        if not self.pin or (host is not self.a and host is not self.b):
            return []
        return ["taskset", "-c", "0" if host is self.a else "1"]

    def logfile(self, name: str) -> Any:
        path = self.tmp / f"{name}.log"
        self.logs.append(path)
        return open(path, "a")  # lives as long as the process writing it

    def popen(self, host: Host, name: str, *argv: str, **kw: Any) -> subprocess.Popen[str]:
        out = self.logfile(name)
        proc = host.popen(*argv, stdout=out, stderr=out, **kw)
        time.sleep(0.05)
        if proc.poll() is not None:
            raise BenchError(f"{name} exited {proc.returncode}: {self.tail(name)}")
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _process(popen: subprocess.Popen[str]) -> psutil.Process:
    """`ip netns exec`, `setpriv` and `taskset` all exec: the pid is the program's own."""
    return psutil.Process(popen.pid)


def tree(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes and all their descendants (meshagent's workers are the supervisor's children)."""
    out: list[psutil.Process] = []
    for proc in procs:
        out.append(proc)
        with contextlib.suppress(psutil.Error):
            out.extend(proc.children(recursive=True))
    return out


def memory_mb(procs: list[psutil.Process]) -> tuple[float, float]:
    """Σ PSS and Σ RSS of the process trees, MB: PSS counts pages the workers share with the
    supervisor once (as the cgroup's memory.current does), RSS counts them in every process."""
    got = tree_memory(p.pid for p in tree(procs))
    return round(got.pss / 2**20, 1), round(got.rss / 2**20, 1)


def cpu_by_pid(procs: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of every process of the trees, by pid."""
    out: dict[int, float] = {}
    for proc in tree(procs):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            out[proc.pid] = times.user + times.system
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the trees used between two `cpu_by_pid`: a process started meanwhile counts
    whole, one that exited meanwhile (a short-lived helper, a replaced worker) counts 0, never
    a negative amount."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


class Neighbours:
    """CPU used by processes that are not this benchmark's (say, a test suite someone runs on the
    same machine): measured around every measure, and waited out before it when asked."""

    def __init__(self, s: Setup, budget_s: float = 600) -> None:
        self.s = s
        self.budget_s = budget_s  # over the whole run, so a busy machine cannot stretch it forever

    def _ours(self) -> set[int]:
        pids = {os.getpid()}
        with contextlib.suppress(psutil.Error):
            pids |= {p.pid for p in psutil.Process().children(recursive=True)}
        for host in self.s.lab.hosts:
            got = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True, timeout=10)
            pids |= {int(x) for x in got.stdout.split()}
        return pids

    def snapshot(self) -> dict[int, tuple[psutil.Process, float]]:
        ours, snap = self._ours(), {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid in ours or proc.pid == 2 or proc.ppid() == 2:  # ours, kernel threads
                    continue
                times = proc.cpu_times()
                snap[proc.pid] = (proc, times.user + times.system)
        return snap

    def since(self, snap: dict[int, tuple[psutil.Process, float]], seconds: float) -> tuple[float, list[str]]:
        """Percent of one CPU the processes of `snap` used since it was taken (still-running ones),
        and the busiest of them."""
        used: list[tuple[float, str]] = []
        ours = self._ours()
        for pid, (proc, before) in snap.items():
            with contextlib.suppress(psutil.Error):
                if pid not in ours:
                    times = proc.cpu_times()
                    used.append((times.user + times.system - before, f"{proc.name()}[{pid}]"))
        scale = 100 / max(seconds, 1e-3)
        top = [
            f"{name} {cpu * scale:.0f}%" for cpu, name in sorted(used, reverse=True)[:3] if cpu * scale >= 2
        ]
        return round(sum(cpu for cpu, _ in used) * scale, 1), top

    def wait_quiet(self, limit_s: float, threshold: float = 10.0) -> float:
        """Wait (at most `limit_s`) until others use under `threshold` % of a CPU; seconds waited."""
        started = time.monotonic()
        limit_s = min(limit_s, self.budget_s)
        told = False
        while True:
            snap = self.snapshot()
            time.sleep(1.0)
            busy, top = self.since(snap, 1.0)
            waited = time.monotonic() - started
            if busy < threshold or waited >= limit_s:
                self.budget_s -= waited
                return round(waited, 1)
            if not told:
                log(f"other processes use {busy}% CPU ({', '.join(top)}): waiting up to {limit_s:g} s")
                told = True


# --- building the lab ----------------------------------------------------------------------


def build_network(lab: Lab) -> tuple[Host, Host, Host]:
    cl, a, b = lab.host("cl"), lab.host("a"), lab.host("b")
    lab.link(cl, a)  # 198.18.1.0/24
    lab.link(cl, b)  # 198.18.2.0/24
    lab.link(a, b)  # 198.18.3.0/24
    for host in (a, b):
        # Namespace-local knobs so 10 s of new connections do not run out of ports.
        for key, value in (
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "8192"),
            ("net.ipv4.tcp_max_syn_backlog", "8192"),
        ):
            host.run("sysctl", "-q", "-w", f"{key}={value}")
    return cl, a, b


def start_nginx(s: Setup, big_mib: int) -> None:
    www = s.tmp / "www"
    www.mkdir()
    (www / "small.txt").write_text(("meshagent benchmark " * 7)[:127] + "\n")
    subprocess.run(["fallocate", "-l", f"{big_mib}M", str(www / "big.bin")], check=True)
    nginx = s.tmp / "nginx"
    nginx.mkdir()
    conf = nginx / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process on;
worker_processes 1;
user root root;
pid {nginx}/nginx.pid;
error_log {nginx}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {nginx}/body;
    proxy_temp_path {nginx}/proxy;
    fastcgi_temp_path {nginx}/fastcgi;
    uwsgi_temp_path {nginx}/uwsgi;
    scgi_temp_path {nginx}/scgi;
    types {{ text/plain txt; application/octet-stream bin; }}
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    server {{
        listen {APP_PORT} backlog=8192;
        listen {PLAIN_PORT} backlog=8192;
        root {www};
    }}
}}
"""
    )
    s.popen(
        s.b, "nginx", *s.cpu(s.b), "nginx", "-c", str(conf), "-p", str(nginx), "-e", str(nginx / "error.log")
    )
    wait_for(
        lambda: (
            s.b.run(
                "curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{PLAIN_PORT}{SMALL}", check=False
            ).returncode
            == 0
        ),
        "nginx up",
    )


def start_authority(s: Setup) -> Path:
    directory = s.tmp / "authority"
    s.cl.run(
        *MESHAGENT,
        "authority",
        "init",
        "--dir",
        str(directory),
        "--trust-domain",
        "cluster.local",
        "--san",
        "198.18.1.1",
        "--san",
        "198.18.2.1",
    )
    s.popen(
        s.cl,
        "authority",
        *MESHAGENT,
        "authority",
        "serve",
        "--dir",
        str(directory),
        "--listen",
        f"0.0.0.0:{AUTH_PORT}",
    )
    wait_for(
        lambda: (
            s.cl.run("curl", "-sfk", f"https://198.18.1.1:{AUTH_PORT}/healthz", check=False).returncode == 0
        ),
        "authority up",
    )
    return directory


def enroll(s: Setup, authority: Path, host: Host, identity: str, url_ip: str, addresses: list[str]) -> Path:
    token = s.cl.run(
        *MESHAGENT,
        "authority",
        "token",
        "create",
        "--dir",
        str(authority),
        "--identity",
        identity,
        "--url",
        f"https://{url_ip}:{AUTH_PORT}",
    ).stdout.strip()
    state = s.tmp / f"state-{host.name}"
    host.run(
        *MESHAGENT,
        "enroll",
        token,
        "--state-dir",
        str(state),
        "--host-name",
        host.name,
        *[f"--address={a}" for a in addresses],
    )
    return state


def start_agent(
    s: Setup, host: Host, state: Path, src: Path | None, extra: str, proxy: dict[str, str] | None = None
) -> psutil.Process:
    config = s.tmp / f"agent-{host.name}.toml"
    keys = {"drain_timeout_s": "1.0", **s.agent_proxy, **(proxy or {})}
    config.write_text(
        f'[identity]\nstate_dir = "{state}"\n'
        '[log]\nlevel = "info"\n'
        # The benchmark clients run as root: only the proxy's SO_MARK exempts its own traffic.
        # Only the app port is captured, so the haproxy and stunnel pairs run beside it untouched.
        f"[intercept]\nproxy_user = 65534\ninbound_ports = [{APP_PORT}]\noutbound_ports = [{APP_PORT}]\n"
        "[proxy]\n"
        + "".join(f"{k} = {v}\n" for k, v in keys.items())
        + '[inbound]\ndefault_policy = "all-authenticated"\n'
        + extra.replace("\\n", "\n")
        + "\n"
    )
    name = f"meshagent-{host.name}"
    log_path = s.tmp / f"{name}.log"
    seen = log_path.stat().st_size if log_path.exists() else 0  # a restart appends to the log
    # --agent-src: import `agent` from another tree (cwd is the first entry of sys.path).
    kw = {"cwd": str(src), "env": {**os.environ, "PYTHONPATH": str(src)}} if src else {}
    proc = s.popen(host, name, *s.cpu(host), *MESHAGENT, "run", "--config", str(config), **kw)

    def ready() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited {proc.returncode}: {s.tail(name)}")
        return "daemon.ready" in log_path.read_text()[seen:]

    wait_for(ready, f"{name} ready")
    return _process(proc)


METRICS_OFF = "[telemetry]\nmetrics = false"
COST_ROUNDS = 5  # at least, for the metrics-cost pass: its runs are short and drift is large


def restart_agents(
    s: Setup, args: argparse.Namespace, extra: str, proxy: dict[str, str] | None = None
) -> None:
    """Stop both meshagent daemons (SIGTERM: they remove their rules, their workers drain) and
    start them again with `extra` appended to their config and `proxy` over its [proxy] keys."""
    target = s.targets["meshagent"]
    everything = tree(target.procs)
    for proc in target.procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(everything, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    agent_b = start_agent(s, s.b, s.tmp / "state-b", args.agent_src, extra, proxy)
    agent_a = start_agent(s, s.a, s.tmp / "state-a", args.agent_src, extra, proxy)
    target.procs = [agent_a, agent_b]


def metrics_cost(s: Setup, args: argparse.Namespace, neighbours: Neighbours) -> dict[str, Any]:
    """requests/s and proxy CPU per request with metrics on and off, the daemons restarted for
    each run. On and off alternate (off first in even rounds) and the cost is the median of each
    round's on/off ratio: the two runs of a round are next to each other in time, so drift in
    the machine's speed (seen to be 20% within minutes on this VM) cancels."""
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for r in range(max(args.rounds, args.cost_rounds)):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            extra = args.agent_config + ("\n" + METRICS_OFF if mode == "off" else "")
            restart_agents(s, args, extra)
            wrk(s, s.targets["meshagent"], 2, close=False)  # warm-up
            waited = neighbours.wait_quiet(args.wait_quiet) if args.wait_quiet else 0.0
            snap, t0 = neighbours.snapshot(), time.monotonic()
            got = wrk(s, s.targets["meshagent"], args.duration, close=False)
            got["others_cpu_pct"], got["others_top"] = neighbours.since(snap, time.monotonic() - t0)
            got["waited_for_quiet_s"] = waited
            runs[mode].append(got)
            log(f"round {r + 1} metrics {mode:3}  {_brief('rps', got)}")
    restart_agents(s, args, args.agent_config)  # as configured, for whatever runs next
    rps = {mode: _median(runs[mode], "rps") or 0.0 for mode in runs}
    cpu = {mode: _median(runs[mode], "proxy_cpu_us_per_req") or 0.0 for mode in runs}
    pairs = list(zip(runs["on"], runs["off"], strict=True))
    # The cost: requests/s lost, and CPU per request added, by turning metrics on.
    rps_cost = [100 * (1 - on["rps"] / off["rps"]) for on, off in pairs if off.get("rps")]
    cpu_cost = [
        100 * (on["proxy_cpu_us_per_req"] / off["proxy_cpu_us_per_req"] - 1)
        for on, off in pairs
        if off.get("proxy_cpu_us_per_req")
    ]
    return {
        "rps_on": rps["on"],
        "rps_off": rps["off"],
        "cpu_us_per_req_on": cpu["on"],
        "cpu_us_per_req_off": cpu["off"],
        "rps_cost_pct": round(statistics.median(rps_cost), 1) if rps_cost else None,
        "cpu_cost_pct": round(statistics.median(cpu_cost), 1) if cpu_cost else None,
        "rps_cost_pct_by_round": [round(c, 1) for c in rps_cost],
        "cpu_cost_pct_by_round": [round(c, 1) for c in cpu_cost],
        "raw": runs,
    }


def identity_files(state: Path) -> dict[str, Path]:
    d = state / "identity"
    return {"cert": d / "cert.pem", "key": d / "key.pem", "bundle": d / "bundle.pem"}


def start_haproxy(
    s: Setup, files_a: dict[str, Path], files_b: dict[str, Path], threads: int | None, resume: bool = False
) -> Target:
    """haproxy on a and b. `threads` None: no `nbthread` line (haproxy then runs a thread per
    CPU). `resume` False: no session reuse on either side (`no-ssl-reuse`, `no-tls-tickets`, no
    session cache), as the cps measure needs; True: haproxy's defaults (tickets and its cache)."""
    procs = []
    port_in, port_tls = (HAPROXY_RESUME_IN, HAPROXY_RESUME_TLS) if resume else (HAPROXY_IN, HAPROXY_TLS)
    name = "haproxy-resume" if resume else "haproxy"
    for host, files, role in ((s.a, files_a, "a"), (s.b, files_b, "b")):
        pem = s.tmp / f"{name}-{role}.pem"
        pem.write_text(files["cert"].read_text() + files["key"].read_text())
        pem.chmod(0o600)
        if role == "a":
            section = (
                f"listen out\n    bind 127.0.0.1:{port_in}\n"
                f"    server b {B_IP}:{port_tls} ssl crt {pem} ca-file {files['bundle']} verify required"
                f" verifyhost {s.server_name} sni str({s.server_name}) ssl-min-ver TLSv1.3"
                + ("" if resume else " no-ssl-reuse")
                + "\n"
            )
        else:
            section = (
                f"listen in\n    bind 0.0.0.0:{port_tls} ssl crt {pem} ca-file {files['bundle']}"
                " verify required ssl-min-ver TLSv1.3" + ("" if resume else " no-tls-tickets") + "\n"
                f"    server app {B_IP}:{PLAIN_PORT}\n"
            )
        cfg = s.tmp / f"{name}-{role}.cfg"
        cfg.write_text(
            "global\n"
            + (f"    nbthread {threads}\n" if threads else "")
            + "    maxconn 8000\n"
            + ("" if resume else "    tune.ssl.cachesize 0\n")
            + "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n"
            "    timeout server 600s\n" + section
        )
        host.run("haproxy", "-c", "-q", "-f", str(cfg))
        procs.append(
            _process(s.popen(host, f"{name}-{role}", *s.cpu(host), "haproxy", "-db", "-f", str(cfg)))
        )
    return Target(name, "127.0.0.1", port_in, procs)


def start_stunnel(s: Setup, files_a: dict[str, Path], files_b: dict[str, Path]) -> Target:
    procs = []
    for host, files, role in ((s.a, files_a, "a"), (s.b, files_b, "b")):
        common = (
            f"cert = {files['cert']}\nkey = {files['key']}\nCAfile = {files['bundle']}\n"
            "verifyChain = yes\nsslVersionMin = TLSv1.3\nsessionResume = no\noptions = NO_TICKET\n"
            "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        )
        if role == "a":
            service = (
                f"[out]\nclient = yes\naccept = 127.0.0.1:{STUNNEL_IN}\nconnect = {B_IP}:{STUNNEL_TLS}\n"
                f"checkHost = {s.server_name}\nsni = {s.server_name}\n"
            )
        else:
            service = (
                f"[in]\naccept = 0.0.0.0:{STUNNEL_TLS}\nconnect = {B_IP}:{PLAIN_PORT}\nrequireCert = yes\n"
            )
        conf = s.tmp / f"stunnel-{role}.conf"
        conf.write_text(
            f"foreground = yes\npid =\ndebug = 3\noutput = {s.tmp}/stunnel-{role}.out\n" + service + common
        )
        s.logs.append(s.tmp / f"stunnel-{role}.out")
        procs.append(_process(s.popen(host, f"stunnel-{role}", *s.cpu(host), "stunnel", str(conf))))
    return Target("stunnel", "127.0.0.1", STUNNEL_IN, procs)


def check_small(s: Setup, target: Target) -> None:
    def ok() -> bool:
        got = s.a.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", target.url(SMALL), check=False)
        return got.stdout == "200"

    wait_for(ok, f"{target.name}: GET {SMALL} through it", timeout=20)


def check_big(s: Setup, target: Target, big_bytes: int) -> None:
    got = s.a.run(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", target.url(BIG), timeout=120
    ).stdout.split()
    if got != ["200", str(big_bytes)]:
        raise BenchError(f"{target.name}: GET {BIG} gave {got}")


def tls_summary(s: Setup, files_a: dict[str, Path]) -> dict[str, dict[str, str]]:
    """What each server side negotiates with a client holding a's certificate (from cl)."""
    out: dict[str, dict[str, str]] = {}
    for name, port in (("haproxy", HAPROXY_TLS), ("stunnel", STUNNEL_TLS), ("meshagent", APP_PORT)):
        got = s.cl.run(
            "openssl",
            "s_client",
            "-brief",
            "-verify_return_error",
            "-connect",
            f"198.18.2.2:{port}",
            "-servername",
            s.server_name,
            "-verify_hostname",
            s.server_name,
            "-cert",
            str(files_a["cert"]),
            "-key",
            str(files_a["key"]),
            "-CAfile",
            str(files_a["bundle"]),
            input="",
            check=False,
            timeout=20,
        )
        fields = {}
        for line in got.stderr.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in (
                "Protocol version",
                "Ciphersuite",
                "Peer signature type",
                "Negotiated TLS1.3 group",
                "Server Temp Key",
                "Verification",
            ):
                fields[key.strip()] = value.strip()
        if fields.get("Protocol version") != "TLSv1.3":
            raise BenchError(f"{name}: TLS check failed:\n{got.stderr}")
        out[name] = fields
    return out


@contextmanager
def lab_setup(args: argparse.Namespace, pinned: bool) -> Iterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="meshagent-dataplane-") as tmpdir, Lab("db") as lab:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)
        cl, a, b = build_network(lab)
        s = Setup(lab, tmp, cl, a, b, pin=pinned)
        # cps compares full handshakes: meshagent's resumption off here, as haproxy's is; the
        # cps_resumed pass turns it back on (its default).
        # Pinned is the earlier setup: one process per host (the inline proxy, proxy.workers = 0).
        s.agent_proxy = {
            "workers": "0" if pinned else toml_value(args.workers),
            "tls_resumption": "false",
            **dict(kv.split("=", 1) for kv in args.agent_proxy),
        }
        threads = 1 if pinned else args.haproxy_threads
        try:
            log(f"namespaces {', '.join(h.ns for h in lab.hosts)}; nginx with a {args.big_mib} MiB file")
            start_nginx(s, args.big_mib)
            log("authority, enrollment of a (bench/client) and b (bench/server)")
            authority = start_authority(s)
            state_a = enroll(s, authority, a, "bench/client", "198.18.1.1", ["198.18.3.1", "198.18.1.2"])
            state_b = enroll(s, authority, b, "bench/server", "198.18.2.1", [B_IP, "198.18.2.2"])
            s.server_name = IdentityStore(state_b).load().workload.dns_name
            files_a, files_b = identity_files(state_a), identity_files(state_b)
            s.targets["direct"] = Target("direct", B_IP, PLAIN_PORT)
            log(f"haproxy pair (nbthread {threads or 'default: one per CPU'}), stunnel pair")
            s.targets["haproxy"] = start_haproxy(s, files_a, files_b, threads)
            s.targets["stunnel"] = start_stunnel(s, files_a, files_b)
            if args.resumed and not pinned:
                s.resume = start_haproxy(s, files_a, files_b, threads, resume=True)
            log(f"meshagent run on b, then a ({', '.join(f'{k} = {v}' for k, v in s.agent_proxy.items())})")
            agent_b = start_agent(s, b, state_b, args.agent_src, args.agent_config)
            agent_a = start_agent(s, a, state_a, args.agent_src, args.agent_config)
            wait_for(lambda: (state_a / "host-config.json").exists(), "a's catalog from the authority")
            s.targets["meshagent"] = Target("meshagent", B_IP, APP_PORT, [agent_a, agent_b])
            yield s
        except Exception:
            for path in s.logs:
                if path.exists() and path.stat().st_size:
                    tail = "\n".join(path.read_text(errors="replace").splitlines()[-15:])
                    print(f"--- {path.name}\n{tail}", file=sys.stderr)
            raise


# --- measures ------------------------------------------------------------------------------

_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(m?s)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(s: Setup, target: Target, duration: int, close: bool) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{duration}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    cpu0 = cpu_by_pid(target.procs)
    got = s.a.run(*s.cpu(s.a), *argv, target.url(SMALL), timeout=duration + 60)
    cpu1 = cpu_by_pid(target.procs)
    cpu = cpu_used(cpu0, cpu1)
    tops = {p.pid for p in target.procs}  # the processes started (meshagent: the supervisors)
    cpu_tops = cpu_used(
        {k: v for k, v in cpu0.items() if k in tops}, {k: v for k, v in cpu1.items() if k in tops}
    )
    text = got.stdout
    rps, total = _WRK_RPS.search(text), _WRK_TOTAL.search(text)
    if rps is None or total is None:
        raise BenchError(f"wrk output not understood:\n{text}\n{got.stderr}")
    requests = int(total.group(1))
    sock = _WRK_SOCKET.search(text)
    non2xx = _WRK_NON2XX.search(text)
    errors = (sum(int(x) for x in sock.groups()) if sock else 0) + (int(non2xx.group(1)) if non2xx else 0)
    result: dict[str, Any] = {"rps": float(rps.group(1)), "requests": requests, "errors": errors}
    if errors:  # which: wrk's socket errors (connect, read, write, timeout) or non-2xx answers
        result["socket_errors"] = [int(x) for x in sock.groups()] if sock else [0, 0, 0, 0]
        result["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    if target.procs:
        result["proxy_cpu_s"] = round(cpu, 3)
        result["proxy_cpu_s_top_processes"] = round(cpu_tops, 3)  # the rest: children (workers)
        result["proxy_cpu_us_per_req"] = round(cpu * 1e6 / max(1, requests), 1)
    return result


def latency(s: Setup, target: Target, rate: float, duration: int) -> dict[str, Any]:
    got = s.a.run(
        *s.cpu(s.a),
        PY,
        "-m",
        "bench.loadgen",
        "rate",
        target.host,
        str(target.port),
        SMALL,
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--connections",
        str(LATENCY_CONNECTIONS),
        timeout=duration + 90,
        env={"PYTHONPATH": str(REPO)},
    )
    return dict(json.loads(got.stdout))


def bulk(s: Setup, target: Target, runs: int) -> dict[str, Any]:
    speeds = []
    for _ in range(runs):
        got = s.a.run(
            *s.cpu(s.a),
            "curl",
            "-sS",
            "--max-time",
            "300",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{speed_download}",
            target.url(BIG),
            timeout=320,
        )
        code, _size, speed = got.stdout.split()
        if code != "200":
            raise BenchError(f"{target.name}: bulk GET answered {code}")
        speeds.append(float(speed) / 1e6)
    return {"mb_s": round(statistics.median(speeds), 1), "runs_mb_s": [round(x, 1) for x in speeds]}


def hold(s: Setup, target: Target, connections: int) -> dict[str, Any]:
    """Σ PSS and Σ RSS of the proxies' process trees with `connections` keep-alive connections
    open through them."""
    proc = s.a.popen(
        *s.cpu(s.a),
        PY,
        "-m",
        "bench.loadgen",
        "hold",
        target.host,
        str(target.port),
        SMALL,
        "--connections",
        str(connections),
        "--max-hold",
        "120",
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            proc.wait(timeout=10)
            return {"error": f"hold client gave nothing: {proc.stderr.read()[-500:]}"}
        opened = json.loads(line)
        time.sleep(1.0)
        result = {**opened, **memory(target)}
        if opened["ok"] < connections:
            result["error"] = f"{connections - opened['ok']} of {connections} connections got no 200"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        s.lab.processes.remove(proc)  # reaped: the Lab must not signal its pid again
    return result


def profile(s: Setup, target: Target, duration: int, close: bool, out: Path) -> dict[str, Any]:
    """py-spy on both daemons while wrk runs (a separate pass: sampling costs CPU); with workers,
    on one worker of each (the last process of the tree), where the data plane runs."""
    spies = []
    for top, side in zip(target.procs, "ab", strict=True):
        proc = tree([top])[-1]
        raw = out / f"dataplane-profile-{'cps' if close else 'rps'}-{side}.txt"
        cmd = [
            PY_SPY,
            "record",
            "-p",
            str(proc.pid),
            "-d",
            str(duration),
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(raw),
            "--gil",  # time holding the GIL: the Python side of the event loop, not its waits
        ]
        spies.append((side, raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    try:
        got = wrk(s, target, duration, close)
    finally:
        for _, _, spy in spies:
            try:
                spy.wait(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(timeout=10)
    result: dict[str, Any] = {"rps": got["rps"]}
    for side, raw, _ in spies:
        result[side] = {"file": str(raw.relative_to(REPO)), "top": top_frames(raw)}
    return result


def top_frames(raw: Path, n: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks, in percent of samples: self time per innermost frame,
    and inclusive time per data-plane function (agent/proxy/...)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return {"self": [], "agent_inclusive": []}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]  # per function, not line
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            if "agent/proxy/" in frame:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
        total += int(count)

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(frame, round(100 * c / max(1, total), 1)) for frame, c in top]

    return {"self": ranked(own), "agent_inclusive": ranked(inclusive)}


def memory(target: Target) -> dict[str, float]:
    (pss_a, rss_a), (pss_b, rss_b) = memory_mb(target.procs[:1]), memory_mb(target.procs[1:])
    return {"pss_a_mb": pss_a, "pss_b_mb": pss_b, "rss_a_mb": rss_a, "rss_b_mb": rss_b}


def idle_memory(targets: dict[str, Target]) -> dict[str, dict[str, float]]:
    return {name: memory(t) for name, t in targets.items() if t.procs}


# --- the run -------------------------------------------------------------------------------


def toml_value(value: str) -> str:
    return value if value.isdigit() else json.dumps(value)


def measure_once(
    args: argparse.Namespace, neighbours: Neighbours, fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """One measure, with the neighbours' CPU around it; a failure is a result, not the end."""
    waited = neighbours.wait_quiet(args.wait_quiet) if args.wait_quiet else 0.0
    snap, t0 = neighbours.snapshot(), time.monotonic()
    try:
        got = fn()
    except (BenchError, AssertionError, subprocess.TimeoutExpired, ValueError) as exc:
        got = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
    got["others_cpu_pct"], got["others_top"] = neighbours.since(snap, time.monotonic() - t0)
    got["waited_for_quiet_s"] = waited
    return got


def tls_resumed_b(s: Setup) -> dict[str, float] | None:
    """b's meshagent_tls_resumed_total by direction (None: the family is not there)."""
    got = s.b.run("curl", "-s", "--max-time", "10", "http://127.0.0.1:4191/metrics", check=False)
    found = {}
    for line in got.stdout.splitlines():
        match = re.match(r'meshagent_tls_resumed_total\{direction="(\w+)"\} (\S+)', line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found or None


def resumed_pass(s: Setup, args: argparse.Namespace, neighbours: Neighbours) -> dict[str, Any]:
    """cps_resumed: new connections/s with session resumption as each ships it, meshagent's
    defaults (resumption on) against haproxy's defaults (tickets and session cache on)."""
    assert s.resume is not None
    restart_agents(s, args, args.agent_config, {"tls_resumption": "true"})
    targets = {"haproxy": s.resume, "meshagent": s.targets["meshagent"]}
    for target in targets.values():
        check_small(s, target)
        wrk(s, target, 2, close=True)  # warm-up: the clients hold a session from here on
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    order = list(targets)
    for r in range(max(1, args.rounds)):
        for name in order[r % 2 :] + order[: r % 2]:
            got = measure_once(args, neighbours, partial(wrk, s, targets[name], args.duration, True))
            runs[name].append(got)
            log(f"round {r + 1} cps_resumed {name:10} {_brief('cps', got)}")
    return {
        "cps_resumed": {name: _median(runs[name], "rps") for name in targets},
        "cpu_us_per_connection": {name: _median(runs[name], "proxy_cpu_us_per_req") for name in targets},
        "failed": {name: sum(int(r.get("errors", 0)) for r in runs[name]) for name in targets},
        "meshagent_tls_resumed_total_b": tls_resumed_b(s),
        "raw": runs,
    }


def scaling_pass(s: Setup, args: argparse.Namespace, neighbours: Neighbours) -> dict[str, Any]:
    """meshagent alone with 1 and 2 workers: requests/s and CPU per request (keep-alive), new
    connections/s and CPU per connection (resumption off, as in cps)."""
    out: dict[str, Any] = {}
    for workers in args.scaling_workers:
        try:
            restart_agents(s, args, args.agent_config, {"workers": str(workers)})
            wrk(s, s.targets["meshagent"], 2, close=False)  # warm-up
        except (BenchError, subprocess.TimeoutExpired) as exc:
            out[str(workers)] = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
            log(f"scaling workers={workers}: FAILED {str(exc)[-300:]}")
            continue
        runs: dict[str, list[dict[str, Any]]] = {"rps": [], "cps": []}
        for _ in range(max(1, args.rounds)):
            for measure in runs:
                close = measure == "cps"
                got = measure_once(
                    args, neighbours, partial(wrk, s, s.targets["meshagent"], args.duration, close)
                )
                runs[measure].append(got)
                log(f"scaling workers={workers} {measure} {_brief(measure, got)}")
        out[str(workers)] = {
            "processes_b": len(tree(s.targets["meshagent"].procs[1:])),
            "rps": _median(runs["rps"], "rps"),
            "cpu_us_per_req": _median(runs["rps"], "proxy_cpu_us_per_req"),
            "cps": _median(runs["cps"], "rps"),
            "cpu_us_per_conn": _median(runs["cps"], "proxy_cpu_us_per_req"),
            "failed": sum(int(r.get("errors", 0)) for rs in runs.values() for r in rs),
            "raw": runs,
        }
    return out


def admin_json(host: Host, path: str) -> dict[str, Any]:
    got = host.run("curl", "-s", "--max-time", "10", f"http://127.0.0.1:4191{path}", check=False)
    try:
        return dict(json.loads(got.stdout))
    except ValueError:
        return {"error": f"{path}: {got.stdout[-200:]}{got.stderr[-200:]}"}


def churn_pass(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """--churn N: N new connections through meshagent with resumption on (its defaults), in
    10 s wrk runs; b's Σ PSS before and after (after the memory-return task had its chance:
    it runs at most every 10 s once the open sockets fall), and both hosts' session figures
    from /status (the server keeps no session cache; a client's is bounded per worker)."""
    restart_agents(s, args, args.agent_config, {"tls_resumption": "true"})
    target = s.targets["meshagent"]
    b = target.procs[1:]
    check_small(s, target)
    settle(b, workers_of(s))
    time.sleep(2)
    before = memory_mb(b)
    made, failed, runs, started = 0, 0, 0, time.monotonic()
    while made < args.churn and time.monotonic() - started < args.churn_max_s:
        got = wrk(s, target, 10, close=True)
        made, failed, runs = made + got["requests"], failed + got["errors"], runs + 1
        log(f"churn: {made:,} connections, {failed} failed")
    time.sleep(15)
    settle(b, workers_of(s))
    after = memory_mb(b)
    status = {name: admin_json(host, "/status") for name, host in (("a", s.a), ("b", s.b))}
    return {
        "connections": made,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 1),
        "pss_b_mb_before": before[0],
        "pss_b_mb_after": after[0],
        "rss_b_mb_before": before[1],
        "rss_b_mb_after": after[1],
        "growth_pss_b_mb": round(after[0] - before[0], 1),
        "status_workers": {k: v.get("workers") for k, v in status.items()},
        "status_handshakes": {k: v.get("handshakes") for k, v in status.items()},
        "tls_resumed_total_b": tls_resumed_b(s),
    }


def _at_most(procs: list[psutil.Process], n: int) -> bool:
    return len(tree(procs)) <= n


def settle(procs: list[psutil.Process], workers: int) -> None:
    """Idle means the supervisor, and with workers each worker: wait (10 s at
    most) for short-lived helpers (the conntrack cleanup child of a rules apply, a renewal)."""
    expected = 1 if workers == 0 else workers + 1
    with contextlib.suppress(BenchError):
        wait_for(partial(_at_most, procs, expected), "the helpers to end", timeout=10)


def workers_of(s: Setup) -> int:
    value = s.agent_proxy.get("workers", "1").strip('"')
    return len(os.sched_getaffinity(0)) if value == "auto" else int(value)


def memory_pass(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """b's idle Σ PSS (and Σ RSS) right after a start with each of `--memory-workers` (0: inline)."""
    out: dict[str, Any] = {}
    for workers in args.memory_workers:
        try:
            restart_agents(s, args, args.agent_config, {"workers": str(workers)})
            check_small(s, s.targets["meshagent"])  # every worker initialised and serving
        except (BenchError, subprocess.TimeoutExpired) as exc:
            out[str(workers)] = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
            log(f"memory workers={workers}: FAILED {str(exc)[-300:]}")
            continue
        b = s.targets["meshagent"].procs[1:]
        settle(b, workers)
        cpu0, t0 = cpu_by_pid(b), time.monotonic()
        time.sleep(2)
        idle_cpu = cpu_used(cpu0, cpu_by_pid(b)) / (time.monotonic() - t0)
        pss, rss = memory_mb(b)
        out[str(workers)] = {
            "pss_b_mb": pss,
            "rss_b_mb": rss,
            "idle_cpu_pct_b": round(100 * idle_cpu, 1),  # a busy idle tree inflates CPU/request
            "processes_b": len(tree(b)),
            "cmdlines_b": [" ".join(p.cmdline()[:6]) for p in tree(b)],
        }
        log(
            f"memory workers={workers}: b Σ PSS {pss} MB, Σ RSS {rss} MB, "
            f"{out[str(workers)]['processes_b']} processes"
        )
    return out


def run(args: argparse.Namespace, pinned: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    env = environment()  # the commit the daemons start from, not the one at the end
    env["loadavg"] = [round(x, 2) for x in os.getloadavg()]  # at the start, as the rules ask
    with lab_setup(args, pinned) as s:
        time.sleep(2)
        mem_idle = idle_memory(s.targets)  # started, not one connection through them yet
        log(f"idle memory: {mem_idle}")
        for target in s.targets.values():
            check_small(s, target)
        # Memory per connection on fresh processes: before any load has grown their heaps.
        log(f"holding {args.hold} connections through each proxy")
        held = {name: hold(s, s.targets[name], args.hold) for name in PROXIES}
        for target in s.targets.values():
            check_big(s, target, args.big_mib * 2**20)
        tls = tls_summary(s, identity_files(s.tmp / "state-a"))
        log(f"all four paths serve; TLS: {json.dumps(tls['meshagent'])}")
        processes = {name: len(tree(t.procs)) for name, t in s.targets.items() if t.procs}
        setup_s = time.monotonic() - started

        order = list(TARGETS)
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in TARGETS}
        log("warm-up: 2 s of wrk on each path")
        for name in order:
            try:
                wrk(s, s.targets[name], 2, close=False)
            except (BenchError, AssertionError, subprocess.TimeoutExpired) as exc:
                log(f"warm-up of {name} failed: {str(exc)[-300:]}")
        measures: list[tuple[str, Callable[[Target], dict[str, Any]]]] = [
            ("rps", lambda t: wrk(s, t, args.duration, close=False)),
            ("cps", lambda t: wrk(s, t, args.duration, close=True)),
            ("latency", lambda t: latency(s, t, args.rate, args.duration)),
            ("bulk", lambda t: bulk(s, t, args.bulk_runs)),
        ]
        neighbours = Neighbours(s)
        for r in range(args.main_rounds):
            turn = order[r % len(order) :] + order[: r % len(order)]
            for measure, fn in measures:
                for name in turn:
                    got = measure_once(args, neighbours, partial(fn, s.targets[name]))
                    raw[name].setdefault(measure, []).append(got)
                    log(f"round {r + 1} {measure:8} {name:10} {_brief(measure, got)}")
        profiles = {}
        if args.profile:
            log("profile pass: py-spy on both meshagent daemons under wrk (not part of the figures)")
            for close in (False, True):
                try:
                    prof = profile(s, s.targets["meshagent"], args.duration, close, RESULTS)
                except (BenchError, AssertionError, subprocess.TimeoutExpired) as exc:
                    log(f"profile pass failed: {str(exc)[-300:]}")
                    continue
                profiles["cps" if close else "rps"] = prof
        time.sleep(2)
        mem_after = idle_memory(s.targets)
        passes: dict[str, Any] = {}
        if not pinned:
            if args.resumed:
                log("cps_resumed: meshagent's defaults (resumption on) against haproxy's defaults")
                try:
                    passes["resumed"] = resumed_pass(s, args, neighbours)
                except (BenchError, AssertionError, subprocess.TimeoutExpired) as exc:
                    passes["resumed"] = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
                    log(f"cps_resumed pass FAILED: {str(exc)[-300:]}")
            if args.scaling_workers:
                log(f"scaling: meshagent with {args.scaling_workers} workers")
                passes["scaling"] = scaling_pass(s, args, neighbours)
            if args.memory_workers:
                log(f"memory: b's idle Σ PSS with {args.memory_workers} workers")
                passes["memory"] = memory_pass(s, args)
            if args.churn:
                log(f"churn: {args.churn:,} new connections with resumption on")
                try:
                    passes["churn"] = churn_pass(s, args)
                except (BenchError, AssertionError, subprocess.TimeoutExpired) as exc:
                    passes["churn"] = {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
                    log(f"churn pass FAILED: {str(exc)[-300:]}")
            if passes:
                restart_agents(s, args, args.agent_config)  # as configured, for whatever runs next
        cost = None
        if args.metrics_cost and not pinned:
            log("metrics cost: meshagent's requests/s with metrics on and off (daemons restarted)")
            cost = metrics_cost(s, args, neighbours)
        bench_s = time.monotonic() - started - setup_s
        config_proxy = dict(s.agent_proxy)
    result = summarize(args, raw, mem_idle, held, mem_after, tls, env, pinned)
    result["config"]["meshagent_proxy"] = config_proxy
    result["config"]["processes"] = processes
    result.update(passes)
    _pass_goals(result)
    if cost is not None:
        result["metrics_cost"] = cost
        result["goals"]["metrics_cost_pct"] = _goal(cost["rps_cost_pct"], "<", 5.0)
    if profiles:
        result["profile"] = profiles
    result["timing_s"] = {
        "setup": round(setup_s, 1),
        "measure": round(bench_s, 1),
        "total_with_teardown": round(time.monotonic() - started, 1),
    }
    return result


# --- traffic policy (#21): the cost of routes, --routes ---------------------------------------

ROUTE_POLICY = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: bench}}
spec:
  parentRefs: [{{group: meshagent.io, kind: Host, namespace: bench, name: server, port: {port}}}]
  rules:
  - backendRefs: [{{group: meshagent.io, kind: Host, namespace: bench, name: server, port: {port}}}]
"""
# Scenario -> the route objects it holds: none; one for another destination (b's port 9999:
# the route table is non-empty, 198.18.3.2:8080 is not in it); one for this destination (a
# default route, one backend: the same nginx through the HTTP path).
ROUTE_SCENARIOS = {
    "l4_no_routes": (),
    "l4_routes_elsewhere": (("bench-other", 9999),),
    "http_one_route": (("bench-other", 9999), ("bench-this", APP_PORT)),
}


def set_routes(s: Setup, objects: tuple[tuple[str, int], ...]) -> None:
    """Make the authority hold exactly `objects` (route apply / remove, as an operator does)
    and wait until a's agent holds the document with them."""
    where = ["--dir", str(s.tmp / "authority")]
    listed = json.loads(s.cl.run(*MESHAGENT, "authority", "route", "list", *where, "--json").stdout)
    names = {o[0] for o in objects}
    for item in listed if isinstance(listed, list) else listed.get("objects", []):
        if item["kind"] == "HTTPRoute" and item["name"] not in names:
            s.cl.run(*MESHAGENT, "authority", "route", "remove", "HTTPRoute", f"bench/{item['name']}", *where)
    if objects:
        path = s.tmp / "routes.yaml"
        path.write_text("---".join(ROUTE_POLICY.format(name=n, port=p) for n, p in objects))
        s.cl.run(*MESHAGENT, "authority", "route", "apply", *where, "-f", str(path))
    cache = s.tmp / "state-a" / "host-config.json"

    def held() -> bool:
        try:
            text = json.dumps(json.loads(cache.read_text()).get("routes", []))
        except (OSError, ValueError):
            return False
        return all(f'"{n}"' in text for n in names) and not any(
            f'"{n}"' in text for n in {"bench-other", "bench-this"} - names
        )

    wait_for(held, f"a's agent holding routes {sorted(names)}", timeout=30)


def _micro_doc() -> list[dict[str, Any]]:
    """A parent with an HTTPRoute of three rules (Exact, PathPrefix + header, catch-all 90/10),
    Host backends of two endpoints each: what one routed request is matched and picked against."""

    def ref(name: str, port: int) -> dict[str, Any]:
        return {
            "group": "meshagent.io",
            "kind": "Host",
            "namespace": "shop",
            "name": name,
            "port": port,
            "section": "",
        }

    def backend(name: str, weight: int, last: int) -> dict[str, Any]:
        endpoints = [
            {
                "address": f"198.18.{last}.{i}",
                "port": 8080,
                "identity": f"spiffe://cluster.local/ns/shop/sa/{name}",
                "server_name": f"{name}.shop.serviceaccount.identity.linkerd.cluster.local",
            }
            for i in (2, 3)
        ]
        return {"weight": weight, "ref": ref(name, 8080), "endpoints": endpoints, "accrual": None}

    no_timeouts = {
        "request_ms": None,
        "response_ms": None,
        "idle_ms": None,
        "attempt_ms": None,
        "backend_request_ms": None,
    }
    rules = [
        {
            "matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
            "backends": [backend("web-v1", 1, 2)],
        },
        {
            "matches": [
                {
                    "path": {"type": "PathPrefix", "value": "/api"},
                    "headers": [{"type": "Exact", "name": "x-canary", "value": "1"}],
                }
            ],
            "backends": [backend("web-v2", 1, 3)],
        },
        {"matches": [], "backends": [backend("web-v1", 90, 2), backend("web-v2", 10, 3)]},
    ]
    for rule in rules:
        rule.update(timeouts=no_timeouts, retry=None)
    route = {
        "group": "gateway.networking.k8s.io",
        "kind": "HTTPRoute",
        "namespace": "shop",
        "name": "web",
        "created": 0.0,
        "rules": rules,
    }
    parent = {**ref("web-v1", 8080), "addresses": ["198.18.2.2", "198.18.2.3"]}
    return [
        {
            "parent": parent,
            "budget": {"ratio": 0.2, "min_per_s": 10, "ttl_s": 10},
            "sources": [],
            "routes": [route],
        }
    ]


def routing_microbench(n: int = 100_000) -> dict[str, Any]:
    """µs per request for the pure routing work (no I/O): RouteTable.lookup, ParentPolicy.select
    (the catch-all rule: every candidate tried), Rule.pick over available backends, the P2C
    pick and its `finished` — on a quiet core, one process."""
    import random as _random

    from agent.proxy.http_balance import HttpBalancer
    from agent.proxy.routes import RequestView, parse_routes
    from agent.proxy.services import ServiceTable

    rejected: list[Any] = []
    services = ServiceTable()
    table = parse_routes(_micro_doc(), lambda w, d, r: rejected.append((w, r)), services)
    if rejected:
        raise BenchError(f"microbench routes rejected: {rejected}")
    balancer = HttpBalancer(_random.Random(1))
    rng = _random.Random(2)
    view = RequestView(b"GET", "/products/42", "", "web", {"accept": "*/*", "user-agent": "bench"})

    def one() -> None:
        policy = table.lookup("198.18.2.2", 8080)
        assert policy is not None
        rule = policy.select(view)
        assert rule is not None
        backend = rule.pick(rng, lambda b: balancer.available(b, b.resolve(services)))
        assert backend is not None
        pick = balancer.pick(backend, backend.resolve(services))
        assert pick is not None
        balancer.finished(pick, "success", 2)

    for _ in range(1000):
        one()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    us = (time.perf_counter() - t0) * 1e6 / n
    return {"requests": n, "us_per_request": round(us, 2), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def routes_run(args: argparse.Namespace) -> dict[str, Any]:
    """Design §7: meshagent's L4 path with no routes, with routes for another destination, and
    the HTTP path (one default route, one backend): requests/s (wrk, keep-alive) and p50/p99
    at a fixed rate (bench.loadgen), each round in that order, medians; ratios to the first."""
    env = environment()
    env["loadavg"] = [round(x, 2) for x in os.getloadavg()]  # at the start, as the rules ask
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in ROUTE_SCENARIOS}
    micro = routing_microbench()
    log(f"routing microbench (lookup + select + pick + P2C): {micro['us_per_request']} us/request")
    with lab_setup(args, pinned=False) as s:
        target = s.targets["meshagent"]
        neighbours = Neighbours(s)
        check_small(s, target)
        for r in range(args.rounds):
            for name, objects in ROUTE_SCENARIOS.items():
                set_routes(s, objects)
                check_small(s, target)
                wrk(s, target, 2, close=False)  # warm-up (pools, parsers)
                for measure, fn in (
                    ("rps", lambda: wrk(s, target, args.duration, close=False)),
                    ("latency", lambda: latency(s, target, args.routes_rate, args.duration)),
                ):
                    got = measure_once(args, neighbours, fn)
                    raw[name].setdefault(measure, []).append(got)
                    log(f"round {r + 1} {measure:8} {name:20} {_brief(measure, got)}")
        config_proxy = dict(s.agent_proxy)
    table: dict[str, dict[str, float | None]] = {}
    for name, runs in raw.items():
        lat = runs.get("latency", [])
        table[name] = {
            "rps": _median(runs.get("rps", []), "rps"),
            "cpu_us_per_req": _median(runs.get("rps", []), "proxy_cpu_us_per_req"),
            "p50_ms": _median(lat, "p50_ms"),
            "p99_ms": _median(lat, "p99_ms"),
        }
    base = table["l4_no_routes"]
    ratios = {
        name: {k: (round(v / base[k], 3) if v is not None and base[k] else None) for k, v in row.items()}
        for name, row in table.items()
    }
    return {
        "environment": env,
        "config": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "rate": args.routes_rate,
            "meshagent_proxy": config_proxy,
        },
        "table": table,
        "ratios_to_l4_no_routes": ratios,
        "routing_microbench": micro,
        "raw": raw,
    }


def print_routes(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(
        f"== traffic policy cost (meshagent {cfg['meshagent_proxy']}; {cfg['rounds']} round(s) of "
        f"{cfg['duration_s']} s, latency at {cfg['rate']:g} req/s; load average at start "
        f"{result['environment'].get('loadavg')})"
    )
    head = f"{'':22}{'req/s':>10}{'us/req':>9}{'p50 ms':>9}{'p99 ms':>9}   {'req/s÷L4':>9}{'p99÷L4':>8}"
    print(head)
    print("-" * len(head))
    for name, row in result["table"].items():
        r = result["ratios_to_l4_no_routes"][name]
        print(
            f"{name:22}{_fmt(row['rps']):>10}{_fmt(row['cpu_us_per_req']):>9}{_fmt(row['p50_ms']):>9}"
            f"{_fmt(row['p99_ms']):>9}   {_fmt(r['rps'], ratio=True):>9}{_fmt(r['p99_ms'], ratio=True):>8}"
        )
    micro = result.get("routing_microbench")
    if micro:
        print(f"routing work per request (lookup, select, pick, P2C; no I/O): {micro['us_per_request']} us")


def _pass_goals(result: dict[str, Any]) -> None:
    goals = result["goals"]
    resumed = result.get("resumed") or {}
    cps = resumed.get("cps_resumed") or {}
    if cps:
        ratio = (
            round(cps["meshagent"] / cps["haproxy"], 2)
            if cps.get("meshagent") and cps.get("haproxy")
            else None
        )
        goals["cps_resumed_vs_haproxy_default"] = _goal(ratio, ">=", 0.8)
    churn = result.get("churn") or {}
    if "growth_pss_b_mb" in churn:
        goals["churn_pss_growth_mb"] = _goal(churn["growth_pss_b_mb"], "<", 10.0)
    mem = {w: m for w, m in (result.get("memory") or {}).items() if "pss_b_mb" in m}
    if "1" in mem:
        goals["pss_idle_mb_1_worker"] = _goal(mem["1"]["pss_b_mb"], "<", 40.0)
        for w, m in mem.items():
            if int(w) > 1:  # (0 is the inline proxy: no worker to count)
                per = round((m["pss_b_mb"] - mem["1"]["pss_b_mb"]) / (int(w) - 1), 1)
                goals[f"pss_mb_per_extra_worker_{w}"] = _goal(per, "<", 15.0)


def _brief(measure: str, got: dict[str, Any]) -> str:
    if "error" in got:
        return f"FAILED: {got['error']}"
    others = got.get("others_cpu_pct", 0)
    top = ", ".join(got.get("others_top", []))
    return _brief_measure(measure, got) + (
        f"  [other processes: {others}% CPU: {top}]" if others >= 10 else ""
    )


def _brief_measure(measure: str, got: dict[str, Any]) -> str:
    if measure in ("rps", "cps"):
        extra = f" cpu {got['proxy_cpu_us_per_req']} us/req" if "proxy_cpu_us_per_req" in got else ""
        return f"{got['rps']:.0f}/s errors {got['errors']}{extra}"
    if measure == "latency":
        return (
            f"p50 {got['p50_ms']} ms p99 {got['p99_ms']} ms achieved {got['achieved_rps']}/s "
            f"queued {got['queued']} lost {got['lost']}"
        )
    return f"{got['mb_s']} MB/s {got['runs_mb_s']}"


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    """The median over the rounds that produced the value (failed runs have none)."""
    values = [r[key] for r in runs if key in r and "error" not in r]
    return float(statistics.median(values)) if values else None


def summarize(
    args: argparse.Namespace,
    raw: dict[str, dict[str, list[dict[str, Any]]]],
    mem_idle: dict[str, dict[str, float]],
    held: dict[str, dict[str, Any]],
    mem_after: dict[str, dict[str, float]],
    tls: dict[str, dict[str, str]],
    env: dict[str, Any],
    pinned: bool = False,
) -> dict[str, Any]:
    table: dict[str, dict[str, float | None]] = {}

    def row(label: str, values: dict[str, float | None]) -> None:
        table[label] = {t: values.get(t) for t in TARGETS}

    row("requests/s (keep-alive, c=50)", {t: _median(raw[t].get("rps", []), "rps") for t in TARGETS})
    row(
        "proxy CPU us/request (a+b)",
        {t: _median(raw[t].get("rps", []), "proxy_cpu_us_per_req") for t in PROXIES},
    )
    row("new TLS connections/s (c=50)", {t: _median(raw[t].get("cps", []), "rps") for t in TARGETS})
    row(
        "proxy CPU us/connection (a+b)",
        {t: _median(raw[t].get("cps", []), "proxy_cpu_us_per_req") for t in PROXIES},
    )
    row(f"p50 ms @ {args.rate:g} req/s", {t: _median(raw[t].get("latency", []), "p50_ms") for t in TARGETS})
    row(f"p99 ms @ {args.rate:g} req/s", {t: _median(raw[t].get("latency", []), "p99_ms") for t in TARGETS})
    row(f"bulk MB/s ({args.big_mib} MiB)", {t: _median(raw[t].get("bulk", []), "mb_s") for t in TARGETS})
    row(
        "failed (socket errors + non-2xx)",
        {
            t: float(sum(int(r.get("errors", 0)) for m in ("rps", "cps") for r in raw[t].get(m, [])))
            for t in TARGETS
        },
    )
    for side in "ab":
        row(f"Σ PSS idle MB, {side}", {t: mem_idle[t][f"pss_{side}_mb"] for t in PROXIES})
    for side in "ab":
        row(f"Σ RSS idle MB, {side}", {t: mem_idle[t][f"rss_{side}_mb"] for t in PROXIES})
    for side in "ab":
        row(f"Σ PSS {args.hold} conns MB, {side}", {t: held[t].get(f"pss_{side}_mb") for t in PROXIES})
    for side in "ab":
        row(f"Σ RSS {args.hold} conns MB, {side}", {t: held[t].get(f"rss_{side}_mb") for t in PROXIES})
    for side in "ab":
        row(f"Σ PSS idle after load MB, {side}", {t: mem_after[t][f"pss_{side}_mb"] for t in PROXIES})

    ratios: dict[str, dict[str, float | None]] = {}
    for label, values in table.items():
        mesh = values["meshagent"]
        ratios[label] = {
            other: (round(mesh / ref, 2) if mesh is not None and ref else None)
            for other in ("haproxy", "stunnel", "direct")
            for ref in [values[other]]
        }
    rps_label, bulk_label = "requests/s (keep-alive, c=50)", f"bulk MB/s ({args.big_mib} MiB)"
    p99_label = f"p99 ms @ {args.rate:g} req/s"
    cps_label = "new TLS connections/s (c=50)"
    goals = {
        "requests_per_s_vs_haproxy": _goal(ratios[rps_label]["haproxy"], ">=", 1.0, floor=0.8),
        "connections_per_s_vs_haproxy": _goal(ratios[cps_label]["haproxy"], ">=", 1.0),
        "bulk_vs_haproxy": _goal(ratios[bulk_label]["haproxy"], ">=", 1.0, floor=0.8),
        "p99_vs_haproxy": _goal(ratios[p99_label]["haproxy"], "<=", 1.5),
        "failed": _goal(table["failed (socket errors + non-2xx)"]["meshagent"], "<=", 0.0),
    }
    if pinned:  # one worker: the 1-worker memory goal applies to this table's idle figure
        goals["pss_idle_mb_1_worker"] = _goal(
            max(mem_idle["meshagent"][f"pss_{x}_mb"] for x in "ab"), "<", 40.0
        )
    errors: dict[str, dict[str, Any]] = {
        t: {
            m: sum(int(r.get("errors", 0)) + int(r.get("lost", 0)) for r in runs)
            for m, runs in raw[t].items()
        }
        for t in TARGETS
    }
    for t in TARGETS:
        failed = [
            f"{m}/round {i + 1}: {r['error']}"
            for m, runs in raw[t].items()
            for i, r in enumerate(runs)
            if "error" in r
        ]
        if "error" in held.get(t, {}):
            failed.append(f"hold: {held[t]['error']}")
        if failed:
            errors[t]["failed"] = failed
    max_rps = min(table[rps_label][t] or 0.0 for t in TARGETS)
    disturbed = [
        f"{t}/{m}/round {i + 1}: {r['others_cpu_pct']}%"
        for t in TARGETS
        for m, runs in raw[t].items()
        for i, r in enumerate(runs)
        if r.get("others_cpu_pct", 0) >= 10
    ]
    return {
        "config": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "rate": args.rate,
            "latency_connections": LATENCY_CONNECTIONS,
            "wrk_connections": WRK_CONNECTIONS,
            "big_mib": args.big_mib,
            "bulk_runs": args.bulk_runs,
            "hold_connections": args.hold,
            "haproxy_threads": 1 if pinned else (args.haproxy_threads or "default (one per CPU)"),
            "pinned": "a: CPU 0, b: CPU 1" if pinned else "no",
            "title": PINNED_TITLE
            if pinned
            else "as users run it: no pinning, haproxy and meshagent on every CPU",
            "agent_src": str(args.agent_src) if args.agent_src else "this checkout",
            "agent_config_extra": args.agent_config,
            "wait_quiet_s": args.wait_quiet,
            "rate_vs_slowest_max": round(args.rate / max_rps, 3) if max_rps else None,
        },
        "environment": env,
        "tls": tls,
        "table": table,
        "ratios_meshagent_to": ratios,
        "goals": goals,
        "errors": errors,
        "disturbed": disturbed,
        "held": held,
        "raw": raw,
    }


def _goal(value: float | None, op: str, target: float, floor: float | None = None) -> dict[str, Any]:
    if value is None:
        return {"value": None, "met": False}
    met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
    out: dict[str, Any] = {"value": value, "goal": f"{op} {target:g}", "met": met}
    if floor is not None:
        out["below_floor"] = value < floor
    return out


def environment() -> dict[str, Any]:
    def first_line(*argv: str) -> str:
        got = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (got.stdout + got.stderr).strip().splitlines()[0] if (got.stdout + got.stderr).strip() else ""

    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "none"
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    # The daemons run this checkout's agent/ (unless --agent-src): say whether it matched the commit.
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "agent"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "agent_uncommitted": changed,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "uvloop": uvloop_version,
        "haproxy": first_line("haproxy", "-v"),
        "stunnel": next(
            (
                line
                for line in subprocess.run(
                    ["stunnel", "-version"], capture_output=True, text=True, timeout=10
                ).stderr.splitlines()
                if line.startswith("stunnel")
            ),
            "",
        ),
        "nginx": first_line("nginx", "-v"),
        "wrk": first_line("wrk", "-v"),
        "openssl": first_line("openssl", "version"),
    }


def print_table(result: dict[str, Any]) -> None:
    table, ratios = result["table"], result["ratios_meshagent_to"]
    cfg = result["config"]
    print(
        f"== {cfg['title']} (meshagent {cfg.get('meshagent_proxy')}; "
        f"load average at start {result['environment'].get('loadavg')})"
    )
    width = max(len(k) for k in table)
    head = f"{'':{width}}  " + "".join(f"{t:>11}" for t in TARGETS) + "   mesh/hap  mesh/stun  mesh/dir"
    print(head)
    print("-" * len(head))
    for label, values in table.items():
        cells = "".join(f"{_fmt(values[t]):>11}" for t in TARGETS)
        r = ratios[label]
        rcells = "".join(f"{_fmt(r[o], ratio=True):>11}" for o in ("haproxy", "stunnel", "direct"))
        print(f"{label:{width}}  {cells}{rcells}")
    print()
    for name, goal in result["goals"].items():
        mark = "met" if goal["met"] else "NOT met"
        floor = " (below the 0.8x floor)" if goal.get("below_floor") else ""
        print(f"goal {name}: {goal['value']} {goal.get('goal', '')} -> {mark}{floor}")
    print_passes(result)
    cost = result.get("metrics_cost")
    if cost:
        print(
            f"metrics on/off: {cost['rps_on']:,.0f} / {cost['rps_off']:,.0f} requests/s "
            f"(medians), proxy CPU {cost['cpu_us_per_req_on']} / {cost['cpu_us_per_req_off']} us/request; "
            f"cost, median of the rounds' on/off pairs: {cost['rps_cost_pct']}% requests/s "
            f"{cost['rps_cost_pct_by_round']}, {cost['cpu_cost_pct']}% CPU {cost['cpu_cost_pct_by_round']}"
        )
    errors = {t: {m: n for m, n in e.items() if n} for t, e in result["errors"].items()}
    if any(errors.values()):
        print(f"errors seen: {errors}")
    if result["disturbed"]:
        print(f"measures during which other processes used >= 10% of a CPU: {result['disturbed']}")
    for kind, prof in result.get("profile", {}).items():
        for side in "ab":
            top = ", ".join(f"{frame} {pct}%" for frame, pct in prof[side]["top"]["self"][:6])
            print(f"profile {kind} {side}: {top}")
    for name, fields in result["tls"].items():
        print(f"tls {name}: {', '.join(f'{k}: {v}' for k, v in fields.items())}")
    print(f"timing: {result['timing_s']}")


def print_passes(result: dict[str, Any]) -> None:
    churn = result.get("churn")
    if churn:
        if "error" in churn:
            print(f"churn: FAILED {churn['error']}")
        else:
            print(
                f"churn: {churn['connections']:,} connections in {churn['seconds']} s, "
                f"failed {churn['failed']}; "
                f"b Σ PSS {churn['pss_b_mb_before']} -> {churn['pss_b_mb_after']} MB; "
                f"workers {churn['status_workers']}; handshakes {churn['status_handshakes']}"
            )
    resumed = result.get("resumed")
    if resumed:
        if "error" in resumed:
            print(f"cps_resumed: FAILED {resumed['error']}")
        else:
            cps, cpu = resumed["cps_resumed"], resumed["cpu_us_per_connection"]
            print(
                f"cps_resumed (resumption on, haproxy defaults): haproxy {_fmt(cps['haproxy'])}/s, "
                f"meshagent {_fmt(cps['meshagent'])}/s; CPU us/connection {_fmt(cpu['haproxy'])} / "
                f"{_fmt(cpu['meshagent'])}; failed {resumed['failed']}; "
                f"b's meshagent_tls_resumed_total {resumed['meshagent_tls_resumed_total_b']}"
            )
    for workers, got in (result.get("scaling") or {}).items():
        if "error" in got:
            print(f"scaling workers={workers}: FAILED {got['error']}")
        else:
            print(
                f"scaling workers={workers} ({got['processes_b']} processes on b): "
                f"{_fmt(got['rps'])} req/s at "
                f"{_fmt(got['cpu_us_per_req'])} CPU us/req; {_fmt(got['cps'])} conn/s at "
                f"{_fmt(got['cpu_us_per_conn'])} CPU us/conn; failed {got['failed']}"
            )
    for workers, got in (result.get("memory") or {}).items():
        if "error" in got:
            print(f"memory workers={workers}: FAILED {got['error']}")
        else:
            print(
                f"memory workers={workers} ({got['processes_b']} processes): "
                f"b idle Σ PSS {got['pss_b_mb']} MB "
                f"(Σ RSS {got['rss_b_mb']} MB), idle CPU {got.get('idle_cpu_pct_b')} %"
            )


def _fmt(value: float | None, ratio: bool = False) -> str:
    if value is None:
        return "-"
    if ratio:
        return f"{value:.2f}x"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def _stop(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log(f"{signal.Signals(signum).name}: stopping, tearing the lab down")
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk/latency run")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every measure; medians reported")
    parser.add_argument("--rate", type=float, default=1000, help="requests/s of the latency measure")
    parser.add_argument("--big-mib", type=int, default=256, help="size of the bulk file")
    parser.add_argument("--bulk-runs", type=int, default=3)
    parser.add_argument("--hold", type=int, default=1000, help="open connections for the RSS measure")
    parser.add_argument(
        "--haproxy-threads",
        type=int,
        default=None,
        help="haproxy's nbthread (default: no nbthread line, one thread per CPU, as haproxy ships)",
    )
    parser.add_argument(
        "--workers", default="auto", help="meshagent's proxy.workers for the main table [%(default)s]"
    )
    parser.add_argument(
        "--agent-proxy",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more [proxy] key for both agents (a TOML value), e.g. native_relay=true; repeatable",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help=f"then also the old setup, in a second lab, as an extra table: {PINNED_TITLE} "
        "(a's processes on CPU 0, b's on CPU 1)",
    )
    parser.add_argument(
        "--no-resumed", dest="resumed", action="store_false", help="skip the cps_resumed pass"
    )
    parser.add_argument(
        "--scaling-workers",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[1, 2],
        metavar="N,N",
        help="the scaling pass: meshagent's req/s and conn/s with these worker counts ('' skips) [1,2]",
    )
    parser.add_argument(
        "--memory-workers",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[0, 1, 2, 4],
        metavar="N,N",
        help="the memory pass: b's idle Σ PSS with these worker counts (0: the inline proxy; '' skips) "
        "[0,1,2,4]",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60,
        metavar="S",
        help="before each measure, wait up to S s (10 min in all) while other processes use >10%% "
        "of a CPU (0: never)",
    )
    parser.add_argument(
        "--agent-src",
        type=Path,
        help="run the daemons from this tree's agent/ (e.g. `git archive REV agent | tar -x -C DIR`), "
        "to compare a change against the same baselines",
    )
    parser.add_argument(
        "--agent-config",
        default="",
        metavar="TOML",
        help="appended to both agents' config, e.g. '[telemetry]\\nhttp_accounting = false'",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "dataplane.json", help="where the JSON goes [%(default)s]"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of 3 s runs, a 64 MiB file, one transfer"
    )
    parser.add_argument(
        "--churn",
        type=int,
        default=0,
        metavar="N",
        help="a last pass: N new connections with resumption on, b's Σ PSS before and after (0: skip)",
    )
    parser.add_argument("--churn-max-s", type=float, default=600, help="time limit of the churn pass")
    parser.add_argument(
        "--passes-only",
        action="store_true",
        help="skip the main table's measures (rps, cps, latency, bulk): only the passes after it",
    )
    parser.add_argument(
        "--profile", action="store_true", help="afterwards, py-spy both daemons under wrk (needs py-spy)"
    )
    parser.add_argument(
        "--no-metrics-cost",
        dest="metrics_cost",
        action="store_false",
        help="skip the last pass: meshagent's requests/s with metrics on and off, in at least 5 on/off pairs",
    )
    parser.add_argument(
        "--cost-rounds",
        type=int,
        default=COST_ROUNDS,
        metavar="N",
        help="on/off pairs of the metrics-cost pass, at least (more pairs: a tighter median) [%(default)s]",
    )
    parser.add_argument(
        "--routes",
        action="store_true",
        help="only the traffic-policy scenarios (design-21 §7): L4 without routes, L4 with routes for "
        "another destination, the HTTP path with one route; JSON to bench/results/dataplane-routes.json",
    )
    parser.add_argument(
        "--routes-rate", type=float, default=300, help="requests/s of --routes' latency measure"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.big_mib, args.bulk_runs = 3, 1, 64, 1
    args.main_rounds = 0 if args.passes_only else args.rounds
    reason = netns_supported()
    for tool in ("nginx", "haproxy", "stunnel", "wrk", "curl", "openssl", "nft", "fallocate"):
        if shutil.which(tool) is None:
            reason = reason or f"{tool} is not installed"
    if args.pin and (os.cpu_count() or 1) < 2:
        reason = reason or "--pin puts a and b on CPUs 0 and 1: it needs two CPUs"
    if args.profile and not Path(PY_SPY).exists():
        reason = reason or f"--profile needs py-spy ({PY_SPY}): .venv/bin/pip install py-spy"
    if args.agent_src and not (args.agent_src / "agent" / "cli" / "__main__.py").exists():
        reason = reason or f"--agent-src {args.agent_src} has no agent/cli/__main__.py"
    if args.agent_src:
        args.agent_src = args.agent_src.resolve()
    if args.metrics_cost and "[telemetry]" in args.agent_config.replace("\\n", "\n"):
        reason = reason or "--agent-config sets [telemetry]: add --no-metrics-cost"
    if reason:
        raise SystemExit(f"bench.dataplane: {reason}")
    RESULTS.mkdir(exist_ok=True)

    # Ctrl-C or SIGTERM ends the run through the finally blocks that tear the lab down, and a
    # second one cannot interrupt that teardown.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # even if we were started with SIGINT ignored
    # 1,000 held connections are ~2,000 sockets per proxy: lift the soft limit for our children.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    if args.routes:
        out = args.out if args.out != RESULTS / "dataplane.json" else RESULTS / "dataplane-routes.json"
        try:
            routes_result = routes_run(args)
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        out.write_text(json.dumps(routes_result, indent=2) + "\n")
        print_routes(routes_result)
        return
    try:
        result = run(args)
        if args.pin:
            log(PINNED_TITLE)
            result["pinned"] = run(args, pinned=True)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        ours = f"db{os.getpid() % 100000}x"
        left = [ns for ns in namespaces() if ns.startswith(ours)]
        if left:
            print(f"bench.dataplane: namespaces left behind: {left}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    if "pinned" in result:
        print()
        print_table(result["pinned"])


if __name__ == "__main__":
    main()
