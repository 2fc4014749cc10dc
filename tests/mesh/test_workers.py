"""`proxy.workers = 2` for real (issue #19): two worker processes share the listening ports
(SO_REUSEPORT) behind one agent; the agent's /metrics is their exact sum, a killed or hung worker
is replaced on the same sockets, a renewal, a SIGHUP and a SIGTERM reach every worker."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.intercept.apply import NFT_HOLD_COMMENT
from agent.netlab import netns_supported
from tests.mesh.conftest import PY, Agent, Mesh, build_mesh, fresh_metrics, wait_for
from tests.netns.intercept_support import require_backend
from tests.support import MESHAGENT, metric_samples, metric_sum

pytestmark = pytest.mark.netns

URL = "http://198.18.2.2:8080/hello.txt"  # b's app, reached by the unmeshed cluster host
ECHO_PORT = 9000
LOOP = Path(__file__).parent / "tools" / "http_loop.py"

# An HTTP app and a TCP echo on b (each connection its own thread).
APPS = f"""
import http.server, socket, socketserver, sys, threading
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
echo = socketserver.ThreadingTCPServer(("0.0.0.0", {ECHO_PORT}), Echo)
threading.Thread(target=echo.serve_forever, daemon=True).start()
handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=sys.argv[1])
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), handler).serve_forever()
"""

# N sequential HTTP/1.0 requests (a new connection each): prints how many got a 200.
REQUESTS = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for _ in range(n):
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /hello.txt HTTP/1.0\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        ok += b" 200 " in data.split(b"\\r\\n", 1)[0]
    except OSError:
        pass
print(ok)
"""


def with_workers(agent: Agent, workers: int) -> Agent:
    agent.config.write_text(
        agent.config.read_text().replace("[proxy]\n", f"[proxy]\nworkers = {workers}\n", 1)
    )
    return agent


