"""Property tests of the authority's API (agent.authority.api.create_app, in-process through
Starlette's TestClient): whatever JSON (or not JSON) a client posts and whatever headers and
query it sends, the answer is a JSON 4xx with a stable code, never a 500."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

with warnings.catch_warnings():  # starlette's note about its httpx use, at import
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from agent.authority.api import create_app
from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from tests.support import init_authority

pytestmark = pytest.mark.timeout(300)


class Api:
    def __init__(self, client: TestClient, chain: str, csr: str, discovery_token: str) -> None:
        self.client, self.chain, self.csr, self.discovery_token = client, chain, csr, discovery_token


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    directory: Path = tmp_path_factory.mktemp("authority")
    init_authority(directory)
    authority = Authority.open(directory)
    # One enrolled host, so that renewals reach the certificate checks with a real chain.
    token = authority.create_tokens("shop/billing", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    enrolled = authority.enroll(token.secret, make_csr(key).decode(), "host-1", ["10.0.0.5"])
    discovery_token = (directory / "prometheus-token").read_text().strip()
    with TestClient(
        create_app(authority), base_url="https://testserver", raise_server_exceptions=False
    ) as client:
        yield Api(client, enrolled.chain_pem.decode(), make_csr(generate_key()).decode(), discovery_token)


def refusal(response: Any) -> dict[str, Any]:
    """A refusal as the API documents it: a 4xx, JSON {code, message, hint}."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert isinstance(doc, dict) and isinstance(doc.get("code"), str) and doc["code"], doc
    assert isinstance(doc.get("message"), str)
    return doc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
timestamps = st.integers() | st.sampled_from([10**23, -(10**23), 2**63, 2**31, 0, -1]) | json_values


def body(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> bytes:
    """A body with the endpoint's fields (each maybe missing or of another type), or anything."""
    kind = draw(st.sampled_from(["fields", "fields", "json", "bytes", "nested"]))
    if kind == "fields":
        doc = {
            name: draw(strategy | json_values) for name, strategy in fields.items() if draw(st.integers(0, 9))
        }
        doc.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
        return json.dumps(doc).encode()  # NaN and Infinity included: Python's json reads them
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":  # deep enough for RecursionError, small enough for the body limit
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        depth = draw(st.sampled_from([10, 5000, 60_000 // (len(opener) + 1)]))
        return (opener * depth + "1" + closer * depth).encode()
    return draw(st.binary(max_size=200))


@st.composite
def enroll_bodies(draw: st.DrawFn, csr: str) -> bytes:
    names = st.sampled_from(["host-1", "a" * 300, "h\nx", "\x1b[31m", "", "é"]) | st.text(max_size=20)
    addresses = st.lists(
        st.sampled_from(["10.0.0.5", "not-an-ip", "::1", "0.0.0.0", "10.0.0.0/8"]) | json_values, max_size=70
    )
    fields = {
        "token_secret": st.text(max_size=50),
        "csr": st.just(csr) | st.text(max_size=50),
        "host_name": names,
        "addresses": addresses,
    }
    return body(draw, fields)


@st.composite
def renew_bodies(draw: st.DrawFn, chain: str, csr: str) -> bytes:
    fields = {
        "certificate_chain": st.just(chain) | st.text(max_size=50),
        "csr": st.just(csr) | st.text(max_size=50),
        "timestamp": timestamps,
        "signature": st.text(max_size=100) | st.sampled_from(["", "AAAA", "=" * 10]),
    }
    return body(draw, fields)


def test_enroll_bodies(api: Api) -> None:
    @given(enroll_bodies(api.csr))
    def check(data: bytes) -> None:
        refusal(api.client.post("/v1/enroll", content=data, headers={"content-type": "application/json"}))

    check()


def test_renew_bodies(api: Api) -> None:
    @given(renew_bodies(api.chain, api.csr))
    def check(data: bytes) -> None:
        refusal(api.client.post("/v1/renew", content=data, headers={"content-type": "application/json"}))

    check()


header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def test_host_config_credentials(api: Api) -> None:
    @given(st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "]), header_text)
    def check(scheme: str, credentials: str) -> None:
        doc = refusal(api.client.get("/v1/host/config", headers={"authorization": scheme + credentials}))
        assert doc["code"] in ("unauthenticated", "host_unknown", "host_revoked"), doc

    check()


def test_discovery_queries(api: Api) -> None:
    ports = (
        st.sampled_from(["-1", "0", "65536", "1" + "0" * 23, "4191x", "", " 4191", "4_191", "٤١٩١"])
        | header_text
    )

    @given(ports, st.booleans())
    def check(port: str, authorized: bool) -> None:
        headers = {"authorization": f"Bearer {api.discovery_token}"} if authorized else {}
        response = api.client.get("/v1/prometheus/targets", params={"port": port}, headers=headers)
        if response.status_code == 200:  # (the port's range: test_discovery_ports_out_of_range)
            assert authorized and isinstance(response.json(), list)
        else:
            refusal(response)

    check()


@pytest.mark.parametrize("port", ["-1", "0", "65536", "1" + "0" * 23])
def test_discovery_ports_out_of_range_are_refused(api: Api, port: str) -> None:
    headers = {"authorization": f"Bearer {api.discovery_token}"}
    response = api.client.get("/v1/prometheus/targets", params={"port": port}, headers=headers)
    assert refusal(response)["code"] == "invalid_request"


ROUTES = ["/v1/enroll", "/v1/renew", "/v1/authority", "/v1/nope", "/", "/v1/host/config", "/healthz"]


def test_unknown_routes_and_methods_are_json_refusals(api: Api) -> None:
    @given(st.sampled_from(ROUTES), st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]))
    def check(path: str, method: str) -> None:
        response = api.client.request(method, path)
        if response.status_code >= 300:
            refusal(response)

    check()
