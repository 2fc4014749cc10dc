"""The host's HTTPS client for the authority: discovery by pin, enroll, renew.

The join token carries the authority's URL and the sha256 pin of its API CA. Discovery reads
the CA once without verification, accepts it only if its public key matches the pin, and from
then on every request (the token's secret included) goes over TLS verified against that CA.
The hostname is not checked: the pinned CA is the authority's own and signs nothing else, so a
certificate it issued proves the peer is the authority whatever name or NAT address the host
used to reach it.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import time
from typing import Any

import httpx
from cryptography import x509

from agent.errors import ClockSkewError, RejectedError, TrustError, UnreachableError
from agent.identity.pki import load_certs, request_message, sign_message, spki_pin

from .store import AuthorityRef, StoredIdentity

MAX_CLOCK_SKEW_S = 60.0
TIMEOUT = httpx.Timeout(10.0, connect=5.0)


def _verified_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False  # see the module docstring: the pinned CA is the authority's own
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read the CA, which is then checked against the pin
    return ctx


def _transport_error(url: str, exc: httpx.HTTPError) -> Exception:
    text = str(exc) or exc.__class__.__name__
    if "CERTIFICATE_VERIFY_FAILED" in text or isinstance(exc.__context__, ssl.SSLCertVerificationError):
        return TrustError(
            f"the server at {url} presented a certificate not issued by the pinned authority CA",
            "the token's pin does not match this server: check the URL, "
            "or create a token on the right authority",
        )
    return UnreachableError(
        f"cannot reach the authority at {url}: {text}",
        "check the URL (from the token), that `meshagent authority serve` runs there, and that "
        "this host can reach that address and port",
    )


def _refusal(response: httpx.Response) -> RejectedError:
    try:
        doc = response.json()
        return RejectedError(str(doc["message"]), str(doc.get("hint", "")), code=str(doc["code"]))
    except (ValueError, KeyError, TypeError):
        return RejectedError(
            f"the authority answered HTTP {response.status_code} without an error body",
            "check that the URL points at a meshagent authority",
            code="bad_response",
        )


def check_clock(server_time: float, sent: float, received: float) -> float:
    """Skew (server minus local, seconds); raises if it is more than MAX_CLOCK_SKEW_S."""
    skew = server_time - (sent + received) / 2
    if abs(skew) > MAX_CLOCK_SKEW_S:
        direction = "behind" if skew > 0 else "ahead of"
        raise ClockSkewError(
            f"this host's clock is {abs(skew):.0f}s {direction} the authority's "
            f"(more than the {MAX_CLOCK_SKEW_S:.0f}s allowed)",
            "certificates would look not-yet-valid or expired: sync the clock "
            "(timedatectl set-ntp true, or chronyc makestep) and retry",
        )
    return skew


class AuthorityClient:
    def __init__(self, ref: AuthorityRef) -> None:
        self.ref = ref
        self._http = httpx.Client(base_url=ref.url, verify=_verified_context(ref.ca_pem), timeout=TIMEOUT)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AuthorityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def discover(cls, url: str, pin: str) -> AuthorityClient:
        """Fetch the authority's CA, check it against `pin`, return a client that trusts only it."""
        try:
            with httpx.Client(verify=_unverified_context(), timeout=TIMEOUT) as insecure:
                sent = time.time()
                response = insecure.get(f"{url}/v1/authority")
                received = time.time()
        except httpx.HTTPError as exc:
            raise _transport_error(url, exc) from None
        if response.status_code != 200:
            raise _refusal(response)
        try:
            info = response.json()
            ca: x509.Certificate = load_certs(info["api_ca"].encode())[0]
        except Exception:
            raise TrustError(
                f"{url} did not answer like a meshagent authority", "check the URL in the token"
            ) from None
        if spki_pin(ca) != pin:
            raise TrustError(
                f"the authority at {url} has CA pin {spki_pin(ca)}, the token expects {pin}",
                "the token belongs to another authority, or something intercepts this connection: "
                "create a new token on the authority you mean to join",
            )
        # A skewed clock makes every certificate look not-yet-valid or expired: say so first,
        # rather than as a confusing verification failure.
        with contextlib.suppress(KeyError, TypeError, ValueError):
            check_clock(float(info["server_time"]), sent, received)
        client = cls(AuthorityRef(url, pin, info["api_ca"], str(info["trust_domain"]), str(info["mesh"])))
        # Prove the server holds the pinned CA's certificate (the CA itself is public), and
        # check the clocks agree before anything is signed.
        client.check_clock()
        return client

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_error(self.ref.url, exc) from None
        if response.status_code != 200:
            raise _refusal(response)
        doc = response.json()
        assert isinstance(doc, dict)
        return doc

    def check_clock(self) -> float:
        sent = time.time()
        info = self._call("GET", "/v1/authority")
        return check_clock(float(info["server_time"]), sent, time.time())

    def enroll(
        self, token_secret: str, csr_pem: bytes, host_name: str, addresses: list[str]
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "/v1/enroll",
            {
                "token_secret": token_secret,
                "csr": csr_pem.decode(),
                "host_name": host_name,
                "addresses": addresses,
            },
        )

    def host_config(self, identity: StoredIdentity) -> dict[str, Any]:
        """The catalog and this host's policy, authenticated by a signature of the current key."""
        path = "/v1/host/config"
        ts = int(time.time())
        sig = sign_message(identity.key, request_message("GET", path, ts))
        chain = base64.b64encode(identity.chain_pem).decode()
        auth = f"Meshagent-PoP chain={chain},ts={ts},sig={sig}"
        return self._call("GET", path, headers={"Authorization": auth})

    def renew(self, chain_pem: bytes, csr_pem: bytes, timestamp: int, signature: str) -> dict[str, Any]:
        return self._call(
            "POST",
            "/v1/renew",
            {
                "certificate_chain": chain_pem.decode(),
                "csr": csr_pem.decode(),
                "timestamp": timestamp,
                "signature": signature,
            },
        )