def admin(mesh: Mesh, host_name: str, path: str) -> str:
    host = getattr(mesh, host_name)
    if path == "/metrics":  # exact counts: not a late worker's previous dump
        return fresh_metrics(host)
    return str(host.run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:4191{path}").stdout)


def status(mesh: Mesh, host_name: str) -> dict:  # type: ignore[type-arg]
    doc = json.loads(admin(mesh, host_name, "/status"))
    assert isinstance(doc, dict)
    return doc


def apps(mesh: Mesh) -> None:
    (mesh.tmp / "hello.txt").write_text("hello from the legacy host\n")
    mesh.b.popen(PY, "-c", APPS, str(mesh.tmp))
    wait_for(
        lambda: mesh.b.run("curl", "-sf", "http://127.0.0.1:8080/hello.txt", check=False).returncode == 0,
        "apps up",
    )


def start_b(mesh: Mesh, workers: int = 2, policy: str = "all-unauthenticated") -> Agent:
    apps(mesh)
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"], inbound_policy=policy)
    with_workers(b, workers).start()
    wait_for(
        lambda: len(status(mesh, "b")["workers"]) == workers and status(mesh, "b")["ready"], "b ready", b
    )
    return b


def requests(mesh: Mesh, n: int, port: int = 8080) -> int:
    return int(mesh.cl.run(PY, "-c", REQUESTS, "198.18.2.2", str(port), str(n)).stdout)


def per_worker(mesh: Mesh, families: tuple[str, ...]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The merged samples of `families`, and each worker's own (`/metrics?worker=N`)."""

    def pick(text: str) -> dict[str, float]:
        return {k: v for k, v in metric_samples(text).items() if k.split("{", 1)[0] in families}

    merged = pick(admin(mesh, "b", "/metrics"))
    return merged, [pick(admin(mesh, "b", f"/metrics?worker={w}")) for w in (0, 1)]


def test_metrics_merge_exactly_across_workers(mesh: Mesh) -> None:
    b = start_b(mesh)
    assert requests(mesh, 400) == 400, b.log.read_text()[-3000:]

    families = ("request_total", "response_latency_ms_bucket", "response_latency_ms_count", "tcp_open_total")
    merged, workers = per_worker(mesh, families)
    inbound = [
        metric_sum(admin(mesh, "b", f"/metrics?worker={w}"), "request_total", 'direction="inbound"')
        for w in (0, 1)
    ]
    assert all(n > 0 for n in inbound), inbound  # the kernel spread the connections over both
    assert metric_sum(admin(mesh, "b", "/metrics"), "request_total", 'direction="inbound"') == 400
    assert sum(inbound) == 400
    keys = set(merged) | set(workers[0]) | set(workers[1])
    assert any(k.startswith("response_latency_ms_bucket") for k in keys)
    for key in keys:
        assert merged.get(key, 0.0) == workers[0].get(key, 0.0) + workers[1].get(key, 0.0), key
    assert admin(mesh, "b", "/ready").strip() == "ready"
    doc = status(mesh, "b")
    assert [w["up"] for w in doc["workers"]] == [True, True]
    assert doc["connections"]["opened"], doc["connections"]


def held_echo(mesh: Mesh, count: int) -> list[subprocess.Popen[str]]:
    """`count` connections to b's echo port from cl, each kept open: a line in, its echo out."""
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(('198.18.2.2', {ECHO_PORT}), timeout=10)\n"
        "print(s.getsockname()[1], flush=True)\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        "        s.sendall(line.encode()); print('echo', s.recv(100).decode().strip() or 'eof', flush=True)\n"
        "    except OSError as e:\n"
        "        print('err', type(e).__name__, flush=True)\n"
    )
    procs = []
    for _ in range(count):
        p = mesh.cl.popen(PY, "-c", code, stdin=subprocess.PIPE)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None
        p.stdout.readline()
    return procs


def say(p: subprocess.Popen[str], text: str) -> str:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(text + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


def test_kill_9_one_worker_is_replaced(mesh: Mesh) -> None:
    b = start_b(mesh)
    held = held_echo(mesh, 10)
    assert all(say(p, "one") == "echo one" for p in held)
    wait_for(lambda: sum(w["open"] for w in status(mesh, "b")["workers"]) == 10, "pings see 10 open", b)
    before = status(mesh, "b")["workers"]
    victim = before[0]
    assert victim["open"] > 0, before  # (10 connections over two workers: slot 0 almost surely has some)

    offset = len(b.log.read_text())
    psutil.Process(victim["pid"]).kill()
    answers = [say(p, "two") for p in held]
    assert answers.count("echo two") == 10 - victim["open"], answers  # slot 1's connections live on
    wait_for(
        lambda: (w := status(mesh, "b")["workers"][0])["up"] and w["pid"] != victim["pid"],
        "slot 0 replaced",
        b,
        timeout=30,  # a replacement is a new interpreter: ~0.5 s idle, seconds on a loaded host
    )
    after = status(mesh, "b")["workers"]
    assert after[0]["restarts"] == 1 and after[0]["last_exit"] == "killed by SIGKILL", after
    assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == 0
    metrics = admin(mesh, "b", "/metrics")
    assert metric_sum(metrics, "meshagent_worker_lost_connections_total") == victim["open"]
    assert requests(mesh, 50) == 50
    assert admin(mesh, "b", "/ready").strip() == "ready"
    # While slot 0 was down, new connections were steered to slot 1: the real daemon's kernel
    # took the program (tests/daemon/test_workers_units.py proves where connections then go).
    log = b.log.read_text()[offset:]
    assert "event=workers.steered live=[1]" in log and "workers.steer_failed" not in log, log
    for p in held:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)


def test_sigterm_drains_every_worker(mesh: Mesh) -> None:
    """SIGTERM: the rules go first, then every worker drains: the agent waits for the open
    connections of both workers; a second SIGTERM cuts every worker's drain short: exit 0,
    no process left behind (as tests/mesh/test_faults.py's test_signals_while_draining, inline)."""
    apps(mesh)
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    b.config.write_text(b.config.read_text().replace("drain_timeout_s = 2.0", "drain_timeout_s = 60.0"))
    with_workers(b, 2).start()
    assert b.proc is not None
    held = held_echo(mesh, 8)
    assert all(say(p, "one") == "echo one" for p in held)
    wait_for(lambda: sum(w["open"] for w in status(mesh, "b")["workers"]) == 8, "pings see 8 open", b)
    workers = status(mesh, "b")["workers"]
    assert all(w["open"] > 0 for w in workers), workers  # both workers hold some
    tree = [c.pid for c in psutil.Process(b.proc.pid).children(recursive=True)]
    assert {w["pid"] for w in workers} <= set(tree)

    b.proc.send_signal(signal.SIGTERM)
    # Capture stops at once; the holding table (no redirect) keeps the open connections' NAT.
    wait_for(lambda: "intercept.capture_stopped" in b.log.read_text(), "capture stopped", b)
    ruleset = mesh.b.run("nft", "list", "ruleset").stdout
    assert NFT_HOLD_COMMENT in ruleset and "redirect" not in ruleset.replace(NFT_HOLD_COMMENT, "")
    assert all(say(p, "two") == "echo two" for p in held)  # still relayed while draining
    time.sleep(1.0)
    assert b.proc.poll() is None  # draining: the connections are still open
    assert all(psutil.pid_exists(w["pid"]) for w in workers)  # each worker waits for its own
    b.proc.send_signal(signal.SIGTERM)  # a second one cuts the drain short, in every worker
    assert b.proc.wait(timeout=10) == 0
    log = b.log.read_text()
    stopped, drained = log.index("intercept.capture_stopped"), log.index("workers.stopped")
    assert stopped < drained < log.index("intercept.removed")
    assert "meshagent" not in mesh.b.run("nft", "list", "ruleset").stdout  # the holding table too
    assert "killed=0" in log  # every worker exited by itself
    assert log.count("event=proxy.stopped") == 2
    for p in held:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
    alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive


@pytest.mark.parametrize("backend", ["iptables-nft", "iptables-legacy"])
def test_sigterm_with_an_iptables_backend_keeps_draining_connections(mesh: Mesh, backend: str) -> None:
    """The daemon's stop with an iptables backend (tests/intercept/test_stop_capture.py proves the
    hold itself on every backend and mode): SIGTERM takes the capture down at once, the held
    connections keep being relayed through the drain, and at exit nothing of ours is left."""
    saves = (f"{backend}-save", f"{backend.replace('iptables', 'ip6tables')}-save")  # (IPv6 is on)
    for tool in saves:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    require_backend(mesh.b, backend)  # (a kernel without legacy iptables skips it)

    def rules() -> str:
        return "".join(str(mesh.b.run(tool).stdout) for tool in saves)

    apps(mesh)
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    config = b.config.read_text().replace("drain_timeout_s = 2.0", "drain_timeout_s = 60.0")
    b.config.write_text(config.replace("[intercept]\n", f'[intercept]\nbackend = "{backend}"\n', 1))
    with_workers(b, 1).start()
    assert b.proc is not None
    assert rules().count("REDIRECT") >= 2  # this backend captures, both families
    held = held_echo(mesh, 4)
    assert all(say(p, "one") == "echo one" for p in held)
    wait_for(lambda: sum(w["open"] for w in status(mesh, "b")["workers"]) == 4, "pings see 4 open", b)

    b.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "intercept.capture_stopped" in b.log.read_text(), "capture stopped", b)
    held_rules = rules()
    assert held_rules.count("draining") == 2 and "REDIRECT" not in held_rules, held_rules
    # Removing the rules outright reset every one of these (they were conntrack's last users).
    assert all(say(p, "two") == "echo two" for p in held)
    assert b.proc.poll() is None  # draining: the connections are still open
    b.proc.send_signal(signal.SIGTERM)  # a second one cuts the drain short
    assert b.proc.wait(timeout=10) == 0
    log = b.log.read_text()
    assert log.index("intercept.capture_stopped") < log.index("intercept.removed")
    assert "meshagent" not in rules().lower()  # the holding rules went with the rest, chains too
    for p in held:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)


