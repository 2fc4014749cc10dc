"""Rotation for real: 60 s certificates kept valid for 3 minutes by `meshagent renew --loop`."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.identity.certinfo import utcnow
from agent.identity.store import IdentityStore
from tests.support import MESHAGENT, run_cli, running_authority


@pytest.mark.slow
def test_sixty_second_certificates_stay_valid_for_three_minutes(tmp_path: Path) -> None:
    with running_authority(tmp_path / "authority", "--cert-lifetime", "60s") as auth:
        state = tmp_path / "host"
        run_cli("enroll", auth.token(), "--state-dir", str(state), check=True)
        store = IdentityStore(state)
        first = store.load().summary
        assert (first.not_after - utcnow()).total_seconds() <= 61

        loop = subprocess.Popen(
            [*MESHAGENT, "--log-level", "info", "renew", "--loop", "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        serials = {first.serial}
        invalid: list[str] = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                s = store.load().summary
                now = utcnow()
                if not (s.not_before <= now < s.not_after):
                    invalid.append(
                        f"{now.isoformat()}: serial {s.serial} valid {s.not_before}..{s.not_after}"
                    )
                serials.add(s.serial)
                time.sleep(2)
                assert loop.poll() is None, "the renewal loop died"
        finally:
            loop.send_signal(signal.SIGTERM)
            out, _ = loop.communicate(timeout=20)
        assert invalid == []
        # Renewal at ~70 % of a 2-minute span (60 s backdate + 60 s): a new cert every ~25 s.
        assert len(serials) >= 6, out
        assert loop.returncode == 0, out
        assert "rotation.scheduled" in out
        assert store.renewal_record()["last_result"] == "ok"
