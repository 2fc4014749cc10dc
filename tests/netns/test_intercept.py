"""Interception with real packets: two hosts on a veth link, rules applied on host a only.

Every apply/remove runs inside the test's own namespaces (`ip netns exec`); the namespaces and
every process started in them are gone when each test ends, pass or fail.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.identity.store import AuthorityRef, IdentityStore
from agent.netlab import Host, Lab

from .intercept_support import (
    BACKENDS,
    PLAIN_UID,
    PROXY_MARK,
    PROXY_UID,
    SKIPPED_UID,
    install_unrelated_ruleset,
    meshagent,
    meshagent_json,
    plain,
    require_backend,
    ruleset,
    start_who,
    who,
    write_config,
)
from .sshd import start_sshd

pytestmark = pytest.mark.netns

B_SKIPPED = {4: "198.18.1.3", 6: "2001:db8:1::3"}
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
APP_PORT = 8080


def config(tmp_path: Path, mode: str, backend: str) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        backend=backend,
        inbound_mode=mode,
        proxy_user=PROXY_UID,
        proxy_mark=PROXY_MARK,
        skip_uids=[SKIPPED_UID],
        outbound_skip_cidrs=[f"{B_SKIPPED[4]}/32", f"{B_SKIPPED[6]}/128"],
    )


@pytest.fixture
def hosts(lab: Lab, two_hosts: tuple[Host, Host]) -> tuple[Host, Host]:
    a, b = two_hosts
    lab.add_address(b, B_SKIPPED[4], B_SKIPPED[6])
    return a, b


def start_servers(a: Host, b: Host, mode: str) -> None:
    """a: its app on 8080, an 'ssh' on 22, the admin port, and the proxy's two listeners; b: app + ssh."""
    start_who(a, "app-a", f":::{APP_PORT}")
    start_who(a, "ssh-a", ":::22")
    start_who(a, "admin-a", ":::4191")
    start_who(a, "outbound", ":::4140")
    start_who(a, "inbound", ":::4143", transparent=mode == "tproxy")
    start_who(b, "app-b", f":::{APP_PORT}")
    start_who(b, "ssh-b", ":::22")


def outbound_cases(a: Host, b: Host, family: int) -> list[tuple[str, dict[str, Any], str]]:
    """(case, reply, expected role) for connections a makes."""
    bip = b.ip(family)
    return [
        ("root to b's app", who(a, bip, APP_PORT), "outbound"),
        ("ordinary uid to b's app", who(a, bip, APP_PORT, user=PLAIN_UID), "outbound"),
        ("skipped uid", who(a, bip, APP_PORT, user=SKIPPED_UID), "app-b"),
        ("proxy uid", who(a, bip, APP_PORT, user=PROXY_UID), "app-b"),
        ("proxy mark", who(a, bip, APP_PORT, mark=PROXY_MARK), "app-b"),
        ("skipped cidr", who(a, B_SKIPPED[family], APP_PORT), "app-b"),
        ("ssh port 22", who(a, bip, 22), "ssh-b"),
        ("own address", who(a, a.ip(family), APP_PORT), "app-a"),
        ("loopback", who(a, LOOPBACK[family], APP_PORT), "app-a"),
    ]


def check_captured(a: Host, b: Host, mode: str) -> None:
    for family in (4, 6):
        for case, reply, role in outbound_cases(a, b, family):
            assert reply.get("role") == role, f"IPv{family} {case}: {reply}"
        reply = who(a, b.ip(family), APP_PORT)
        assert (plain(reply["orig_host"]), reply["orig_port"], reply["via"]) == (
            b.ip(family),
            APP_PORT,
            "nat",
        )

        inbound = who(b, a.ip(family), APP_PORT)
        assert inbound["role"] == "inbound", f"IPv{family} inbound: {inbound}"
        assert inbound["echo"] == "hello"
        assert plain(inbound["peer"][0]) == b.ip(family), "the client's source address is kept"
        assert (plain(inbound["orig_host"]), inbound["orig_port"]) == (a.ip(family), APP_PORT)
        assert inbound["via"] == ("socket" if mode == "tproxy" else "nat")
        if mode == "tproxy":
            assert plain(inbound["local"][0]) == a.ip(family), "TPROXY keeps the destination address"
        assert who(b, a.ip(family), 22)["role"] == "ssh-a"
        assert who(b, a.ip(family), 4191)["role"] == "admin-a"


