"""A real agent against a real authority (issue #18): what its heartbeat tells the fleet, and what
it does when the authority revokes it (403 host_revoked on its long poll and its report)."""

from __future__ import annotations

from pathlib import Path

from agent.authority.health import load_report, stored_fleet_health
from agent.authority.service import Authority
from agent.config import load_config
from agent.health.report import config_digest, host_addresses
from agent.identity.certinfo import utcnow
from agent.identity.store import IdentityStore
from tests.support import AuthorityProcess, run_cli

from .conftest import running_agent


def test_the_heartbeat_carries_the_fleet_fields_and_a_revocation_reaches_the_agent(
    tmp_path: Path, authority: AuthorityProcess, enrolled: Path
) -> None:
    serial = IdentityStore(enrolled).load_info().summary.serial
    registry = Authority.open(authority.directory).registry
    with running_agent(tmp_path, enrolled) as agent:
        host = registry.list_hosts()[0]

        def healthy() -> bool:
            return stored_fleet_health(host, utcnow(), registry.reports()).text == "healthy"

        # (The first report may come before the first directory fetch: "not ready: directory
        # never refreshed" until the next.)
        agent.wait_for(healthy, "a healthy report stored at the authority")
        report = load_report(registry.reports()[host.id][1])
        assert report is not None and report.certificate is not None and report.interception is not None
        assert report.certificate.serial == serial == host.serial
        assert report.certificate.not_after == host.not_after.timestamp()
        assert report.certificate.renewal_error == ""
        assert (report.interception.applied, report.interception.backend) == (False, "")  # intercept off
        assert dict(report.listeners) == agent.status()["listeners"]
        assert {name for name, _ in report.listeners} == {"inbound", "outbound"}
        assert report.addresses == tuple(host_addresses())
        assert report.config_digest == config_digest(load_config(tmp_path / "agent.toml", required=True))

        run_cli("authority", "revoke", host.id, "--dir", str(authority.directory), check=True)
        # The long poll is answered 403 host_revoked once the registry changes (about a second).
        agent.wait_for(lambda: agent.status()["revoked"] is not None, "the agent told it is revoked")
        status = agent.status()
        assert status["revoked"]["by"] in ("directory", "report")
        assert "identity: revoked by the authority" in status["not_ready_reasons"]
        assert agent.get("/ready")[0] == 503
        log = agent.log.read_text()
        assert log.count("identity.revoked") == 1, "said once, not at every retry"
        shown = run_cli("status", "--state-dir", str(enrolled), "--config", str(tmp_path / "agent.toml"))
        assert "NOT READY: identity: revoked by the authority" in shown.stdout
        assert stored_fleet_health(registry.list_hosts()[0], utcnow(), registry.reports()).text == "revoked"
        assert agent.stop() == 0
