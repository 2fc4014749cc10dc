"""The daemon renews through the identity package's own entry point (issue #18): a short-lived
`python -m agent.identity.renew` that renews a real enrolled identity at a real authority, never
loads the CLI, and says host_revoked so that the rotator stops retrying."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ExitCode, MeshagentError
from agent.identity.renew import run_renewal
from agent.identity.rotation import Rotator
from agent.identity.store import IdentityStore
from tests.support import AuthorityProcess, run_cli

# The renewal process's own program, with a check of what it imported (click may come with
# httpx, which imports its own command line when click is installed: not ours).
_RENEW_AND_LIST_MODULES = """
import json, sys
from agent.identity import renew
code = renew.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith(("agent.cli", "agent.daemon")))
print(json.dumps({"code": code, "cli_modules": loaded}), file=sys.stderr)
"""


def test_python_m_renew_renews_and_never_loads_the_cli(authority: AuthorityProcess, enrolled: Path) -> None:
    store = IdentityStore(enrolled)
    before = store.load_info().summary.serial
    proc = subprocess.run(
        [sys.executable, "-m", "agent.identity.renew", "--state-dir", str(enrolled), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    after = store.load_info().summary
    assert doc["serial"] == after.serial != before
    assert doc["not_after"] == after.not_after.isoformat() and doc["spiffe_id"].endswith("/sa/billing")
    assert "identity.renewed" in proc.stderr

    probe = subprocess.run(
        [sys.executable, "-c", _RENEW_AND_LIST_MODULES, "--state-dir", str(enrolled), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    seen = json.loads(probe.stderr.strip().splitlines()[-1])
    assert seen == {"code": 0, "cli_modules": []}, probe.stderr
    assert store.load_info().summary.serial != after.serial

    # The daemon's call: the same process, the renewed identity loaded back.
    third = run_renewal(store)
    assert third.summary.serial == store.load_info().summary.serial != after.serial


def test_a_revoked_host_is_told_and_the_rotator_stops_retrying(
    authority: AuthorityProcess, enrolled: Path
) -> None:
    store = IdentityStore(enrolled)
    host_id = json.loads(run_cli("authority", "hosts", "--dir", str(authority.directory), "--json").stdout)[
        0
    ]["id"]
    run_cli("authority", "revoke", host_id, "--dir", str(authority.directory), check=True)

    proc = subprocess.run(
        [sys.executable, "-m", "agent.identity.renew", "--state-dir", str(enrolled), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.REJECTED
    assert json.loads(proc.stdout)["error"]["code"] == "host_revoked"
    with pytest.raises(MeshagentError) as info:
        run_renewal(store)
    assert info.value.code == "host_revoked" and info.value.hint

    calls: list[str] = []

    def renew(s: IdentityStore) -> object:
        calls.append("renew")
        return run_renewal(s)

    # Renew at once (a clock past the certificate's renewal time); without the stop, a refused
    # renewal is retried with backoff until `stop` is set, which this test never does.
    late = store.load_info().summary.not_after
    rotator = Rotator(store, renew_fn=renew, clock=lambda: late)  # type: ignore[arg-type]
    asyncio.run(asyncio.wait_for(rotator.run(asyncio.Event()), timeout=60))
    assert calls == ["renew"] and rotator.revoked
    assert rotator.last_error.startswith("host_revoked:")