def check_not_captured(a: Host, b: Host) -> None:
    for family in (4, 6):
        assert who(a, b.ip(family), APP_PORT)["role"] == "app-b"
        assert who(b, a.ip(family), APP_PORT)["role"] == "app-a"


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lifecycle(hosts: tuple[Host, Host], tmp_path: Path, backend: str, mode: str) -> None:
    """Unrelated ruleset in place; apply twice; traffic goes where the plan says; remove restores
    the ruleset byte for byte."""
    a, b = hosts
    require_backend(a, backend)
    install_unrelated_ruleset(a, backend)
    start_servers(a, b, mode)
    check_not_captured(a, b)
    cfg = config(tmp_path, mode, backend)
    before = ruleset(a)

    meshagent(a, "intercept", "apply", "--config", str(cfg))
    once = ruleset(a)
    assert once != before
    meshagent(a, "intercept", "apply", "--config", str(cfg))
    assert ruleset(a) == once, "apply twice = apply once"
    check_captured(a, b, mode)

    meshagent(a, "intercept", "remove")
    assert ruleset(a) == before, "remove restores the ruleset exactly"
    meshagent(a, "intercept", "remove")
    assert ruleset(a) == before, "remove twice changes nothing"
    check_not_captured(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sshd_reachable_through_apply_and_remove(
    lab: Lab, two_hosts: tuple[Host, Host], tmp_path: Path, backend: str
) -> None:
    """A real sshd on a: a session opened before apply survives apply and remove; new logins work
    throughout."""
    a, b = two_hosts
    require_backend(a, backend)
    sshd, ssh = start_sshd(a, tmp_path / "ssh", [a.ip4, a.ip6])

    def login(ip: str) -> str:
        return b.run(*ssh, f"root@{ip}", "echo", "ssh-ok", timeout=60).stdout.strip()

    assert login(a.ip4) == "ssh-ok"
    session = b.popen(*ssh, f"root@{a.ip4}", "echo ready; read line; echo got-$line", stdin=subprocess.PIPE)
    assert session.stdout is not None and session.stdin is not None
    assert session.stdout.readline().strip() == "ready"

    cfg = write_config(tmp_path / "agent.toml", backend=backend, proxy_user=PROXY_UID)
    meshagent(a, "intercept", "apply", "--config", str(cfg))
    assert login(a.ip4) == "ssh-ok"
    assert login(a.ip6) == "ssh-ok"
    meshagent(a, "intercept", "remove")
    assert login(a.ip4) == "ssh-ok"

    session.stdin.write("still-here\n")
    session.stdin.flush()
    assert session.stdout.readline().strip() == "got-still-here", "the session open before apply survived"
    assert session.wait(timeout=30) == 0
    assert sshd.poll() is None


def test_remove_without_usable_config(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """`remove` needs no config: a broken file, a missing one, or none at all."""
    a, _b = hosts
    install_unrelated_ruleset(a, "iptables-nft")
    before = ruleset(a)
    broken = tmp_path / "broken.toml"
    broken.write_text("[intercept\nthis is not toml")
    for args, env in (
        (["--config", str(broken)], None),
        (["--config", str(tmp_path / "missing.toml")], None),
        ([], {"MESHAGENT_CONFIG": str(broken)}),
    ):
        cfg = write_config(
            tmp_path / "agent.toml", backend="iptables-nft", proxy_user=PROXY_UID, inbound_mode="tproxy"
        )
        meshagent(a, "intercept", "apply", "--config", str(cfg))
        assert ruleset(a) != before
        meshagent(a, "intercept", "remove", *args, env=env)
        assert ruleset(a) == before, f"remove {args} {env}"
    # apply itself refuses a broken config, with the config exit code
    proc = meshagent(a, "intercept", "apply", "--config", str(broken), check=False)
    assert proc.returncode == 3, proc.stderr
    assert ruleset(a) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_and_show_print_exactly_what_apply_runs(
    hosts: tuple[Host, Host], tmp_path: Path, backend: str
) -> None:
    a, _b = hosts
    require_backend(a, backend)
    install_unrelated_ruleset(a, backend)
    cfg = config(tmp_path, "tproxy", backend)
    before = ruleset(a)
    dry = meshagent_json(a, "intercept", "apply", "--config", str(cfg), "--dry-run")
    text = meshagent(a, "intercept", "apply", "--config", str(cfg), "--dry-run").stdout
    assert ruleset(a) == before, "--dry-run changes nothing"
    shown = meshagent_json(a, "intercept", "show", "--config", str(cfg))
    assert shown["backend"] == backend and shown["current"]["applied"] is False

    applied = meshagent_json(a, "intercept", "apply", "--config", str(cfg))
    assert applied["steps"] == dry["steps"], "apply ran exactly what --dry-run printed"
    assert applied["routes"] == dry["routes"]
    for step in dry["steps"]:
        assert step["stdin"] in text
    rendered = shown["rendered"]
    for line in rendered.splitlines():
        if line.startswith(("-A", "\t\tmeta", "\t\ttype")):
            assert line in text, f"show's rule is in what apply runs: {line}"
    shown_after = meshagent_json(a, "intercept", "show", "--config", str(cfg))
    assert shown_after["current"]["applied"] is True
    assert backend in shown_after["current"]["backends"]
    assert {r["kind"] for r in shown_after["current"]["routes"]} == {"rule", "route"}

    removed = meshagent_json(a, "intercept", "remove", "--dry-run")
    assert removed["steps"] and ruleset(a) != before
    assert meshagent_json(a, "intercept", "remove")["removed_from"] == [backend]
    assert ruleset(a) == before


def test_switching_backend_removes_the_old_ones(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """Rules of ours in another backend would capture twice: apply removes them."""
    a, b = hosts
    install_unrelated_ruleset(a, "iptables-nft")
    start_servers(a, b, "redirect")
    before = ruleset(a)
    meshagent(a, "intercept", "apply", "--config", str(config(tmp_path, "redirect", "iptables-nft")))
    state = meshagent_json(a, "intercept", "apply", "--config", str(config(tmp_path, "redirect", "nft")))
    assert state["cleaned"] == ["iptables-nft"]
    assert "MESHAGENT" not in a.run("iptables-nft-save").stdout
    assert who(a, b.ip4, APP_PORT)["role"] == "outbound"
    meshagent(a, "intercept", "remove")
    assert ruleset(a) == before


def test_auto_backend(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """auto: native nft on a clean host; legacy when the host's firewall already lives in legacy iptables."""
    a, _b = hosts
    cfg = write_config(tmp_path / "agent.toml", proxy_user=PROXY_UID)
    assert meshagent_json(a, "intercept", "show", "--config", str(cfg))["backend"] == "nft"
    require_backend(a, "iptables-legacy")
    a.run("iptables-legacy-restore", input="*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n")
    assert meshagent_json(a, "intercept", "show", "--config", str(cfg))["backend"] == "iptables-legacy"


@pytest.mark.parametrize("mode", ["redirect", "tproxy"])
def test_native_nft_is_exact_from_an_empty_ruleset(
    hosts: tuple[Host, Host], tmp_path: Path, mode: str
) -> None:
    """nft keeps our rules in a table of our own, so even a host with no ruleset at all gets back
    exactly nothing. (So does iptables-nft, below; iptables-legacy cannot delete a table: see
    the README, "Limits".)"""
    a, _b = hosts
    before = ruleset(a)
    meshagent(a, "intercept", "apply", "--config", str(config(tmp_path, mode, "nft")))
    meshagent(a, "intercept", "remove")
    assert ruleset(a) == before


def test_only_the_authoritys_port_is_left_alone(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """The enrolled authority is reached directly (enrollment and renewal cannot depend on the
    proxy), but other services on its address are meshed like any destination."""
    a, b = hosts
    require_backend(a, "nft")
    start_servers(a, b, "redirect")
    start_who(b, "authority-b", ":::8443")
    state = tmp_path / "state"
    IdentityStore(state).save_authority(
        AuthorityRef(f"https://{b.ip(4)}:8443", "sha256:none", "", "cluster.local", "linkerd")
    )
    cfg = config(tmp_path, "redirect", "nft")
    cfg.write_text(f'[identity]\nstate_dir = "{state}"\n' + cfg.read_text())
    meshagent(a, "intercept", "apply", "--config", str(cfg))
    try:
        assert who(a, b.ip(4), 8443)["role"] == "authority-b"
        assert who(a, b.ip(4), APP_PORT)["role"] == "outbound"
        shown = meshagent_json(a, "intercept", "show", "--config", str(cfg))
        excluded = [e["value"] for e in shown["plan"]["exclusions"] if e["what"] == "authority"]
        assert excluded == [f"{b.ip(4)}:8443"], excluded
    finally:
        meshagent(a, "intercept", "remove")


PARTIAL_RULESETS = {
    # issue #15, defect 15: ip6tables filter rules but no ip6 nat table
    "ip6-filter-only": [
        ("ip6tables-nft-restore", "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i lo -j ACCEPT\nCOMMIT\n")
    ],
    "nothing": [],
    # a filter table with INPUT alone: the guard's OUTPUT and the nat table are ours to remove
    "ip-input-only": [("iptables-nft", "-A INPUT -p tcp --dport 22 -j ACCEPT")],
}


@pytest.mark.parametrize("start", sorted(PARTIAL_RULESETS))
def test_iptables_nft_removes_what_it_created(hosts: tuple[Host, Host], tmp_path: Path, start: str) -> None:
    """iptables-nft creates tables and base chains on first use and never deletes them: remove
    deletes those we created (and only those, only when empty), so the ruleset comes back
    byte for byte, whatever was there before."""
    a, b = hosts
    for tool, text in PARTIAL_RULESETS[start]:
        if tool.endswith("-restore"):
            a.run(tool, input=text)
        else:
            a.run(tool, *text.split())
    start_servers(a, b, "redirect")
    before = ruleset(a)
    modes = ("redirect", "tproxy", "redirect") if start == "nothing" else ("redirect",)
    for mode in modes:  # with "nothing", mangle comes and goes on the way
        meshagent(a, "intercept", "apply", "--config", str(config(tmp_path, mode, "iptables-nft")))
    assert who(a, b.ip6, APP_PORT)["role"] == "outbound"
    meshagent(a, "intercept", "remove")
    assert ruleset(a) == before


def test_iptables_nft_keeps_a_created_table_someone_else_uses(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    """A table we created but someone else put a rule in since stays, with their rule."""
    a, _b = hosts
    meshagent(a, "intercept", "apply", "--config", str(config(tmp_path, "redirect", "iptables-nft")))
    a.run("ip6tables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:d0c::/64", "-j", "MASQUERADE")
    meshagent(a, "intercept", "remove")
    assert "-A POSTROUTING -s fd00:d0c::/64 -j MASQUERADE" in a.run("ip6tables-nft-save").stdout
    assert "MESHAGENT" not in a.run("ip6tables-nft-save").stdout
    assert "chain OUTPUT" not in a.run("nft", "list", "table", "ip6", "nat").stdout
