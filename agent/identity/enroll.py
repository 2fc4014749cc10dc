"""The two ways a host gets a certificate: enroll with a join token, renew with the current key."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent.errors import MeshagentError, StateError
from agent.identity.certinfo import utcnow
from agent.identity.names import MAX_HOST_ADDRESSES, InvalidName, validate_host_address
from agent.identity.pki import load_certs, make_csr, same_public_key, sign_possession
from agent.logs import get_logger

from .client import UNAVAILABLE_RETRY_S, AuthorityClient, AuthorityUnavailable
from .store import IdentityStore, StoredIdentity
from .transport import ProxyConfig, proxy_from_environment

log = get_logger("meshagent.identity")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def host_addresses() -> list[str]:
    """This host's addresses that the authority accepts (unicast, not loopback or link-local:
    see names.validate_host_address)."""
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                found.append(validate_host_address(addr.address))
            except InvalidName:
                continue
    return sorted(set(found))[:MAX_HOST_ADDRESSES]


def _store_issued(store: IdentityStore, key: Any, doc: dict[str, Any]) -> StoredIdentity:
    try:
        chain = load_certs(str(doc["certificate_chain"]).encode())
        bundle = load_certs(str(doc["trust_bundle"]).encode())
    except (KeyError, MeshagentError) as exc:
        raise StateError(f"the authority's answer lacks a readable certificate: {exc}") from None
    if not same_public_key(chain[0], key):
        raise StateError(
            "the authority returned a certificate for another key",
            "report this: the authority is misbehaving",
        )
    identity = store.save(key, chain, bundle)
    if isinstance(doc.get("api_token"), str):
        store.save_api_token(doc["api_token"])
    store.drop_pending_key()
    return identity


def enroll(
    token_text: str,
    store: IdentityStore,
    host_name: str | None = None,
    addresses: list[str] | None = None,
    progress: Progress = _quiet,
    proxy: ProxyConfig | None = None,
) -> StoredIdentity:
    """`proxy`: how to reach the authority (default: the environment's, proxy_from_environment)."""
    from agent.authority.tokens import parse_token  # token format is shared with the authority

    from . import transport_httpx  # httpx: this short-lived process only, never the daemon

    token = parse_token(token_text)
    proxy = proxy_from_environment() if proxy is None else proxy
    if proxy.for_url(token.authority_url):
        progress(f"reaching the authority {proxy.describe()}")
    progress(f"verifying the authority at {token.authority_url} against the token's pin")
    with AuthorityClient.discover(
        token.authority_url, token.ca_pin, proxy, transport_httpx.request
    ) as client:
        store.save_authority(client.ref)
        key = store.pending_key()  # made here, kept across retries, never sent
        progress("key made on this host (ECDSA P-256); sending the signing request")
        doc = client.enroll(
            token.secret,
            make_csr(key),
            host_name or socket.gethostname(),
            host_addresses() if addresses is None else addresses,
        )
    identity = _store_issued(store, key, doc)
    store.record_renewal(utcnow(), True, "enrolled")
    log.info(
        "identity.enrolled",
        spiffe_id=identity.workload.spiffe_id,
        serial=identity.summary.serial,
        not_after=identity.summary.not_after.isoformat(),
    )
    return identity


def renew(store: IdentityStore, proxy: ProxyConfig | None = None) -> StoredIdentity:
    """Get a new certificate for a new key, proving possession of the current one. `proxy`: how
    to reach the authority (default: the environment's, which is how the daemon passes its own)."""
    from . import transport_httpx  # httpx: this short-lived process only, never the daemon

    proxy = proxy_from_environment() if proxy is None else proxy
    current = store.load()
    ref = store.load_authority()
    new_key = store.pending_key()
    csr = make_csr(new_key)
    give_up = time.monotonic() + UNAVAILABLE_RETRY_S
    try:
        with AuthorityClient(ref, proxy, transport_httpx.request) as client:
            while True:
                # Signed afresh for each attempt: if the authority committed a renewal and then
                # answered 503, the same pending key with a new proof gets that certificate back.
                ts = int(time.time())
                try:
                    doc = client.renew(current.chain_pem, csr, ts, sign_possession(current.key, csr, ts))
                    break
                except AuthorityUnavailable as exc:
                    if time.monotonic() + 2.0 > give_up:
                        raise
                    log.warning("authority.unavailable", path="/v1/renew", code=exc.code, retry_in_s=2.0)
                    time.sleep(2.0)
        identity = _store_issued(store, new_key, doc)
    except MeshagentError as exc:
        store.record_renewal(utcnow(), False, f"{exc.code}: {exc.message}")
        raise
    store.record_renewal(utcnow(), True, "renewed")
    log.info(
        "identity.renewed",
        spiffe_id=identity.workload.spiffe_id,
        serial=identity.summary.serial,
        not_after=identity.summary.not_after.isoformat(),
        bundle_roots=len(identity.bundle),
    )
    return identity
