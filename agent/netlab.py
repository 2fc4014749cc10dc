"""Network-namespace "hosts": real kernels, real packets, nothing left behind.

Used by `meshagent demo` to build its small world, and by the test suites and benchmarks.

    with Lab() as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b)                 # veth pair, 198.18.N.1/24 + 2001:db8:N::1/64 on a, .2 on b
        a.run("ip", "addr")            # = ip netns exec <a> ip addr
        srv = b.popen(sys.executable, "server.py")   # tracked; killed by pid at the end

Rules of the house, kept here so every suite keeps them:
- only namespaces this Lab created are touched; the root namespace never is;
- addresses only from 198.18.0.0/15 (RFC 2544 benchmarking) and 2001:db8::/32 (documentation);
- on exit, even after a failure: every process started here is ended by its pid (and any other
  process still inside one of our namespaces, which can only be one we started), then every
  namespace is deleted; veth pairs go with them.

The pytest fixtures `lab` and `two_hosts` (tests/netns/conftest.py) wrap this.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_counter = itertools.count(1)
DEFAULT_TIMEOUT = 60.0


def netns_supported() -> str | None:
    """None if namespaces can be made here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    return None


@dataclass
class Host:
    """One network namespace; `run`/`popen` execute inside it with `ip netns exec`."""

    lab: Lab
    name: str
    ns: str
    addr4: list[str] = field(default_factory=list)
    addr6: list[str] = field(default_factory=list)

    def argv(self, argv: Sequence[str], user: int | None = None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
        return [*prefix, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        user: int | None = None,
        input: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(argv, user),
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {' '.join(argv)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def sh(self, script: str, check: bool = True) -> str:
        return self.run("sh", "-c", script, check=check).stdout

    def popen(self, *argv: str, user: int | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a long-running process inside the namespace; the Lab ends it (by pid) on exit."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self.argv(argv, user), **kwargs)
        self.lab.processes.append(proc)
        return proc

    @property
    def ip4(self) -> str:
        return self.addr4[0]

    @property
    def ip6(self) -> str:
        return self.addr6[0]

    def ip(self, family: int) -> str:
        return self.ip4 if family == 4 else self.ip6


class Lab:
    """A set of namespaces and links that is always torn down."""

    def __init__(self, prefix: str = "mt") -> None:
        self.tag = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"
        self.hosts: list[Host] = []
        self.processes: list[subprocess.Popen[str]] = []
        self._links = 0

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        ns = f"{self.tag}-{name}"
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
        host = Host(self, name, ns)
        self.hosts.append(host)
        # no duplicate address detection in this namespace: addresses (link-local too) are
        # final the moment they are added, so the host's state does not change under a test
        for conf in ("all", "default"):
            host.run("sysctl", "-q", "-w", f"net.ipv6.conf.{conf}.accept_dad=0")
        host.run("ip", "link", "set", "lo", "up")
        return host

    def link(self, a: Host, b: Host) -> int:
        """A veth pair a<->b: 198.18.N.1/24 and 2001:db8:N::1/64 on a, .2 / ::2 on b. Returns N."""
        self._links += 1
        n = self._links
        va, vb = f"{self.tag[-9:]}a{n}", f"{self.tag[-9:]}b{n}"
        a.run("ip", "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b.ns)
        for host, dev, last in ((a, va, 1), (b, vb, 2)):
            v4, v6 = f"198.18.{n}.{last}", f"2001:db8:{n}::{last}"
            host.run("ip", "addr", "add", f"{v4}/24", "dev", dev)
            host.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            host.run("ip", "link", "set", dev, "up")
            host.addr4.append(v4)
            host.addr6.append(v6)
        return n

    def add_address(self, host: Host, v4: str, v6: str, link: int = 1) -> None:
        """Another address on `host`'s side of link N (same subnet, so the peer reaches it).

        Never picked as a source address: IPv4 makes it secondary, IPv6 gets it deprecated."""
        dev = f"{self.tag[-9:]}{'a' if host.addr4[0].endswith('.1') else 'b'}{link}"
        host.run("ip", "addr", "add", f"{v4}/24", "dev", dev)
        host.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad", "preferred_lft", "0")

    def close(self) -> None:
        for proc in self.processes:
            _end(proc.pid, proc)
        for host in self.hosts:
            # anything still inside one of our namespaces was started by this test
            pids = subprocess.run(
                ["ip", "netns", "pids", host.ns], capture_output=True, text=True, timeout=30
            ).stdout.split()
            for pid in pids:
                _end(int(pid), None)
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, timeout=30)
        self.hosts.clear()
        self.processes.clear()


def _end(pid: int, proc: subprocess.Popen[str] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if proc is None:
        return
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=10)
    except ValueError:
        proc.wait(timeout=10)


def namespaces() -> list[str]:
    """Names from `ip netns list` (to check nothing is left behind)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_by_prefix(prefix: str) -> list[str]:
    """End every process in, and delete, each namespace whose name starts with `prefix`
    (`meshagent demo down` after `--keep`). Returns the names removed."""
    removed = []
    for ns in namespaces():
        if not ns.startswith(prefix):
            continue
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:
            _end(int(pid), None)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        removed.append(ns)
    return removed