def test_sighup_reaches_every_worker(mesh: Mesh) -> None:
    b = start_b(mesh)
    assert requests(mesh, 20) == 20  # permissive
    b.config.write_text(
        b.config.read_text().replace(
            'default_policy = "all-unauthenticated"', 'default_policy = "all-authenticated"'
        )
    )
    assert b.proc is not None
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload.done" in b.log.read_text(), "reload", b)
    fresh_metrics(mesh.b, agent=b)  # every worker applied the new directory (it is sent, no reply awaited)
    assert requests(mesh, 50) == 0  # every worker refuses plaintext now


def test_rotation_reaches_every_worker_without_dropping(tmp_path: Path) -> None:
    """30 s certificates: the agent renews after ~21 s under a request loop; every worker takes
    the new certificate and the new ticket key within 5 s of the agent, no request fails, an
    open connection lives on."""
    if netns_supported():
        pytest.skip(str(netns_supported()))
    with build_mesh(tmp_path, "--cert-lifetime", "30s") as mesh:
        b = start_b(mesh)
        held = held_echo(mesh, 1)[0]
        assert say(held, "before") == "echo before"
        first = status(mesh, "b")["identity"]["serial"]
        assert {w["serial"] for w in status(mesh, "b")["workers"]} == {first}
        keys = {w["ticket_key_name"] for w in status(mesh, "b")["workers"]}
        assert len(keys) == 1 and "" not in keys  # one ticket key: a ticket resumes on any worker
        loop = mesh.cl.popen(PY, str(LOOP), "198.18.2.2", "8080", "30", "0.1", "5")
        wait_for(lambda: status(mesh, "b")["identity"]["serial"] != first, "the agent renewed", b, timeout=30)
        # The authority backdates certificates by 60 s, so a "30 s" one renews again within
        # 0.4-7.5 s: compare the workers with the agent's serial of the same moment.
        seen: list[dict[str, Any]] = []

        def workers_on_agents_serial() -> bool:
            now = status(mesh, "b")
            seen[:] = [now]
            return {w["serial"] for w in now["workers"]} == {now["identity"]["serial"]} != {first}

        wait_for(workers_on_agents_serial, "every worker on the agent's new certificate", b, timeout=5)
        assert "tls.reloaded" in b.log.read_text()
        renewed_keys = {w["ticket_key_name"] for w in seen[0]["workers"]}
        assert len(renewed_keys) == 1 and renewed_keys != keys  # a renewal replaces the ticket key
        out, _ = loop.communicate(timeout=60)
        lines = out.splitlines()
        assert len(lines) > 100 and [line for line in lines if " ok " not in line] == []
        assert say(held, "after") == "echo after"


