"""Real Debian 12 VMs in qemu for the systemd tests, with nothing changed on this host's network.

- The image is built once with debootstrap and cached outside the repo (MESHAGENT_VM_CACHE,
  default /var/cache/meshagent-vm), keyed by a hash of the package list and the setup script;
  it is rebuilt only when missing. No loop mounts: the root file system is made from the
  directory with `mkfs.ext4 -d`, then converted to qcow2.
- Each VM boots the image's own kernel and initrd with `-accel tcg` on a copy-on-write overlay
  (qcow2 backing file), so the cached image stays clean.
- Per-VM settings (mesh address, root's SSH key made by the test, host name) go in on the kernel
  command line; a oneshot unit in the image writes them out at every boot, so a reboot keeps them.
- Networking is qemu's own: a `user` netdev with `restrict=on` (no way out) carries only a
  hostfwd from 127.0.0.1 to the guest's SSH; the VMs reach each other over a `socket` netdev
  (UDP between two loopback ports) with static addresses in 198.18.0.0/15.
- Every VM is powered off, then its qemu process ended by pid, whatever happens.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MESHAGENT_VM_CACHE", "/var/cache/meshagent-vm"))
MIRROR = os.environ.get("MESHAGENT_VM_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
PACKAGES = sorted(
    [
        "linux-image-amd64",
        "systemd-sysv",
        "udev",
        "dbus",
        "kmod",
        "openssh-server",
        "python3",
        "python3-venv",
        "nftables",
        "iptables",
        "iproute2",
        "curl",
        "ca-certificates",
        "openssl",
        "procps",
        "nginx-light",
    ]
)
IMAGE_SIZE = "3G"
MEMORY_MB = 1024
BOOT_TIMEOUT = 240.0  # TCG, with another VM (and maybe a benchmark) on the same 2 cores

# Written into the image: applies the per-VM settings from the kernel command line at each boot.
SETUP_SCRIPT = r"""#!/bin/sh
# meshvm-setup: per-VM settings from the kernel command line (meshvm.ip=A/N[,B/N], meshvm.key=).
set -eu
ip=""; key=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    meshvm.ip=*) ip="${arg#meshvm.ip=}" ;;
    meshvm.key=*) key="${arg#meshvm.key=}" ;;
  esac
done
mkdir -p /root/.ssh /etc/systemd/network
chmod 700 /root/.ssh
if [ -n "$key" ]; then
  printf '%s\n' "$(printf '%s' "$key" | tr ':' ' ')" > /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
fi
cat > /etc/systemd/network/10-ssh.network <<EOF
[Match]
MACAddress=52:54:00:00:00:01
[Network]
Address=10.0.2.15/24
EOF
if [ -n "$ip" ]; then
  {
    printf '[Match]\nMACAddress=52:54:00:00:01:02\n[Network]\n'
    for addr in $(printf '%s' "$ip" | tr ',' ' '); do printf 'Address=%s\n' "$addr"; done
  } > /etc/systemd/network/20-mesh.network
fi
"""

SETUP_UNIT = """[Unit]
Description=meshvm: per-VM settings from the kernel command line
DefaultDependencies=no
After=local-fs.target
Before=systemd-networkd.service ssh.service network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/meshvm-setup
RemainAfterExit=yes

