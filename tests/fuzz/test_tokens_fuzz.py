"""Property tests of join tokens (agent/authority/tokens.py `parse_token`, what `enroll` reads
from an operator's paste or a file): any text is a JoinToken that encodes back to itself, or a
MalformedToken saying what is wrong; nothing else is raised."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.authority.tokens import JoinToken, MalformedToken, parse_token

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
urls = st.sampled_from(
    [
        "https://198.18.0.1:8443",
        "https://a",
        "http://a:1",
        "https://",
        "ftp://x",
        "https://[::1]:1",
        "https://a\n",
    ]
) | st.text(max_size=30)
pins = st.sampled_from(["sha256:" + "ab" * 32, "sha256:", "md5:x"]) | st.text(max_size=20)
payloads = st.one_of(
    st.builds(lambda u, p: {"u": u, "p": p}, urls, pins),
    st.dictionaries(st.sampled_from(["u", "p", "x"]), json_values, max_size=3),
    json_values,
)


def encode_payload(doc: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def nested(depth: int) -> str:
    return base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode().rstrip("=")


@st.composite
def tokens(draw: st.DrawFn) -> str:
    payload = draw(
        st.builds(encode_payload, payloads)
        | st.builds(nested, st.integers(1, 200) | st.sampled_from([5_000, 200_000]))
        | st.text(max_size=40)
    )
    secret = draw(
        st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", max_size=50)
        | st.text(max_size=50)
    )
    prefix = draw(st.sampled_from(["ma1", "ma1", "ma2", "", "MA1"]))
    space = draw(st.sampled_from(["", " ", "\n", "\t\r\n"]))
    return f"{space}{prefix}.{payload}.{secret}{space}"


@given(tokens() | st.text(max_size=200))
def test_any_text_is_a_token_or_malformed_token(text: str) -> None:
    try:
        token = parse_token(text)
    except MalformedToken as exc:
        assert exc.code and exc.message and exc.hint
        return
    assert isinstance(token, JoinToken)
    assert token.authority_url.startswith("https://") and token.ca_pin.startswith("sha256:")
    assert len(token.secret) >= 32
    assert parse_token(token.encode()) == token


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_a_deeply_nested_payload_is_a_malformed_token(depth: int) -> None:
    with pytest.raises(MalformedToken):
        parse_token(f"ma1.{nested(depth)}.{'s' * 43}")
