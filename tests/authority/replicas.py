"""Several real `meshagent authority serve` processes behind one haproxy (TCP mode): a harness
for the replica tests and the fleet benchmark.

Replica i listens on 127.0.0.(2+i) (all of 127/8 is loopback, so no namespace is needed) and
shares the authority directory (keys, CA) and the registry database with the others. haproxy
forwards TLS untouched (mode tcp: the CA pin stays end to end) to the replicas, checks each
with a TCP connect every 250 ms and takes one out after two failed checks: a replica killed
with SIGKILL refuses at once, so it stops getting new connections within about half a second,
while a replica merely slow to accept (a full accept queue under load) has 3 s to answer a
check before it counts as failed (200 ms took a busy replica out and left haproxy with none:
every client then saw its connection closed, a collapse of our own making); connections
that were open to it are cut, and the client retries (that is the client's job, as for any
load balancer).

Everything started here is stopped by `stop()` (and by leaving the context manager), also when
start-up fails half-way: each replica is its own session, killed with its group. If the process
that started them dies without stopping them (SIGKILL), the kernel sends each replica and
haproxy SIGTERM (a parent-death signal, bench/fleet_reaper.py): start them from a thread that
outlives them (the signal follows the thread that forked, not the process).

One haproxy process holds two descriptors per forwarded connection, and the file limit may be
fixed below what a fleet needs (20,000 here, and no CAP_SYS_RESOURCE to raise it: maxconn 9,900,
while 10,000 agents hold 20,000 connections). `haproxies=N` runs N haproxy processes on the
same address (SO_REUSEPORT, haproxy's default on Linux: the kernel spreads new connections over
them), each with its own stats socket; `server_states` merges their views.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.fleet_reaper import pdeathsig_prefix
from tests.support import MESHAGENT, run_cli

HAPROXY = "haproxy"
CHECK_INTERVAL_MS = 250


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _haproxy_maxconn() -> int:
    """What the file limit allows (two descriptors a forwarded connection): haproxy refuses to
    start when its maxconn needs more than the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 60000 if hard == resource.RLIM_INFINITY else max(256, min(60000, (hard - 200) // 2))


def client_context(ca_file: str | Path) -> ssl.SSLContext:
    """Verify the authority against its API CA, not its name: as agent/identity/client.py does
    (the pinned CA signs nothing else), so replicas on 127.0.0.x need no SAN of their own."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    return ctx


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Replica:
    name: str
    host: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Replicas:
    """`count` replicas of the authority in `directory` (initialised here if it is not), on
    `database` (a postgresql:// URL; None: the directory's SQLite file, which replicas on one
    machine can share too), behind haproxy at `url`."""

    directory: Path
    count: int = 3
    database: str | None = None
    workers: int = 1
    serve_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    haproxies: int = 1
    # Called with each process's pid as it starts (a replica, a haproxy): bench/fleet.py's Reaper.
    on_spawn: Callable[[int], None] | None = None
    replicas: list[Replica] = field(default_factory=list)
    haproxy_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def haproxy(self) -> subprocess.Popen[bytes] | None:
        """The first haproxy (the only one unless `haproxies` > 1)."""
        return self.haproxy_procs[0] if self.haproxy_procs else None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        return str(self.directory / "api-ca.crt")

    @property
    def tls(self) -> ssl.SSLContext:
        return client_context(self.ca_file)

    @property
    def run_dir(self) -> Path:
        return self.directory.parent

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.database:
            # Contract §1: the env names the database for every command (init, serve, token).
            env["MESHAGENT_AUTHORITY_DATABASE"] = self.database
        return env

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> Replicas:
        try:
            if not (self.directory / "authority.json").exists():
                run_cli(
                    "authority", "init", "--dir", str(self.directory), "--trust-domain", "cluster.local",
                    "--san", "127.0.0.1", env=self._env(), check=True,
                )  # fmt: skip
            for i in range(self.count):
                host = f"127.0.0.{2 + i}"
                name = f"r{i}"
                replica = Replica(name, host, free_port(host), self.run_dir / f"replica-{name}.log")
                self.replicas.append(replica)
                self._spawn(replica)
            for replica in self.replicas:
                self.wait_healthy(replica)
            self._start_haproxy()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, replica: Replica) -> None:
        database = ["--database", self.database] if self.database else []
        log = open(replica.log_path, "ab")  # noqa: SIM115 - the child keeps it
        try:
            replica.proc = subprocess.Popen(
                [
                    *pdeathsig_prefix(), *MESHAGENT, "authority", "serve", "--dir", str(self.directory),
                    "--listen", f"{replica.host}:{replica.port}", "--workers", str(self.workers),
                    *database, *self.serve_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        if self.on_spawn is not None:
            self.on_spawn(replica.proc.pid)

    def wait_healthy(self, replica: Replica, timeout_s: float = 30) -> None:
        def healthy() -> bool:
            if replica.proc is None or replica.proc.poll() is not None:
                raise AssertionError(
                    f"replica {replica.name} exited:\n{replica.log_path.read_text()[-3000:]}"
                )
            return self._answers(replica.url)

        _poll_until(
            healthy,
            timeout_s,
            lambda: (
                f"replica {replica.name} not healthy in {timeout_s}s:\n{replica.log_path.read_text()[-3000:]}"
            ),
        )

    def _answers(self, url: str) -> bool:
        """GET /healthz at `url` answers 200."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{url}/healthz", verify=self.tls, timeout=1).status_code == 200
        return False

    def _haproxy_socket(self, i: int) -> Path:
        return self.run_dir / ("haproxy.sock" if i == 0 else f"haproxy-{i}.sock")

    def _haproxy_config(self, i: int) -> str:
        servers = "\n".join(
            f"    server {r.name} {r.host}:{r.port} check inter {CHECK_INTERVAL_MS}ms fall 2 rise 1"
            for r in self.replicas
        )
        # leastconn: long polls hold connections for 30 s; round robin would pile them unevenly
        # after a replica comes back. redispatch + retries: a connect refused by a dead replica
        # is retried on another before the client sees anything.
        return f"""global
    maxconn {_haproxy_maxconn()}
    stats socket {self._haproxy_socket(i)} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout check 3s
    timeout client 120s
    timeout server 120s
    retries 2
    option redispatch
frontend authority
    bind 127.0.0.1:{self.port}
    default_backend replicas
backend replicas
    balance leastconn
{servers}
"""

    def _start_haproxy(self) -> None:
        self.port = free_port()
        for i in range(self.haproxies):
            suffix = "" if i == 0 else f"-{i}"
            config = self.run_dir / f"haproxy{suffix}.cfg"
            config.write_text(self._haproxy_config(i))
            log = open(self.run_dir / f"haproxy{suffix}.log", "ab")  # noqa: SIM115 - the child keeps it
            try:
                proc = subprocess.Popen(
                    [*pdeathsig_prefix(), HAPROXY, "-db", "-f", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                log.close()
            self.haproxy_procs.append(proc)
            if self.on_spawn is not None:
                self.on_spawn(proc.pid)

        def forwarding() -> bool:
            for i, proc in enumerate(self.haproxy_procs):
                if proc.poll() is not None:
                    log = self.run_dir / ("haproxy.log" if i == 0 else f"haproxy-{i}.log")
                    raise AssertionError(f"haproxy exited:\n{log.read_text()[-3000:]}")
            states = self.server_states()
            return (
                len(states) == len(self.replicas)
                and all(s == "UP" for s in states.values())
                and (self._answers(self.url))
            )

        _poll_until(
            forwarding, 10, lambda: "haproxy did not forward to every replica within 10s", every_s=0.05
        )

    def stop(self) -> None:
        for proc in self.haproxy_procs:
            _kill_group(proc, grace_s=5)
        for replica in self.replicas:
            if replica.proc is not None:
                _kill_group(replica.proc)

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- failure -----------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """kill -9 replica `index` (its process, by pid: what a crash or the OOM killer does)."""
        replica = self.replicas[index]
        os.kill(replica.pid, signal.SIGKILL)
        assert replica.proc is not None
        replica.proc.wait()

    def restart(self, index: int) -> None:
        """Start replica `index` again on its address (after kill)."""
        replica = self.replicas[index]
        self._spawn(replica)
        self.wait_healthy(replica)

    def server_states(self) -> dict[str, str]:
        """haproxy's view: replica name -> UP / DOWN (from the stats sockets). With several
        haproxies a state is reported when all agree ("UP/DOWN" while they do not)."""
        views = [self._server_states(self._haproxy_socket(i)) for i in range(max(1, len(self.haproxy_procs)))]
        merged: dict[str, str] = {}
        for name in views[0]:
            seen = sorted({view.get(name, "") for view in views})
            merged[name] = "/".join(seen)
        return merged

    @staticmethod
    def _server_states(socket_path: Path) -> dict[str, str]:
        path = str(socket_path)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(path)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname", "").startswith("r"):
                states[row["svname"]] = row.get("status", "").split(" ")[0]
        return states

    def wait_state(self, index: int, state: str, timeout_s: float = 10) -> float:
        """Seconds until haproxy reports replica `index` in `state` (UP / DOWN)."""
        started = time.monotonic()
        name = self.replicas[index].name
        _poll_until(
            lambda: self.server_states().get(name) == state,
            timeout_s,
            lambda: f"haproxy did not report {name} {state} within {timeout_s}s: {self.server_states()}",
            every_s=0.02,
        )
        return time.monotonic() - started


def _poll_until(
    condition: Callable[[], bool], timeout_s: float, failure: Callable[[], str], every_s: float = 0.1
) -> None:
    """Until `condition()` holds (a state waited for, not a duration assumed); AssertionError
    with `failure()` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(failure())
        time.sleep(every_s)


@contextlib.contextmanager
def running_replicas(
    directory: Path, count: int = 3, database: str | None = None, **kw: object
) -> Iterator[Replicas]:
    replicas = Replicas(directory, count, database, **kw)  # type: ignore[arg-type]
    replicas.start()
    try:
        yield replicas
    finally:
        replicas.stop()
