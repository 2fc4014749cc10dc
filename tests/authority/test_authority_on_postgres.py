"""End to end on PostgreSQL: `authority init --database URL`, `authority serve`, and real
`meshagent enroll` runs against it; PostgreSQL stopped under the running authority (503 with a
hint and Retry-After) and started again (the same process serves, nothing lost)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from agent.authority.registry import DATABASE_ENV
from agent.authority.tokens import parse_token
from agent.errors import ExitCode, RejectedError
from agent.identity.client import AuthorityUnavailable, _refusal, _Response
from agent.identity.pki import generate_key, make_csr
from tests.pgcluster import PgCluster
from tests.support import cli_json, init_authority, run_cli, running_authority


def test_init_serve_and_enroll_on_postgresql_then_survive_its_restart(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    url = pg_cluster.create_database("e2e")
    directory = tmp_path / "authority"
    with running_authority(directory, "--database", url) as auth:
        assert (directory / "database.url").read_text().strip() == url
        assert not (directory / "registry.db").exists()
        first = run_cli("enroll", auth.token("shop/web"), "--state-dir", str(tmp_path / "h1"), "--json")
        assert first.returncode == 0, first.stderr
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT identity FROM hosts").fetchall()
        assert rows == [("shop/web",)]

        token = auth.token("shop/db")  # made before PostgreSQL goes away
        pg_cluster.stop()
        try:
            answer = httpx.post(
                f"{auth.url}/v1/enroll",
                json={
                    "token_secret": parse_token(token).secret,
                    "csr": make_csr(generate_key()).decode(),
                    "host_name": "db-1",
                    "addresses": [],
                },
                verify=auth.tls,
                timeout=30,
            )
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "2"
            doc = answer.json()
            assert doc["code"] == "registry_unavailable"
            assert str(pg_cluster.socket_dir) in doc["message"] and doc["hint"]
        finally:
            pg_cluster.start()

        # The same process serves again once its pool reconnects (about a second): a refused
        # enrollment used nothing, the host runs `enroll` again with the same token.
        for _ in range(30):
            second = run_cli("enroll", token, "--state-dir", str(tmp_path / "h2"), "--json")
            if second.returncode == 0:
                break
        assert second.returncode == 0, second.stderr
        hosts = cli_json("authority", "hosts", "--dir", str(directory))
        assert sorted(h["identity"] for h in hosts) == ["shop/db", "shop/web"]
        serials = {json.loads(p.stdout)["serial"] for p in (first, second)}
        assert serials == {h["serial"] for h in hosts}


def test_cli_database_errors_say_what_to_do(tmp_path: Path) -> None:
    directory = tmp_path / "authority"
    init_authority(directory)
    wrong = run_cli("authority", "hosts", "--dir", str(directory), "--database", "mysql://db/mesh")
    assert wrong.returncode == ExitCode.CONFIG
    assert "not a PostgreSQL URL" in wrong.stderr and "PGPASSWORD" in wrong.stderr
    down = run_cli(
        "authority", "hosts", "--dir", str(directory), env={DATABASE_ENV: f"postgresql:///m?host={tmp_path}"}
    )
    assert down.returncode == ExitCode.UNREACHABLE
    assert f"cannot reach its database at {tmp_path}" in down.stderr and "pg_isready" in down.stderr


def test_enroll_waits_out_a_database_restart_in_one_run(pg_cluster: PgCluster, tmp_path: Path) -> None:
    """`meshagent enroll` during a database outage: the 503 is not a refusal (nothing was
    consumed), so the CLI waits as Retry-After says and enrolls once PostgreSQL is back."""
    url = pg_cluster.create_database("retry")
    directory = tmp_path / "authority"
    state = str(tmp_path / "h")
    with running_authority(directory, "--database", url) as auth:
        token = auth.token("shop/api")
        out, err = _through_an_outage(pg_cluster, "enroll", token, "--state-dir", state, "--json")
        assert "event=authority.unavailable path=/v1/enroll code=registry_unavailable" in err, err
        enrolled = json.loads(out)["serial"]
        # A renewal too; it is signed afresh for each attempt.
        out, err = _through_an_outage(pg_cluster, "renew", "--state-dir", state, "--json")
        assert "event=authority.unavailable path=/v1/renew code=registry_unavailable" in err, err
        renewed = json.loads(out)["serial"]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT serial FROM hosts").fetchall() == [(renewed,)]
        assert renewed != enrolled


def _through_an_outage(pg_cluster: PgCluster, *argv: str) -> tuple[str, str]:
    """`meshagent ARGV` started while PostgreSQL is stopped, which is started again 4 s later:
    the first attempt meets the outage (the authority waits up to 3 s for a connection, then
    answers 503) and the CLI waits; it must succeed in that one run."""
    pg_cluster.stop()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
    finally:
        pg_cluster.start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out, err


def test_a_503_is_unreachable_not_a_refusal() -> None:
    """Exit code 5 (try again), not 6 (refused): a 503 consumed nothing."""
    body = json.dumps({"code": "registry_unavailable", "message": "database away", "hint": "wait"}).encode()
    unavailable = _refusal(_Response(503, body, {"retry-after": "2"}))
    assert isinstance(unavailable, AuthorityUnavailable) and unavailable.exit_code == ExitCode.UNREACHABLE
    assert unavailable.code == "registry_unavailable" and unavailable.hint == "wait"
    used = _refusal(_Response(403, json.dumps({"code": "token_used", "message": "m"}).encode(), {}))
    assert isinstance(used, RejectedError) and used.exit_code == ExitCode.REJECTED
