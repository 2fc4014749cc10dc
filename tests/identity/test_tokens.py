from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import click
import pytest

from agent.authority.service import MAX_TOKEN_TTL, Authority
from agent.authority.tokens import MalformedToken, new_token, parse_token
from agent.cli.output import Duration
from agent.errors import ExitCode, RejectedError
from tests.support import init_authority, run_cli

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


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("30d", 30 * 86400)],
    ids=["one-second", "seconds", "minutes", "compound", "max"],
)
def test_token_ttl_accepted(text: str, seconds: int) -> None:
    assert Duration(maximum=MAX_TOKEN_TTL).convert(text, None, None) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text",
    ["0s", "0d0h", "00s", "31d", "9" * 20 + "d", "9" * 5000 + "s", "-1s", "1.5h", "1h 30m", "", "٣s"],
    ids=["zero", "zero-compound", "zero-padded", "over-max", "overflow", "giant", "negative", "fraction",
         "space", "empty", "non-ascii-digit"],
)  # fmt: skip
def test_token_ttl_refused_as_usage_error(text: str) -> None:
    with pytest.raises(click.BadParameter):
        Duration(maximum=MAX_TOKEN_TTL).convert(text, None, None)


def test_token_create_refuses_a_zero_ttl(tmp_path: Path) -> None:
    directory = tmp_path / "a"
    init_authority(directory)
    args = ("--identity", "shop/web", "--url", "https://127.0.0.1:1")
    proc = run_cli("authority", "token", "create", "--dir", str(directory), *args, "--ttl", "0s")
    assert proc.returncode == ExitCode.USAGE
    assert "--ttl" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(RejectedError) as err:  # the domain refuses it too, whoever calls
        Authority.open(directory).create_tokens("shop/web", "https://127.0.0.1:1", timedelta(0))
    assert err.value.code == "invalid_request"
    assert Authority.open(directory).registry.list_tokens() == []
