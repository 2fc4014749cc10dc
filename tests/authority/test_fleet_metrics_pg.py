"""The authority's /metrics on PostgreSQL, a real `authority serve`: the fleet gauges while the
database is up, and while it is away a 200 that says so (registry_up 0, no host gauges it cannot
know) with the refused requests counted, instead of hiding the outage behind a 503."""

from __future__ import annotations

from pathlib import Path

import httpx

from agent.authority import discovery
from agent.authority.tokens import parse_token
from agent.identity.pki import generate_key, make_csr
from tests.pgcluster import PgCluster
from tests.support import AuthorityProcess, metric_samples, running_authority


def _enroll(auth: AuthorityProcess, token: str, name: str) -> httpx.Response:
    body = {
        "token_secret": parse_token(token).secret,
        "csr": make_csr(generate_key()).decode(),
        "host_name": name,
        "addresses": [],
    }
    return httpx.post(f"{auth.url}/v1/enroll", json=body, verify=auth.tls, timeout=30)


def test_metrics_while_postgresql_is_up_and_while_it_is_away(pg_cluster: PgCluster, tmp_path: Path) -> None:
    url = pg_cluster.create_database("fleetmetrics")
    directory = tmp_path / "authority"
    with running_authority(directory, "--database", url) as auth:
        path, _ = discovery.ensure_token(directory)
        headers = {"authorization": f"Bearer {path.read_text().strip()}"}

        def scrape() -> dict[str, float]:
            answer = httpx.get(f"{auth.url}/metrics", headers=headers, verify=auth.tls, timeout=30)
            assert answer.status_code == 200, answer.text
            return metric_samples(answer.text)

        assert _enroll(auth, auth.token("shop/web"), "web-1").status_code == 200
        up = scrape()
        assert up["meshagent_authority_registry_up"] == 1
        assert up['meshagent_authority_hosts{state="silent"}'] == 1  # enrolled, never reported

        token = auth.token("shop/db")  # made before PostgreSQL goes away
        pg_cluster.stop()
        try:
            assert _enroll(auth, token, "db-1").status_code == 503
            away = scrape()
        finally:
            pg_cluster.start()
        assert away["meshagent_authority_registry_up"] == 0
        assert not any(name.startswith("meshagent_authority_hosts") for name in away)
        assert away['meshagent_authority_requests_total{path="/v1/enroll",status="503"}'] == 1
        assert away['meshagent_authority_requests_total{path="/v1/enroll",status="200"}'] == 1
