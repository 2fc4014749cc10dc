"""How the authority serves discovered Services: not before discovery's first result in
controller mode, and never behind a host that claims a Service's cluster IP."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.authority.test_host_config_poll import SERVICE
from tests.support import init_authority


def _authority(tmp_path: Path, address: str) -> tuple[Authority, str]:
    directory = tmp_path / "authority"
    init_authority(directory)
    authority = Authority.open(directory)
    secret = authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0].secret
    host = authority.enroll(secret, make_csr(generate_key()).decode(), "web", [address])
    return authority, host.api_token


def _served(authority: Authority, token: str) -> dict[str, object]:
    host = authority.authenticate(token)
    rendered = json.loads(authority.render_host_config(host).body)
    assert {k: v for k, v in rendered.items() if k != "generated_at"} == {
        k: v for k, v in authority.host_config(host).items() if k != "generated_at"
    }
    return rendered  # type: ignore[no-any-return]


def test_a_restarted_controller_serves_no_services_key_until_discovery_answers(tmp_path: Path) -> None:
    authority, token = _authority(tmp_path, "198.18.0.10")
    assert _served(authority, token)["services"] == []  # plain serve: no Services, said so
    authority.await_discovery()
    before = authority.render_host_config(authority.authenticate(token)).etag
    assert "services" not in _served(authority, token)  # hosts keep the Services they have
    authority.set_discovered([])  # discovery answered "none": that is news, and said
    assert _served(authority, token)["services"] == []
    assert authority.render_host_config(authority.authenticate(token)).etag != before


def test_a_host_claiming_a_service_cluster_ip_is_left_out_of_the_catalog(tmp_path: Path) -> None:
    authority, token = _authority(tmp_path, "198.19.0.10")  # SERVICE's cluster IP
    cidrs = [entry["cidr"] for entry in _served(authority, token)["catalog"]]  # type: ignore[index]
    assert cidrs == ["198.19.0.10/32"]  # no Service known yet: the host's address is served
    authority.set_discovered([SERVICE])
    doc = _served(authority, token)
    assert doc["catalog"] == []  # the claim would take every host's calls to the Service
    assert doc["services"] == [SERVICE]