[Install]
WantedBy=sysinit.target
"""


def missing_prerequisites() -> str | None:
    """Why the VM tests cannot run here, or None."""
    if sys.platform != "linux":
        return "VM tests need Linux"
    if os.geteuid() != 0:
        return "VM tests need root (debootstrap builds the image)"
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"VM tests need {tool} (scripts/bootstrap installs it)"
    return None


def _image_key() -> str:
    text = "\n".join([SUITE, MIRROR, IMAGE_SIZE, *PACKAGES, SETUP_SCRIPT, SETUP_UNIT])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    disk: Path
    kernel: Path
    initrd: Path
    build_seconds: float | None  # None: taken from the cache


def _sh(*argv: str, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc  # type: ignore[no-any-return]


def build_image() -> Image:
    """The cached image, built if missing (a lock keeps two builders apart)."""
    key = _image_key()
    out = CACHE / f"bookworm-{key}"
    disk, kernel, initrd = out / "disk.qcow2", out / "vmlinuz", out / "initrd.img"
    if disk.exists() and kernel.exists() and initrd.exists():
        return Image(disk, kernel, initrd, None)
    CACHE.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if disk.exists() and kernel.exists() and initrd.exists():
            return Image(disk, kernel, initrd, None)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
        try:
            root = work / "root"
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            _sh(
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                MIRROR,
                timeout=1500,
                env=env,
            )
            _configure_root(root)
            boot = root / "boot"
            vmlinuz = max(boot.glob("vmlinuz-*"))
            initrd_src = max(boot.glob("initrd.img-*"))
            raw = work / "disk.raw"
            _sh("mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw), IMAGE_SIZE, timeout=600)
            tmp_out = work / "out"
            tmp_out.mkdir()
            _sh("qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp_out / "disk.qcow2"), timeout=600)
            shutil.copy2(vmlinuz, tmp_out / "vmlinuz")
            shutil.copy2(initrd_src, tmp_out / "initrd.img")
            (tmp_out / "packages.txt").write_text("\n".join(PACKAGES) + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp_out.rename(out)
            for old in CACHE.glob("bookworm-*"):  # images of older package lists
                if old != out:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Image(disk, kernel, initrd, time.monotonic() - started)


def _configure_root(root: Path) -> None:
    """Make the debootstrapped tree bootable and quiet, without chroot-running daemons."""
    (root / "etc/fstab").write_text("LABEL=root / ext4 defaults,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("meshvm\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 meshvm\n")
    sbin = root / "usr/local/sbin/meshvm-setup"
    sbin.write_text(SETUP_SCRIPT)
    sbin.chmod(0o755)
    units = root / "etc/systemd/system"
    (units / "meshvm-setup.service").write_text(SETUP_UNIT)

    def link(target: str, name: str) -> None:
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)

    link(
        "/etc/systemd/system/meshvm-setup.service",
        "/etc/systemd/system/sysinit.target.wants/meshvm-setup.service",
    )
    link(
        "/lib/systemd/system/systemd-networkd.service",
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
    )
    link(
        "/lib/systemd/system/systemd-networkd.socket",
        "/etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
    )
    # Nothing that burns the emulated CPU in the background, nothing that waits for a network
    # the guest does not have.
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "man-db.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
        "logrotate.timer",
        "systemd-networkd-wait-online.service",
    ):
        link("/dev/null", f"/etc/systemd/system/{unit}")
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/meshvm.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    # A machine-id per boot of each overlay (empty file: systemd makes a fresh one).
    (root / "etc/machine-id").write_text("")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Vm:
    name: str
    mesh_ip: str  # e.g. 198.18.0.1
    workdir: Path
    key: Path
    ssh_port: int
    extra_ips: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    boot_seconds: list[float] = field(default_factory=list)

    @property
    def console(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    def _ssh_base(self, timeout: float) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(self.ssh_port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={max(1, int(timeout))}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
            "root@127.0.0.1",
        ]

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script as root in the guest."""
        proc = subprocess.run(
            [*self._ssh_base(min(timeout, 20)), script],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.name}] `{script}` exited {proc.returncode}:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def session(self, script: str) -> subprocess.Popen[str]:
        """A long-lived SSH session (like an operator's) running `script`; the caller waits."""
        return subprocess.Popen(
            [*self._ssh_base(20), script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def ssh_ok(self, timeout: float = 15) -> bool:
        try:
            return self.sh("true", check=False, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def put(self, local: Path, remote: str, timeout: float = 300) -> None:
        base = self._ssh_base(20)
        opts = base[1 : base.index("root@127.0.0.1")]
        opts[opts.index("-p")] = "-P"
        _sh("scp", "-q", "-r", *opts, str(local), f"root@127.0.0.1:{remote}", timeout=timeout)

    def wait_ssh(self, timeout: float = BOOT_TIMEOUT, since: float | None = None) -> float:
        """Wait until SSH answers; returns seconds since `since` (default: now)."""
        start = since if since is not None else time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"[{self.name}] qemu exited {self.proc.returncode}:\n{self.tail_console()}"
                )
            if self.ssh_ok(timeout=10):
                took = time.monotonic() - start
                self.boot_seconds.append(took)
                return took
            time.sleep(1)
        raise AssertionError(f"[{self.name}] no SSH after {timeout:.0f}s:\n{self.tail_console()}")

    def tail_console(self, n: int = 60) -> str:
        try:
            lines = self.console.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console log)"
        return "\n".join(lines[-n:])

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """`systemctl reboot` in the guest; returns seconds until SSH answers again."""
        boot_id = self.sh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        start = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.sh("systemctl reboot", check=False, timeout=15)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"[{self.name}] qemu exited during reboot:\n{self.tail_console()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                got = self.sh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=10)
                if got.returncode == 0 and got.stdout.strip() not in ("", boot_id):
                    return time.monotonic() - start
            time.sleep(1)
        raise AssertionError(f"[{self.name}] did not come back after reboot:\n{self.tail_console()}")

    def shutdown(self) -> None:
        """Power off (bounded), then end the qemu process by its pid."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.sh("systemctl poweroff", check=False, timeout=10)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            self.proc = None


def _start(vm: Vm, image: Image, mesh_netdev: str) -> None:
    overlay = vm.workdir / f"{vm.name}.qcow2"
    _sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        str(image.disk),
        str(overlay),
        timeout=60,
    )
    pub = (vm.key.with_suffix(".pub")).read_text().split()
    append = " ".join(
        [
            "root=LABEL=root",
            "rw",
            "console=ttyS0",
            "net.ifnames=0",
            "quiet",
            f"systemd.hostname={vm.name}",
            "meshvm.ip=" + ",".join(f"{ip}/15" for ip in (vm.mesh_ip, *vm.extra_ips)),
            f"meshvm.key={pub[0]}:{pub[1]}",
        ]
    )
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        str(MEMORY_MB),
        "-name",
        vm.name,
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{vm.console}",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        append,
        "-drive",
        f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-netdev",
        f"user,id=ssh,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22",
        "-device",
        "virtio-net-pci,netdev=ssh,mac=52:54:00:00:00:01",
        "-netdev",
        f"{mesh_netdev},id=mesh",
        "-device",
        "virtio-net-pci,netdev=mesh,mac=52:54:00:00:01:02",
        "-no-user-config",
        "-nodefaults",
    ]
    log = open(vm.workdir / f"{vm.name}.qemu.log", "wb")  # noqa: SIM115 - lives as long as qemu
    vm.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def vm_pair(workdir: Path, image: Image) -> Iterator[tuple[Vm, Vm]]:
    """Two VMs, 198.18.0.1 (+ .3) and 198.18.0.2, joined by a qemu UDP socket link; always shut down."""
    key = workdir / "id_ed25519"
    if not key.exists():
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshvm-test", "-f", str(key), timeout=30)
    a_port, b_port = free_port(), free_port()
    # vm-authority's second address is the authority's own (the cluster's API, say): a mesh
    # host never captures its authority's address, so the app must live at another one.
    a = Vm("vm-authority", "198.18.0.1", workdir, key, free_port(), extra_ips=("198.18.0.3",))
    b = Vm("vm-legacy", "198.18.0.2", workdir, key, free_port())
    vms = [a, b]
    try:
        started = time.monotonic()
        _start(a, image, f"socket,udp=127.0.0.1:{b_port},localaddr=127.0.0.1:{a_port}")
        _start(b, image, f"socket,udp=127.0.0.1:{a_port},localaddr=127.0.0.1:{b_port}")
        for vm in vms:
            vm.wait_ssh(since=started)
        yield a, b
    finally:
        for vm in vms:
            vm.shutdown()


# -- what the VM suites share -------------------------------------------------------------------

# Where meshagent (and the tests around it) leave things on a host: "the host as it was" means
# these, the firewall, users and units are as they were (host_snapshot).
SNAPSHOT_PATHS = (
    "/etc/meshagent",
    "/var/lib/meshagent",
    "/var/lib/meshagent-authority",
    "/run/meshagent",
    "/var/lib/meshagent-install.json",
    "/etc/sysusers.d",
    "/etc/tmpfiles.d",
    "/usr/local/bin",
)


def host_snapshot(paths: Iterable[str] = SNAPSHOT_PATHS, maxdepth: int | None = None) -> str:
    """A shell script printing what uninstall must restore: firewall (nft, iptables), ip rules,
    users and groups, meshagent's units, and each path's files with mode and owner (`maxdepth`
    levels deep, or all)."""
    depth = f"-maxdepth {maxdepth} " if maxdepth is not None else ""
    return rf"""
set -u
echo '## nft'; nft list ruleset
echo '## iptables-nft'; iptables-nft-save 2>/dev/null | grep -v '^#'
echo '## iptables-legacy'; iptables-legacy-save 2>/dev/null | grep -v '^#'
echo '## ip6tables-nft'; ip6tables-nft-save 2>/dev/null | grep -v '^#'
echo '## ip rule'; ip rule; ip -6 rule
echo '## passwd'; cat /etc/passwd
echo '## group'; cat /etc/group
echo '## shadow'; cut -d: -f1 /etc/shadow; cut -d: -f1 /etc/gshadow
echo '## subuid'; cat /etc/subuid /etc/subgid 2>/dev/null
echo '## units'; systemctl list-unit-files --no-legend 'meshagent*'
ls /etc/systemd/system /etc/systemd/system/*.wants
echo '## files'
for p in {" ".join(shlex.quote(p) for p in paths)}; do
  [ -e "$p" ] && find "$p" {depth}-printf '%p %m %u:%g\n' | sort
done
echo '## done'
"""


def diff(before: str, after: str) -> str:
    """A unified diff of two snapshots, for assertion messages."""
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", lineterm="")
    return "\n".join(lines)


def ready(vm: Vm) -> bool:
    """The agent on `vm` answers /ready."""
    return vm.sh("curl -sf --max-time 3 http://127.0.0.1:4191/ready", check=False).returncode == 0


def build_wheels(dest: Path, scratch: Path, version: str | None = None, deps: bool = True) -> list[Path]:
    """meshagent (and, with `deps`, its dependencies) as wheels in `dest`, built from a copy of
    the sources under `scratch` so the build leaves nothing (build/, egg-info) in the repo.
    With `version`, the copy is that version (an upgrade's "new release" of the same code)."""
    source = scratch / f"src-{version or 'repo'}"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    # The compiled accounting is built from its .pyx, not copied from this checkout's build.
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.html")
    shutil.copytree(REPO / "agent", source / "agent", ignore=ignore)
    if version is not None:
        current = next(
            line.split('"')[1]
            for line in (source / "pyproject.toml").read_text().splitlines()
            if line.startswith("version = ")
        )
        for path, old, new in (
            (source / "pyproject.toml", f'version = "{current}"', f'version = "{version}"'),
            (source / "agent/__init__.py", f'__version__ = "{current}"', f'__version__ = "{version}"'),
        ):
            text = path.read_text()
            assert old in text, f"{path} has no {old!r}"
            path.write_text(text.replace(old, new))
    before = set(dest.glob("*.whl")) if dest.exists() else set()
    _sh(
        str(REPO / ".venv/bin/pip"),
        "wheel",
        "-q",
        *([] if deps else ["--no-deps"]),
        str(source),
        "-w",
        str(dest),
        timeout=600,
    )
    shutil.rmtree(source, ignore_errors=True)
    return sorted(set(dest.glob("*.whl")) - before)
