"""The systemd unit on real Debian 12 VMs (qemu, TCG): install, enroll, mTLS, crash, reboot,
check, uninstall — one pair of VMs for every step, SSH asserted after each.

    vm-authority 198.18.0.1: `meshagent install --authority`, the authority's unit (on its own
                 198.18.0.3  address, .3: hosts never capture the authority's address), nginx
                             (the app), and an enrolled agent (identity web/nginx) in front of it
    vm-legacy    198.18.0.2: the legacy host, enrolled as shop/legacy; its curl to nginx must
                             arrive at vm-authority's agent as mTLS with client_id shop/legacy

The measured figures are printed and written to <cache>/last-run.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.vm.harness import (
    CACHE,
    Vm,
    build_image,
    build_wheels,
    diff,
    host_snapshot,
    missing_prerequisites,
    ready,
    vm_pair,
)

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(1200)]

AUTH_URL = "https://198.18.0.3:8443"  # vm-authority's second address
LEGACY_ID = "legacy.shop.serviceaccount.identity.linkerd.cluster.local"  # client_id, as linkerd labels it
APP_URL = "http://198.18.0.1/"
MESHAGENT = "/usr/local/bin/meshagent"
MTLS_RESUME_LIMIT_S = float(os.environ.get("MESHAGENT_VM_MTLS_RESUME_LIMIT", "60"))  # TCG; see below
APP_RESUME_LIMIT_S = float(os.environ.get("MESHAGENT_VM_APP_RESUME_LIMIT", "20"))  # TCG; see below

# What "the host as it was" means: firewall, users, units, files (harness.SNAPSHOT_PATHS).
SNAPSHOT = host_snapshot()


def _wait(what: str, check: object, timeout: float, vm: Vm | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.5)
    journal = vm.sh("journalctl -b --no-pager -n 80 -u 'meshagent*'", check=False).stdout if vm else ""
    raise AssertionError(f"timed out ({timeout:.0f}s) waiting for {what}\n{journal}")


def _inbound_mtls_requests(vm: Vm) -> int:
    """request_total on vm's agent, inbound, mTLS, from the legacy host's identity."""
    text = vm.sh("curl -sf --max-time 5 http://127.0.0.1:4191/metrics").stdout
    total = 0
    for line in text.splitlines():
        if (
            line.startswith("request_total{")
            and 'direction="inbound"' in line
            and 'tls="true"' in line
            and f'client_id="{LEGACY_ID}"' in line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _ssh_alive(*vms: Vm) -> None:
    for vm in vms:
        assert vm.ssh_ok(timeout=20), f"[{vm.name}] SSH unreachable:\n{vm.tail_console()}"


def _install_wheelhouse(vm: Vm, wheels: Path) -> None:
    vm.put(wheels, "/root/wheels")
    vm.sh(
        "python3 -m venv /opt/meshagent && "
        "/opt/meshagent/bin/pip install -q --no-index --find-links /root/wheels meshagent && "
        f"ln -sf /opt/meshagent/bin/meshagent {MESHAGENT} && rm -rf /root/wheels",
        timeout=600,
    )


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vm, Vm, dict[str, float]]]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    figures: dict[str, float] = {}
    image = build_image()
    if image.build_seconds is not None:
        figures["image_build_s"] = round(image.build_seconds, 1)
    work = tmp_path_factory.mktemp("vm")
    wheels = work / "wheels"
    build_wheels(wheels, work)
    started = time.monotonic()
    with vm_pair(work, image) as (auth, legacy):
        figures["boot_to_ssh_s"] = round(max(auth.boot_seconds[0], legacy.boot_seconds[0]), 1)
        with ThreadPoolExecutor(2) as pool:  # both guests at once: one emulated core each
            list(pool.map(lambda vm: _install_wheelhouse(vm, wheels), (auth, legacy)))
        figures["wheelhouse_installed_s"] = round(time.monotonic() - started, 1)
        yield auth, legacy, figures
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "last-run.json").write_text(json.dumps(figures, indent=2) + "\n")
    print("\nVM figures:", json.dumps(figures))


def test_systemd_unit_on_real_vms(vms: tuple[Vm, Vm, dict[str, float]]) -> None:
    auth, legacy, figures = vms
    suite_start = time.monotonic()
    before = {vm.name: vm.sh(SNAPSHOT).stdout for vm in (auth, legacy)}
    _ssh_alive(auth, legacy)

    # -- install; the authority as a unit on vm-authority --------------------------------------
    out = auth.sh(f"{MESHAGENT} install --authority").stdout
    assert "created user meshagent-authority" in out
    assert "already installed" in auth.sh(f"{MESHAGENT} install --authority").stdout  # idempotent
    legacy.sh(f"{MESHAGENT} install")
    auth.sh(
        "systemd-run --wait --quiet -p User=meshagent-authority -p StateDirectory=meshagent-authority "
        f"{MESHAGENT} authority init --dir /var/lib/meshagent-authority --trust-domain cluster.local "
        "--san 198.18.0.3"
    )
    auth.sh("systemctl enable --now meshagent-authority")
    _wait(
        "authority /healthz",
        lambda: legacy.sh(f"curl -sfk --max-time 3 {AUTH_URL}/healthz", check=False).returncode == 0,
        60,
        auth,
    )
    _ssh_alive(auth, legacy)

    # -- enroll both, start the agents ---------------------------------------------------------
    def token(identity: str) -> str:
        return auth.sh(
            f"runuser -u meshagent-authority -- {MESHAGENT} authority token create "
            f"--dir /var/lib/meshagent-authority --identity {identity} --url {AUTH_URL}"
        ).stdout.strip()

    auth.sh(f"{MESHAGENT} enroll {token('web/nginx')} --address 198.18.0.1")
    legacy.sh(f"{MESHAGENT} enroll {token('shop/legacy')} --address 198.18.0.2")
    # vm-authority's own agent must not capture the authority's port (hosts enroll through it).
    auth.sh("printf '\\n[intercept]\\ninbound_skip_ports = [8443]\\n' >> /etc/meshagent/agent.toml")
    # An SSH session opened before the agent starts (an operator's) should outlive the start.
    probe = legacy.session("for i in $(seq 40); do echo tick $i; sleep 1; done")
    time.sleep(3)
    for vm in (auth, legacy):
        vm.sh("systemctl enable --now --no-block meshagent")
    for vm in (auth, legacy):
        _wait(f"{vm.name} /ready", lambda vm=vm: ready(vm), 90, vm)
    _ssh_alive(auth, legacy)
    try:
        probe_out, _ = probe.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe_out, _ = probe.communicate(timeout=10)
    session_survived = probe.returncode == 0 and "tick 40" in probe_out

    # -- the legacy host's outbound call to nginx is mTLS, with its identity ----------------------
    seen = _inbound_mtls_requests(auth)
    got = legacy.sh(f"curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}' {APP_URL}")
    assert got.stdout == "200"
    assert _inbound_mtls_requests(auth) == seen + 1, auth.sh("curl -s 127.0.0.1:4191/metrics").stdout[-3000:]
    _ssh_alive(auth, legacy)

    # -- kill -9: systemd restarts the agent, meshed traffic resumes within 10 s ------------------
    seen = _inbound_mtls_requests(auth)
    restarts = int(legacy.sh("systemctl show -p NRestarts --value meshagent").stdout)
    resumed = legacy.sh(
        "t0=$(date +%s%N); systemctl kill -s KILL meshagent; sleep 0.3; plain=; meshed=; "
        "end=$((t0 + 60000000000)); "
        'while [ -z "$meshed" ] && [ "$(date +%s%N)" -lt "$end" ]; do '
        "  ready=0; curl -sf --max-time 1 http://127.0.0.1:4191/ready >/dev/null && ready=1; "
        f"  if curl -sf --max-time 2 -o /dev/null {APP_URL}; then "
        '    now=$(date +%s%N); [ -z "$plain" ] && plain=$now; [ $ready = 1 ] && meshed=$now; '
        "  fi; sleep 0.2; "
        "done; "
        "echo $(( (${plain:-$end} - t0) / 1000000 )) $(( (${meshed:-$end} - t0) / 1000000 ))",
        timeout=90,
    )
    plain_ms, meshed_ms = map(int, resumed.stdout.split())
    figures["kill9_to_app_traffic_s"] = plain_ms / 1000  # fail open: rules gone by ExecStopPost
    figures["kill9_to_mtls_traffic_s"] = meshed_ms / 1000  # restarted, ready, meshed again
    assert int(legacy.sh("systemctl show -p NRestarts --value meshagent").stdout) == restarts + 1
    assert _inbound_mtls_requests(auth) > seen  # the request after /ready went through mTLS
    # Fail open: plain app traffic flows before the restarted agent is ready, so it was the
    # unit's ExecStopPost (one Python start-up) that removed the rules, not the restart. Under
    # TCG that start-up alone takes 2-10 s depending on the machine's load (4-7 s measured on
    # an idle machine, 13 s once on a loaded CI runner), hence a bound with room.
    assert figures["kill9_to_app_traffic_s"] < figures["kill9_to_mtls_traffic_s"], figures
    assert figures["kill9_to_app_traffic_s"] <= APP_RESUME_LIMIT_S, figures
    # Meshed again = ExecStopPost + RestartSec + ExecStartPre + `meshagent run` to ready: four
    # Python start-ups, which TCG emulation makes ~10x slower than on a real host or KVM.
    assert figures["kill9_to_mtls_traffic_s"] <= MTLS_RESUME_LIMIT_S, figures
    _ssh_alive(auth, legacy)

    # -- reboot: agent, identity and rules come back ------------------------------------------
    cert_before = legacy.sh("sha256sum /var/lib/meshagent/*.pem | sort").stdout
    figures["reboot_to_ssh_s"] = round(legacy.reboot(), 1)
    figures["reboot_to_ready_s"] = round(
        figures["reboot_to_ssh_s"] + _wait("agent /ready after reboot", lambda: ready(legacy), 120, legacy),
        1,
    )
    assert legacy.sh("systemctl is-active meshagent").stdout.strip() == "active"
    assert legacy.sh("sha256sum /var/lib/meshagent/*.pem | sort").stdout == cert_before  # same identity
    assert "meshagent" in legacy.sh("nft list ruleset; iptables-save 2>/dev/null").stdout  # rules back
    seen = _inbound_mtls_requests(auth)
    legacy.sh(f"curl -sSf --max-time 10 -o /dev/null {APP_URL}")
    assert _inbound_mtls_requests(auth) == seen + 1
    _ssh_alive(auth, legacy)

    # -- meshagent check: passes, then names what is broken --------------------------------------
    ok = legacy.sh(f"{MESHAGENT} check --json", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    def failing(vm: Vm) -> set[str]:
        got = vm.sh(f"{MESHAGENT} check --json", check=False)
        assert got.returncode != 0, got.stdout
        return {c["name"] for c in json.loads(got.stdout)["checks"] if not c["ok"]}

    legacy.sh("chmod 755 /var/lib/meshagent")
    assert failing(legacy) == {"state directory"}
    legacy.sh("chmod 700 /var/lib/meshagent")
    auth.sh("systemctl stop meshagent-authority")
    assert failing(legacy) == {"authority reachable, clock in sync"}
    auth.sh("systemctl start meshagent-authority")
    _wait(
        "authority back",
        lambda: legacy.sh(f"{MESHAGENT} check", check=False).returncode == 0,
        60,
        auth,
    )
    _ssh_alive(auth, legacy)

    # -- the unit as systemd sees it inside the VM ----------------------------------------------
    security = legacy.sh("systemd-analyze security --no-pager meshagent.service").stdout
    match = re.search(r"Overall exposure level for meshagent\.service:\s*([\d.]+)", security)
    assert match, security[-2000:]
    figures["exposure"] = float(match.group(1))
    assert figures["exposure"] <= 3.0, security
    for vm in (auth, legacy):
        units = "/etc/systemd/system/meshagent.service" + (
            " /etc/systemd/system/meshagent-authority.service" if vm is auth else ""
        )
        verify = vm.sh(f"systemd-analyze verify {units}", check=False)
        assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    # -- uninstall: the host is exactly as before ------------------------------------------------
    for vm in (legacy, auth):
        vm.sh(f"{MESHAGENT} uninstall")
        after = vm.sh(SNAPSHOT).stdout
        assert after == before[vm.name], diff(before[vm.name], after)
    assert legacy.sh(f"curl -sSf --max-time 10 -o /dev/null {APP_URL}", check=False).returncode == 0
    _ssh_alive(auth, legacy)
    figures["steps_s"] = round(time.monotonic() - suite_start, 1)
    figures["ssh_session_survived_agent_start"] = float(session_survived)
    if not session_survived:
        pytest.xfail(
            "an SSH session opened while the agent was down stalled when its rules went in "
            "(conntrack picks it up mid-stream as NEW and the outbound NAT redirects sshd's "
            f"replies): needs the plan to capture only SYN packets\n{probe_out[-500:]}"
        )
