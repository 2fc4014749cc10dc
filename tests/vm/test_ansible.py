"""The Ansible role and playbooks against two real Debian 12 VMs (qemu, TCG), driven from this
machine over SSH on the VMs' 127.0.0.1 hostfwd ports — one pair of VMs for every step:

    vm-authority 198.18.0.1: a fleet host (identity web/nginx); at 198.18.0.3 it also runs the
                             authority (its own venv, a transient unit, outside the role's reach)
    vm-legacy    198.18.0.2: a fleet host (identity shop/legacy)

Steps: rollout from bare VMs in batches of one (both enrolled, /ready, listed by the authority;
time from bare VM to meshed per host), a second run that changes nothing, --check --diff, an
upgrade to a new version that keeps identities and restarts the service, a host with a bad
(expired) join token that stops the rollout with its name and the authority's reason, and
uninstall leaving both hosts as they were. Figures are printed and written to
<cache>/last-ansible-run.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vm.harness import (
    CACHE,
    REPO,
    SNAPSHOT_PATHS,
    Vm,
    build_image,
    build_wheels,
    diff,
    host_snapshot,
    missing_prerequisites,
    ready,
    vm_pair,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(2400)]

ANSIBLE = REPO / "ansible"
PLAYBOOK = REPO / ".venv/bin/ansible-playbook"
# The authority listens on vm-authority's second address (the harness gives it 198.18.0.3):
# a mesh host never captures its authority's address.
AUTH_URL = "https://198.18.0.3:8443"
AUTH_VENV = "/opt/meshagent-authority"
AUTH_DIR = "/srv/meshagent-authority"
AUTH_CMD = f"{AUTH_VENV}/bin/meshagent"
VERSION, NEXT_VERSION = "0.1.0", "0.1.1"
IDENTITIES = {"vm-legacy": "shop/legacy", "vm-authority": "web/nginx"}

# What "the host as it was" means: firewall, users, units, files — and what the role adds
# (the venv under /opt, the pushed wheelhouse, pip's cache); two levels deep (/opt also holds
# the test's authority venv).
SNAPSHOT = host_snapshot(
    (*SNAPSHOT_PATHS, "/opt", "/var/cache/meshagent-wheelhouse", "/root/.cache"), maxdepth=2
)

RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.M,
)
MESHED = re.compile(r"meshagent: (?P<host>\S+) meshed and healthy (?P<s>[\d.]+) s")


@dataclass
class Run:
    rc: int
    out: str
    recap: dict[str, dict[str, int]]
    seconds: float
    times: list[dict[str, Any]]  # one entry per task and host (callback_plugins/task_timer.py)

    def changed(self) -> dict[str, int]:
        return {host: r["changed"] for host, r in self.recap.items()}

    def slowest(self, n: int = 8) -> dict[str, list[str]]:
        """Per host, the n tasks that took longest: "seconds task"."""
        out: dict[str, list[str]] = {}
        for host in sorted({t["host"] for t in self.times}):
            mine = sorted((t for t in self.times if t["host"] == host), key=lambda t: -t["s"])
            out[host] = [f"{t['s']:.1f} {t['task']}" for t in mine[:n]]
        return out


@dataclass
class Fleet:
    auth: Vm
    legacy: Vm
    work: Path
    wheels: Path
    figures: dict[str, Any]

    @property
    def vms(self) -> tuple[Vm, Vm]:
        return self.legacy, self.auth

    def inventory(self, version: str, join_tokens: dict[str, str] | None = None) -> Path:
        hosts: dict[str, dict[str, Any]] = {}
        for vm in self.vms:  # vm-legacy first: the first batch of a serial-1 rollout
            host: dict[str, Any] = {
                "ansible_port": vm.ssh_port,
                "meshagent_identity": IDENTITIES[vm.name],
                "meshagent_enroll_addresses": [vm.mesh_ip],
            }
            if vm is self.auth:  # its own agent must leave the authority's port alone
                host["meshagent_intercept"] = {"inbound_skip_ports": [8443]}
            if join_tokens and vm.name in join_tokens:
                host["meshagent_join_token"] = join_tokens[vm.name]
            hosts[vm.name] = host
        doc = {
            "all": {
                "vars": {
                    "ansible_host": "127.0.0.1",
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.auth.key),
                    "ansible_ssh_common_args": (
                        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
                    ),
                    "ansible_python_interpreter": "/usr/bin/python3",
                    # We log in as root and the image has no sudo: the playbooks' become is moot.
                    "ansible_become": False,
                },
                "children": {
                    "meshagent": {
                        "vars": {
                            "meshagent_version": version,
                            "meshagent_install_source": "wheelhouse",
                            "meshagent_wheelhouse_dir": str(self.wheels),
                            "meshagent_authority_host": "vm-authority",
                            "meshagent_authority_url": AUTH_URL,
                            "meshagent_authority_dir": AUTH_DIR,
                            "meshagent_authority_user": "",
                            "meshagent_authority_command": AUTH_CMD,
                        },
                        "hosts": hosts,
                    }
                },
            }
        }
        path = self.work / f"inventory-{version}{'-tokens' if join_tokens else ''}.json"
        path.write_text(json.dumps(doc, indent=2))
        return path

    def play(self, playbook: str, inventory: Path, *args: str, timeout: float = 900) -> Run:
        times = self.work / f"times-{len(list(self.work.glob('times-*')))}.jsonl"
        env = {
            **os.environ,
            "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_LOCAL_TEMP": str(self.work / "ansible-local"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.work / "cp"),
            "ANSIBLE_SSH_ARGS": (
                "-o ControlMaster=auto -o ControlPersist=30s "
                "-o ServerAliveInterval=5 -o ServerAliveCountMax=3"
            ),
            "PATH": f"{PLAYBOOK.parent}:{os.environ.get('PATH', '')}",
            "ANSIBLE_CALLBACK_PLUGINS": str(Path(__file__).parent / "callback_plugins"),
            "ANSIBLE_CALLBACKS_ENABLED": "task_timer",
            "MESHAGENT_ANSIBLE_TIMES": str(times),
        }
        started = time.monotonic()
        proc = subprocess.run(
            [str(PLAYBOOK), "-i", str(inventory), playbook, *args],
            cwd=ANSIBLE,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        out = proc.stdout + proc.stderr
        (self.work / "ansible.log").open("a").write(f"\n===== {playbook} {' '.join(args)}\n{out}")
        recap = {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(out.split("PLAY RECAP", 1)[-1])
        }
        timed = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
        with (self.work / "ansible-times.jsonl").open("a") as log:
            log.writelines(json.dumps({"playbook": playbook, **t}) + "\n" for t in timed)
        return Run(proc.returncode, out, recap, time.monotonic() - started, timed)


def _build_wheels(work: Path) -> Path:
    """meshagent and its dependencies as wheels, plus the same code as version NEXT_VERSION."""
    wheels = work / "wheels"
    build_wheels(wheels, work)
    built = [p.name for p in build_wheels(wheels, work, NEXT_VERSION, deps=False)]
    # One wheel, for this platform: it carries the compiled HTTP accounting.
    assert len(built) == 1 and built[0].startswith(f"meshagent-{NEXT_VERSION}-cp3"), built
    assert built[0].endswith("linux_x86_64.whl"), built
    return wheels


def _start_authority(auth: Vm, wheels: Path) -> None:
    """The authority in its own venv and a transient unit: nothing the role installs or removes."""
    auth.put(wheels, "/root/wheels")
    auth.sh(
        f"python3 -m venv {AUTH_VENV} && {AUTH_VENV}/bin/pip install -q --no-cache-dir --no-index "
        f"--find-links /root/wheels meshagent=={VERSION} && rm -rf /root/wheels && "
        f"{AUTH_CMD} authority init --dir {AUTH_DIR} --trust-domain cluster.local --san 198.18.0.3 "
        f">/dev/null && systemd-run --unit meshagent-authority-test --quiet "
        f"{AUTH_CMD} authority serve --dir {AUTH_DIR} --listen 198.18.0.3:8443",
        timeout=600,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if auth.sh(f"curl -sfk --max-time 3 {AUTH_URL}/healthz", check=False).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(
        auth.sh("journalctl -u meshagent-authority-test --no-pager -n 50", check=False).stdout
    )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    if not PLAYBOOK.exists():
        pytest.skip("ansible-playbook is missing: .venv/bin/pip install -e '.[dev]'")
    figures: dict[str, Any] = {}
    image = build_image()
    # A short directory: ssh's ControlPath must fit in a unix socket address.
    work = Path(tempfile.mkdtemp(prefix="ma-ans-"))
    try:
        wheels = _build_wheels(work)
        started = time.monotonic()
        with vm_pair(tmp_path_factory.mktemp("vm"), image) as (auth, legacy):
            figures["boot_to_ssh_s"] = round(max(auth.boot_seconds[0], legacy.boot_seconds[0]), 1)
            _start_authority(auth, wheels)
            figures["authority_ready_s"] = round(time.monotonic() - started, 1)
            yield Fleet(auth, legacy, work, wheels, figures)
        figures["vm_total_s"] = round(time.monotonic() - started, 1)
    finally:
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "last-ansible-run.json").write_text(json.dumps(figures, indent=2) + "\n")
        print("\nAnsible VM figures:", json.dumps(figures))
        for name in ("ansible.log", "ansible-times.jsonl"):
            if (work / name).exists():
                shutil.copy2(work / name, CACHE / f"last-{name.replace('ansible', 'ansible-run')}")
        shutil.rmtree(work, ignore_errors=True)


def _ok(run: Run, what: str) -> None:
    assert run.rc == 0 and all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values()), (
        f"{what} failed (rc {run.rc}):\n{run.out[-6000:]}"
    )
    assert set(run.recap) == set(IDENTITIES), run.recap


def _status(vm: Vm) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vm.sh("/opt/meshagent/bin/meshagent status --json").stdout)
    return doc


def _hosts(auth: Vm) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads(
        auth.sh(f"{AUTH_CMD} authority hosts --dir {AUTH_DIR} --json").stdout
    )
    return doc


def _unit(vm: Vm) -> str:
    return vm.sh("systemctl show -p InvocationID --value meshagent").stdout.strip()


def test_ansible_fleet_on_real_vms(fleet: Fleet) -> None:
    auth, legacy, figures = fleet.auth, fleet.legacy, fleet.figures
    before = {vm.name: vm.sh(SNAPSHOT).stdout for vm in fleet.vms}
    assert "/opt/meshagent " not in before["vm-legacy"]  # bare: nothing of meshagent yet
    inventory = fleet.inventory(VERSION)
    serial_1 = ["-e", '{"meshagent_rollout_serial": 1}']

    # -- rollout from bare VMs, one host per batch -------------------------------------------------
    run = fleet.play("rollout.yml", inventory, *serial_1)
    _ok(run, "rollout")
    figures["rollout_s"] = round(run.seconds, 1)
    meshed = {m["host"]: float(m["s"]) for m in MESHED.finditer(run.out)}
    assert set(meshed) == set(IDENTITIES), run.out[-4000:]
    figures["bare_to_meshed_s"] = meshed
    figures["rollout_slowest_tasks"] = run.slowest()
    print("\nRollout, slowest tasks per host:", json.dumps(run.slowest(), indent=1))
    for vm in fleet.vms:
        assert ready(vm), vm.sh("journalctl -u meshagent --no-pager -n 60", check=False).stdout
        assert _status(vm)["identity"] == IDENTITIES[vm.name]
        assert vm.sh("systemctl is-enabled meshagent").stdout.strip() == "enabled"
    listed = {h["identity"]: h for h in _hosts(auth)}
    assert set(listed) == set(IDENTITIES.values()), listed
    assert not any(h["revoked"] for h in listed.values())
    assert listed["shop/legacy"]["addresses"] == ["198.18.0.2"], listed
    assert "ma1." not in run.out  # no join token in the output (no_log)

    # -- a second run changes nothing; --check --diff neither --------------------------------------
    run = fleet.play("rollout.yml", inventory, *serial_1)
    _ok(run, "second rollout")
    figures["second_run_changed"] = run.changed()
    figures["second_run_s"] = round(run.seconds, 1)
    assert set(run.changed().values()) == {0}, run.out[-6000:]
    run = fleet.play("rollout.yml", inventory, "--check", "--diff")
    _ok(run, "rollout --check --diff")
    figures["check_mode_changed"] = run.changed()
    assert set(run.changed().values()) == {0}, run.out[-6000:]

    # -- upgrade host by host: new version, service restarted, identity kept -----------------------
    old: dict[str, dict[str, Any]] = {
        vm.name: {
            "status": _status(vm),
            "unit": _unit(vm),
            "key": vm.sh("sha256sum < /var/lib/meshagent/identity/key.pem").stdout,
        }
        for vm in fleet.vms
    }
    run = fleet.play("upgrade.yml", fleet.inventory(NEXT_VERSION))
    _ok(run, "upgrade")
    figures["upgrade_s"] = round(run.seconds, 1)
    for vm in fleet.vms:
        assert vm.sh("/opt/meshagent/bin/meshagent --version").stdout.split()[-1] == NEXT_VERSION
        assert _unit(vm) != old[vm.name]["unit"], f"{vm.name}: meshagent was not restarted"
        assert ready(vm)
        now = _status(vm)
        assert now["spiffe_id"] == old[vm.name]["status"]["spiffe_id"]
        # The state directory is untouched: the same key and the same certificate.
        assert vm.sh("sha256sum < /var/lib/meshagent/identity/key.pem").stdout == old[vm.name]["key"]
        assert now["serial"] == old[vm.name]["status"]["serial"]
    figures["upgrade_identity"] = "same SPIFFE ID, same key, same certificate (serial unchanged)"

    # -- a host whose enrollment fails stops the rollout, saying which host and why ----------------
    legacy.sh("systemctl stop meshagent && find /var/lib/meshagent -mindepth 1 -delete")
    expired = auth.sh(
        f"{AUTH_CMD} authority token create --dir {AUTH_DIR} --identity shop/legacy --url {AUTH_URL} --ttl 1s"
    ).stdout.strip()
    time.sleep(2)
    auth_unit = _unit(auth)
    run = fleet.play("rollout.yml", fleet.inventory(NEXT_VERSION, {"vm-legacy": expired}), *serial_1)
    assert run.rc != 0, run.out[-4000:]
    assert run.recap.get("vm-legacy", {}).get("failed") == 1, run.out[-4000:]
    assert "vm-authority" not in run.recap, run.out[-4000:]  # the next batch never started
    assert _unit(auth) == auth_unit
    reason = re.search(r"vm-legacy: enrollment failed[^\n\"]*", run.out)
    assert reason and "token_expired" in reason.group(0), run.out[-4000:]
    figures["bad_token_message"] = reason.group(0)
    assert expired not in run.out

    # -- uninstall: both hosts as they were ------------------------------------------------------
    run = fleet.play("uninstall.yml", fleet.inventory(NEXT_VERSION))
    _ok(run, "uninstall")
    figures["uninstall_s"] = round(run.seconds, 1)
    for vm in fleet.vms:
        after = vm.sh(SNAPSHOT).stdout
        assert after == before[vm.name], diff(before[vm.name], after)
    revoked = {h["identity"]: h["revoked"] for h in _hosts(auth)}
    assert revoked["web/nginx"] is True, revoked  # enrolled at uninstall time: revoked first
    assert auth.ssh_ok() and legacy.ssh_ok()
