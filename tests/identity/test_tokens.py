from __future__ import annotations

import base64
import json

import pytest

from agent.authority.tokens import MalformedToken, new_token, parse_token

PIN = "sha256:" + "ab" * 32


def test_round_trip_keeps_url_pin_and_secret() -> None:
    token = new_token("https://198.18.0.1:8443/", PIN)
    parsed = parse_token(token.encode())
    assert parsed == token
    assert parsed.authority_url == "https://198.18.0.1:8443"
    assert token.secret not in repr(token)  # never logged by accident


def _payload(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "ma2.x.y",
        f"ma1.{_payload('not json')}.{'s' * 43}",
        f"ma1.{_payload('{}')}.{'s' * 43}",
        "ma1." + _payload(json.dumps({"u": "https://h:1", "p": "md5:1"})) + "." + "s" * 43,
        "ma1." + _payload(json.dumps({"u": "http://h:1", "p": "sha256:1"})) + "." + "s" * 43,
        "ma1." + _payload(json.dumps({"u": "https://h:1", "p": "sha256:1"})) + ".short",
    ],
    ids=[
        "empty",
        "garbage",
        "version",
        "payload-not-json",
        "payload-empty",
        "pin-not-sha256",
        "plain-http",
        "secret-truncated",
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(MalformedToken) as err:
        parse_token(text)
    assert err.value.hint or "https" in err.value.message
