"""The heartbeat's #18 fields: what the agent builds is what the authority accepts, bounded, and a
renewal (or renewal starting to fail) is a change worth reporting at once."""

from __future__ import annotations

from agent.authority.health import parse_report
from agent.health.report import build_report, error_line, host_addresses, state_key
from agent.identity.names import validate_host_address


def _build(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "not_ready_reasons": [],
        "directory_updated_at": 10.0,
        "refresh_interval_s": 30.0,
        "certificate": {"serial": "1f2e3d", "not_after": 2.0e9, "renewal_error": ""},
        "interception": {"applied": True, "backend": "nft"},
        "listeners": {"inbound": "0.0.0.0:4143", "outbound": "127.0.0.1:4140"},
        "last_error": "",
        "addresses": host_addresses(),
    }
    return build_report(**{**base, **kw})  # type: ignore[arg-type]


def test_the_fleet_fields_are_what_the_authority_accepts() -> None:
    doc = _build(
        certificate={
            "serial": "1f2e3d",
            "not_after": 2.0e9,
            "renewal_error": "renew_failed: exit 1\nTraceback",
        },
        last_error="directory_refresh: authority_unreachable: " + "x" * 2000,
    )
    report = parse_report(doc)
    assert report.certificate is not None and report.interception is not None
    assert report.certificate.renewal_error == "renew_failed: exit 1 Traceback"  # one line
    assert len(report.last_error) == 1000 and report.last_error.endswith("...")
    assert report.interception.backend == "nft" and dict(report.listeners)["inbound"] == "0.0.0.0:4143"
    # The host's own addresses, as enrollment would register them.
    assert report.addresses == tuple(host_addresses())
    assert all(validate_host_address(a) == a for a in report.addresses)
    # Unknown ones are left out, not sent empty.
    bare = build_report(not_ready_reasons=[], directory_updated_at=None, refresh_interval_s=5)
    assert "certificate" not in bare and "interception" not in bare and parse_report(bare).certificate is None


def test_a_renewal_or_a_failing_renewal_is_reported_at_once() -> None:
    steady = state_key(_build())
    assert state_key(_build()) == steady
    assert state_key(_build(certificate={"serial": "99", "not_after": 2.1e9})) != steady
    failing = {"serial": "1f2e3d", "not_after": 2.0e9, "renewal_error": "authority_unreachable: refused"}
    assert state_key(_build(certificate=failing)) != steady
    assert state_key(_build(interception={"applied": False, "backend": ""})) != steady
    # Addresses and the last error ride along with the next report, they do not trigger one.
    assert state_key(_build(last_error="x: y", addresses=["198.18.0.9"])) == steady


def test_error_lines_from_the_daemon_and_the_proxy() -> None:
    assert error_line({"kind": "reload", "message": "config_invalid: bad"}) == "reload: config_invalid: bad"
    assert error_line({"at": 1.0, "kind": "outbound", "peer": "198.18.0.2:443", "error": "reset"}) == (
        "outbound: peer=198.18.0.2:443 error=reset"
    )
