"""Join tokens: single-use, expiring, bound to one identity, stored only as a hash.

The token text carries what the host needs to reach and verify the authority, so enrolling
needs nothing else:

    ma1.<base64url(JSON {"u": authority URL, "p": "sha256:<hex of the API CA's SPKI>"})>.<secret>

Only sha256(secret) is stored by the authority; the secret is 32 random bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass
from urllib.parse import urlparse

from agent.errors import MeshagentError

PREFIX = "ma1"


class MalformedToken(MeshagentError):
    code = "token_malformed"


@dataclass(frozen=True)
class JoinToken:
    authority_url: str
    ca_pin: str
    secret: str

    def __repr__(self) -> str:  # never print the secret by accident
        return f"JoinToken(authority_url={self.authority_url!r}, ca_pin={self.ca_pin!r}, secret='...')"

    @property
    def hash(self) -> str:
        return hash_secret(self.secret)

    @property
    def token_id(self) -> str:
        """A short public handle for logs and listings; reveals nothing usable."""
        return self.hash[:12]

    def encode(self) -> str:
        payload = json.dumps({"u": self.authority_url, "p": self.ca_pin}, separators=(",", ":"))
        b64 = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
        return f"{PREFIX}.{b64}.{self.secret}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(authority_url: str, ca_pin: str) -> JoinToken:
    validate_url(authority_url)
    return JoinToken(authority_url.rstrip("/"), ca_pin, secrets.token_urlsafe(32))


def validate_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise MalformedToken(
            f"authority URL {url!r} must be https://HOST:PORT",
            "give the address hosts use to reach the authority, e.g. https://198.18.0.1:8443",
        )
    return url


def parse_token(text: str) -> JoinToken:
    """Decode a token as printed by `authority token create`; say what is wrong with it if not."""
    hint = "copy the whole token printed by `meshagent authority token create` (it starts with ma1.)"
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise MalformedToken("the join token is malformed: expected ma1.<payload>.<secret>", hint)
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        payload = json.loads(base64.urlsafe_b64decode(padded))
        url, pin = payload["u"], payload["p"]
    except (binascii.Error, ValueError, KeyError, TypeError, RecursionError):  # deep nesting too
        raise MalformedToken("the join token's payload is unreadable (truncated or altered?)", hint) from None
    if not isinstance(url, str) or not isinstance(pin, str) or not pin.startswith("sha256:"):
        raise MalformedToken("the join token's payload lacks the authority URL or CA pin", hint)
    if len(parts[2]) < 32:
        raise MalformedToken("the join token's secret is too short (truncated?)", hint)
    validate_url(url)
    return JoinToken(url, pin, parts[2])
