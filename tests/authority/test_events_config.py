"""config_changed (#20): the agent reports a short digest of its effective configuration, and the
authority logs config_changed when it moves (old -> new digest; never a value)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.authority.health import parse_report, report_state
from agent.config import load_config
from agent.errors import MeshagentError
from agent.health.report import CONFIG_DIGEST_HEX, build_report, config_digest


def _digest(path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path.write_text(text)
    return config_digest(load_config(path, required=True, environ=environ or {}))


def test_the_digest_follows_the_effective_values_not_where_they_came_from(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    base = _digest(path, "")
    assert len(base) == CONFIG_DIGEST_HEX and all(c in "0123456789abcdef" for c in base)
    assert _digest(path, "") == base  # stable: the same config, the same digest
    changed = _digest(path, "[proxy]\nidle_timeout_s = 601\n")
    assert changed != base  # a SIGHUP reload of this file would move it
    # The same value from the environment instead of the file: the same digest.
    assert _digest(path, "", {"MESHAGENT_PROXY_IDLE_TIMEOUT_S": "601"}) == changed


def test_the_digest_never_covers_a_secret(tmp_path: Path) -> None:
    """A proxy password is hashed as `config show` prints it (***): changing only the password
    leaves the digest as it was, so the digest says nothing about it."""
    path = tmp_path / "agent.toml"
    one = _digest(path, '[authority]\nhttps_proxy = "http://user:hunter2@10.0.0.1:3128"\n')
    two = _digest(path, '[authority]\nhttps_proxy = "http://user:other-secret@10.0.0.1:3128"\n')
    assert one == two
    assert _digest(path, '[authority]\nhttps_proxy = "http://user:x@10.0.0.2:3128"\n') != one


def test_the_report_carries_the_digest_and_the_authority_checks_it(tmp_path: Path) -> None:
    digest = "0123abcd0123abcd"
    doc = build_report(
        not_ready_reasons=[], directory_updated_at=None, refresh_interval_s=5, config_digest=digest
    )
    report = parse_report(doc)
    assert report.config_digest == "0123abcd0123abcd"
    assert "0123abcd0123abcd" in report_state(report)
    # An older agent's report has none: taken, and its state has no digest.
    older = build_report(not_ready_reasons=[], directory_updated_at=None, refresh_interval_s=5)
    assert "config_digest" not in older
    assert parse_report(older).config_digest is None
    for bad in ("", "XYZ", "a" * 65, 12, "0123 abcd"):
        with pytest.raises(MeshagentError, match="config_digest"):
            parse_report({**doc, "config_digest": bad})