def test_hung_worker_is_replaced_and_watchdog_continues(mesh: Mesh, tmp_path: Path) -> None:
    """A stopped worker (SIGSTOP) is killed and replaced after 10 s of silence, while systemd's
    watchdog (a fake NOTIFY_SOCKET) keeps getting WATCHDOG=1 from the agent."""
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    watchdogs: list[float] = []
    done = threading.Event()

    def read() -> None:  # as systemd does: at once (a full queue would block the agent's send)
        while not done.is_set():
            try:
                if b"WATCHDOG=1" in sock.recv(4096):
                    watchdogs.append(time.monotonic())
            except TimeoutError:
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    apps(mesh)
    b = with_workers(mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"]), 2)
    out = open(b.log, "a")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "2000000"}
    b.proc = mesh.b.popen(*MESHAGENT, "run", "--config", str(b.config), stdout=out, stderr=out, env=env)
    try:
        wait_for(lambda: "daemon.ready" in b.log.read_text(), "b ready", b)
        victim = status(mesh, "b")["workers"][0]
        psutil.Process(victim["pid"]).suspend()
        start = time.monotonic()
        wait_for(
            lambda: (w := status(mesh, "b")["workers"][0])["up"] and w["pid"] != victim["pid"],
            "the hung worker replaced",
            b,
            timeout=60,  # the kill at 10-12 s, then a new interpreter's start (seconds when loaded)
        )
        replaced_s = time.monotonic() - start
        assert replaced_s > 9, replaced_s  # not killed before 10 s of silence
        # Killed on the first 2 s ping round (1 s ping wait + 1 s pause) past 10 s: 10-12 s, 2 s
        # more for a slow loop. Read from the agent, so the respawn's time does not count.
        hung = re.search(r"event=worker\.hung .*?silent_s=([0-9.]+)", b.log.read_text())
        assert hung is not None and 10 <= float(hung[1]) < 14, b.log.read_text()[-3000:]
        assert len([t for t in watchdogs if t > start]) >= 5  # the agent fed systemd's watchdog throughout
        assert status(mesh, "b")["workers"][0]["last_exit"] == "killed by SIGKILL"
        assert requests(mesh, 20) == 20
    finally:
        done.set()
        reader.join(timeout=2)
        sock.close()


