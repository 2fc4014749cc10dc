"""The Ansible role's catalog metadata (issue #20), without a VM: ansible-playbook on the
controller itself (connection local) renders the `token create` command from the role's own
variables (vars/main.yml), and runs the role's own tasks/metadata.yml against a real authority
directory here (its `delegate_to` is localhost), so the commands the role runs are the ones
tested. (ansible-lint runs in scripts/test; tests/vm/test_ansible.py is the real-VM run.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.authority.host_meta import HostMeta
from agent.authority.service import Authority
from tests.authority.test_backstage_cli import _enroll
from tests.support import init_authority

ANSIBLE_DIR = Path(__file__).resolve().parents[2] / "ansible"
BIN = Path(sys.executable).parent
MESHAGENT = str(BIN / "meshagent")

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(), reason="needs ansible-core in the venv (pip install -e .[dev])"
)

PLAYBOOK = """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: The role's metadata tasks
      ansible.builtin.include_role:
        name: meshagent
        tasks_from: metadata
        public: true
    - name: What the role's variables render to
      ansible.builtin.copy:
        dest: "{{ rendered_file }}"
        mode: "0600"
        content: >-
          {{ {'token_argv': _meshagent_token_create_argv, 'doc': _meshagent_meta_doc,
              'managed': _meshagent_meta_managed | bool} | to_json }}
      changed_when: false
"""

FULL = {
    "meshagent_owner_team": "payments",
    "meshagent_owner_contact": "#payments-oncall",
    "meshagent_description": "Billing database <b>primary</b>",
    "meshagent_system": "shop",
    "meshagent_tier": 1,
    "meshagent_links": {
        "runbook": "https://wiki.example/billing",
        # "=" in a URL's query and in a title (review L9: `--link TITLE=URL` splits at the first
        # "=", so the role passes the links in a document, never as flags)
        "dashboard": "https://grafana.example/d/b?orgId=1&var-host=billing-1",
        "env=prod": "https://wiki.example/prod",
    },
    "meshagent_slos": ["availability=99.9", "latency=99:300ms,window=7d"],
}


def run_play(tmp: Path, variables: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (tmp / "play.yml").write_text(PLAYBOOK)
    (tmp / "vars.json").write_text(json.dumps({"rendered_file": str(tmp / "rendered.json"), **variables}))
    env = {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_NOCOLOR": "true",
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
    }
    argv = [
        str(BIN / "ansible-playbook"),
        "-i",
        "localhost,",
        str(tmp / "play.yml"),
        "-e",
        f"@{tmp / 'vars.json'}",
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def play(tmp: Path, variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the playbook; (the rendered values, localhost's stats)."""
    proc = run_play(tmp, variables)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    recap = re.search(r"^localhost\s+:\s+(.*)$", proc.stdout, re.MULTILINE)
    assert recap is not None, proc.stdout
    stats = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", recap.group(1))}
    return json.loads((tmp / "rendered.json").read_text()), stats


def authority_vars(directory: Path, serial: str | None) -> dict[str, Any]:
    """The role's authority variables pointing here, and what enroll.yml registers for a host
    enrolled before this run (status rc 0 with its serial) or for none (no status)."""
    return {
        "meshagent_authority_host": "localhost",
        "meshagent_authority_user": "",
        "meshagent_authority_command": MESHAGENT,
        "meshagent_authority_dir": str(directory),
        "meshagent_authority_url": "https://authority.example:8443",
        "meshagent_identity": "shop/billing",
        "_meshagent_enrolled": {"skipped": True, "changed": False},
        "_meshagent_status": (
            {"skipped": True, "changed": False}
            if serial is None
            else {"rc": 0, "stdout": json.dumps({"serial": serial}), "changed": False}
        ),
    }


def check_token_command(rendered: dict[str, Any], directory: Path) -> None:
    """The `token create` argv enroll.yml runs, from FULL; run here as the role runs it, against
    the real authority: the token carries all of the metadata."""
    assert rendered["managed"] is True
    assert rendered["token_argv"] == [
        MESHAGENT, "authority", "token", "create", "--dir", str(directory), "--identity", "shop/billing",
        "--url", "https://authority.example:8443", "--ttl", "15m", "--json", "--from-file", "-",
    ]  # fmt: skip
    # enroll.yml's stdin: the same document `host set --from-file -` reads
    stdin = json.dumps(rendered["doc"])
    proc = subprocess.run(rendered["token_argv"], input=stdin, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)["meta"]
    assert (meta["owner_team"], meta["tier"], meta["description"]) == (
        "payments",
        "1",
        "Billing database <b>primary</b>",
    )
    assert {link["title"]: link["url"] for link in meta["links"]} == FULL["meshagent_links"]
    assert [(s["kind"], s["objective"], s["window_days"]) for s in meta["slos"]] == [
        ("availability", 99.9, 28),
        ("latency", 99.0, 7),
    ]


def test_an_enrolled_hosts_metadata_is_set_once_then_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    host_id = _enroll(authority, "shop/billing", "billing-1")
    serial = authority.registry.list_hosts()[0].serial
    authority.registry.close()

    def stored() -> HostMeta:
        auth = Authority.open(directory)
        try:
            return auth.registry.host_meta([host_id]).get(host_id, HostMeta())
        finally:
            auth.registry.close()

    base = authority_vars(directory, serial)
    rendered, stats = play(tmp_path, {**base, **FULL})
    assert stats["changed"] == 1
    check_token_command(rendered, directory)
    meta = stored()
    assert (meta.owner_team, meta.system, meta.tier) == ("payments", "shop", "1")
    assert dict(meta.links) == FULL["meshagent_links"]
    assert [s.spec() for s in meta.slos] == ["availability=99.9", "latency=99:300ms,window=7d"]

    # The same variables again: nothing changes (the CLI compares; the role reads its answer).
    _, stats = play(tmp_path, {**base, **FULL})
    assert stats["changed"] == 0
    # A link and an SLO removed from the inventory go away on the authority too.
    fewer = {**FULL, "meshagent_links": {"runbook": "https://wiki.example/billing"}, "meshagent_slos": []}
    _, stats = play(tmp_path, {**base, **fewer})
    assert stats["changed"] == 1
    assert stored().links == (("runbook", "https://wiki.example/billing"),) and stored().slos == ()
    # No metadata variable at all: the role leaves what is stored alone, and mints tokens
    # without any metadata option.
    rendered, stats = play(tmp_path, base)
    assert stats["changed"] == 0 and stored().owner_team == "payments"
    assert rendered["managed"] is False and rendered["token_argv"][-1] == "--json"


def test_a_refusal_fails_the_host_with_the_clis_reason(tmp_path: Path) -> None:
    directory = tmp_path / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    _enroll(authority, "shop/billing", "billing-1")
    serial = authority.registry.list_hosts()[0].serial
    authority.registry.close()
    variables = {**authority_vars(directory, serial), "meshagent_slos": ["availability=100"]}
    proc = run_play(tmp_path, variables)
    assert proc.returncode != 0
    failed = proc.stdout
    assert "the authority refused the catalog metadata" in failed and "objective" in failed, failed
