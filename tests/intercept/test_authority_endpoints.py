"""The endpoints interception never captures: the enrolled authority, and the HTTPS proxy it is
reached through (a root `meshagent renew` under `unmeshed_outbound = "refuse"` must get out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.identity.store import AuthorityRef, IdentityStore
from agent.identity.transport import resolve_proxy
from agent.intercept.authority import enrolled


def _enrolled_with(tmp_path: Path, url: str) -> Path:
    IdentityStore(tmp_path).save_authority(
        AuthorityRef(url=url, ca_pin="sha256:x", ca_pem="", trust_domain="cluster.local", mesh="linkerd")
    )
    return tmp_path


def test_not_enrolled_is_nothing(tmp_path: Path) -> None:
    assert enrolled(tmp_path, resolve_proxy(None, None, environ={})) == []


def test_the_authority_alone_when_reached_directly(tmp_path: Path) -> None:
    state = _enrolled_with(tmp_path, "https://198.18.9.9:8443")
    assert enrolled(state, resolve_proxy(None, None, environ={})) == [("198.18.9.9", 8443)]


def test_the_proxy_it_is_reached_through_is_exempt_too(tmp_path: Path) -> None:
    state = _enrolled_with(tmp_path, "https://198.18.9.9:8443")
    proxy = resolve_proxy("http://user:secret@198.18.7.7:3128", None, environ={})
    assert enrolled(state, proxy) == [("198.18.7.7", 3128), ("198.18.9.9", 8443)]


def test_no_proxy_for_the_authority_leaves_the_proxy_captured(tmp_path: Path) -> None:
    state = _enrolled_with(tmp_path, "https://198.18.9.9:8443")
    proxy = resolve_proxy("http://198.18.7.7:3128", "198.18.0.0/15", environ={})
    assert enrolled(state, proxy) == [("198.18.9.9", 8443)]


def test_the_environment_s_proxy_when_none_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _enrolled_with(tmp_path, "https://198.18.9.9:8443")
    monkeypatch.setenv("HTTPS_PROXY", "http://[2001:db8::7]:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert enrolled(state) == [("198.18.9.9", 8443), ("2001:db8::7", 3128)]