def test_idle_memory_by_workers(mesh: Mesh) -> None:
    """Σ PSS over the agent's processes (shared pages once, as the cgroup counts) when idle after
    its start (the issue's goals), and after a few requests, with the inline proxy (0) and 1, 2
    and 4 workers."""
    apps(mesh)
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    idle: dict[int, float] = {}
    served: dict[int, float] = {}
    base = b.config.read_text()
    for workers in (0, 1, 2, 4):
        b.config.write_text(base.replace("[proxy]\n", f"[proxy]\nworkers = {workers}\n", 1))
        b.log.write_text("")  # start() waits for this run's daemon.ready
        b.start()
        assert b.proc is not None
        main = psutil.Process(b.proc.pid)
        time.sleep(1.0)
        idle[workers] = _agent_pss_mb(main, workers)
        assert requests(mesh, 20) == 20
        time.sleep(1.0)
        served[workers] = _agent_pss_mb(main, workers)
        ready = [line for line in b.log.read_text().splitlines() if "event=daemon.ready" in line]
        assert len(ready) == 1 and f" workers={workers}" in ready[0], ready  # says how it runs
        assert b.stop() == 0
    print("Σ PSS (MB) by workers, idle:", {k: round(v, 1) for k, v in idle.items()})
    print("Σ PSS (MB) by workers, after 20 requests:", {k: round(v, 1) for k, v in served.items()})
    # The goal is < 40 MB with one worker: the benchmark judges it (36.6 MB idle there); this
    # agent (DNS, probes on) measured 38.1-38.2 here, and another runner's shared libraries
    # move Σ PSS by a little, so the test guards the layout with 2 MB to spare.
    assert idle[0] < 40 and idle[1] < 42
    assert idle[2] - idle[1] < 15  # the first extra worker: the goal (measured ~7)
    assert (idle[4] - idle[2]) / 2 < 15  # each worker past the second (measured ~6.5)
    # After traffic each worker holds its connections' state too (measured +1.5-2 MB a worker).
    assert served[1] < 45 and (served[4] - served[1]) / 3 < 15


def _agent_pss_mb(main: psutil.Process, workers: int) -> float:
    """Σ PSS of the agent and its workers (forked copies: the same command line), not of a
    short-lived helper it runs (nft, conntrack) that a scan might catch."""
    procs = [p for p in (main, *main.children(recursive=True)) if p.cmdline() == main.cmdline()]
    assert len(procs) == (1 if workers == 0 else workers + 1), procs
    return float(sum(p.memory_full_info().pss for p in procs)) / 2**20


def test_tproxy_with_workers(mesh: Mesh) -> None:
    """TPROXY hands a captured connection to a transparent socket of the reuseport group: every
    slot's inbound socket is transparent, so meshed connections land on both workers."""
    apps(mesh)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    b.config.write_text(
        b.config.read_text().replace(
            "[intercept]\n", '[intercept]\ninbound_mode = "tproxy"\nbackend = "nft"\n'
        )
    )
    with_workers(b, 2).start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    assert "tproxy" in mesh.b.run("nft", "list", "ruleset").stdout
    got = mesh.a.run(PY, "-c", REQUESTS, "198.18.3.2", "8080", "40").stdout
    assert int(got) == 40, b.log.read_text()[-3000:]
    fresh_metrics(mesh.b, agent=b)  # every worker's dump is from after the requests
    meshed = [
        metric_sum(
            admin(mesh, "b", f"/metrics?worker={w}"), "request_total", 'direction="inbound"', 'tls="true"'
        )
        for w in (0, 1)
    ]
    assert sum(meshed) == 40 and all(n > 0 for n in meshed), meshed


def test_workers_answer_a_repeated_peer_chain_from_their_verification_caches(mesh: Mesh) -> None:
    """Real agents, 2 workers on b, a's resumption off (every connection a full handshake): each
    worker verifies the peer's chain once and answers the rest from its cache, on both ends, and
    /status sums the workers' counts (#19's verification cache, proxy.tls_verify_cache on by
    default)."""
    apps(mesh)
    a = mesh.enroll(mesh.a, "shop/web", "198.18.1.1", ["198.18.3.1"])
    b = mesh.enroll(mesh.b, "shop/legacy", "198.18.2.1", ["198.18.3.2", "198.18.2.2"])
    a.config.write_text(a.config.read_text().replace("[proxy]\n", "[proxy]\ntls_resumption = false\n", 1))
    with_workers(b, 2).start()
    a.start()
    wait_for(lambda: (a.state / "host-config.json").exists(), "a's catalog", a)
    got = mesh.a.run(PY, "-c", REQUESTS, "198.18.3.2", "8080", "40").stdout
    assert int(got) == 40, b.log.read_text()[-3000:]

    def checks(host_name: str) -> tuple[int, int, int]:
        doc = status(mesh, host_name)
        shakes, workers = doc["handshakes"], len(doc.get("workers") or [1])
        return shakes.get("chains_verified", 0), shakes.get("chains_cached", 0), workers

    for name, agent in (("b", b), ("a", a)):
        wait_for(lambda n=name: sum(checks(n)[:2]) == 40, f"{name}: 40 chain checks reported", agent)
        verified, cached, workers = checks(name)
        assert 1 <= verified <= workers and cached == 40 - verified, (name, verified, cached, workers)
