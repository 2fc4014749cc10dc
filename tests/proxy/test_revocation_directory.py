"""Revocation in the host document: what the authority lists under `revoked`, and how the
agent's directory parses it into a RevokedSet (interfaces §2 of issue #18)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr, sign_possession
from agent.proxy.directory import merge
from agent.proxy.policy import InboundPolicy
from agent.proxy.revocation import RevokedSet, cert_serial, normal_serial, parse_revoked
from tests.support import init_authority

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/shop/sa/web"
DB = f"spiffe://{TD}/ns/shop/sa/db"


def _enroll(authority: Authority, identity: str, name: str, address: str) -> Any:
    token = authority.create_tokens(identity, "https://127.0.0.1:1", timedelta(minutes=5))[0]
    return authority.enroll(token.secret, make_csr(generate_key()).decode(), name, [address]).host


def test_the_authority_lists_a_revoked_host_by_serial_until_its_identity_is_held_by_none(
    tmp_path: Path,
) -> None:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    web1 = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    web2 = _enroll(authority, "shop/web", "web-2", "198.18.0.2")
    db = _enroll(authority, "shop/db", "db-1", "198.18.0.3")
    before = authority.render_host_config(db)
    assert authority.host_config(db)["revoked"] == []

    authority.registry.revoke(web1.id, authority.clock())
    after = authority.render_host_config(db)
    assert after.etag != before.etag  # the hosts' long polls answer
    (entry,) = authority.host_config(db)["revoked"]
    # web-2 still holds shop/web: only web-1's certificate and address are revoked.
    assert entry["serials"] == [web1.serial]
    assert entry["addresses"] == ["198.18.0.1"]
    assert "identity" not in entry
    assert entry["host_id"] == web1.id and entry["revoked_at"]
    assert all(e["source"] != f"host:{web1.id}" for e in authority.catalog())

    authority.registry.revoke(web2.id, authority.clock())
    entries = authority.host_config(db)["revoked"]
    assert [e["host_id"] for e in entries] == [web1.id, web2.id]
    assert all(e["identity"] == WEB for e in entries)  # nobody holds shop/web any more

    # Once its certificate has expired, a revoked host cannot connect anyway: no longer listed.
    now = authority.clock()
    authority.clock = lambda: now + timedelta(days=400)
    assert authority.host_config(db)["revoked"] == []


def test_a_revoked_address_another_host_enrolled_with_is_not_listed(tmp_path: Path) -> None:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    old = _enroll(authority, "shop/web", "web-old", "198.18.0.1")
    authority.registry.revoke(old.id, authority.clock())
    new = _enroll(authority, "shop/db", "db-new", "198.18.0.1")  # reuses the address
    (entry,) = authority.host_config(new)["revoked"]
    assert entry["addresses"] == []
    assert entry["identity"] == WEB


def test_the_directory_parses_revoked_entries_one_by_one() -> None:
    doc = {
        "revoked": [
            {"identity": WEB, "serials": ["0A1B"], "addresses": ["198.18.0.1"], "revoked_at": "x"},
            {"serials": ["ff"], "addresses": ["2001:db8:0::1"]},
            {"identity": "db.shop.serviceaccount.identity.linkerd.cluster.local", "serials": []},
            {"identity": "not an identity", "serials": ["1"]},
            {"serials": ["xyz"]},
            {"addresses": ["198.18.0.9"]},
            "junk",
        ]
    }
    directory = merge([], InboundPolicy(), doc)
    revoked = directory.revoked
    assert revoked.identities == {WEB, DB}  # the DNS form mapped to the SPIFFE ID
    assert revoked.serials == {"a1b", "ff"}
    assert revoked.addresses == {"198.18.0.1", "2001:db8::1"}
    assert [r.where for r in directory.rejected] == ["revoked[3]", "revoked[4]", "revoked[5]", "revoked[6]"]


def test_no_revoked_key_or_a_bad_one_revokes_nothing() -> None:
    assert merge([], InboundPolicy(), {}).revoked == RevokedSet.empty()
    assert not merge([], InboundPolicy(), None).revoked
    bad = merge([], InboundPolicy(), {"revoked": {"identity": WEB}})
    assert not bad.revoked
    assert [r.where for r in bad.rejected] == ["revoked"]


def test_matching_by_identity_or_serial() -> None:
    rejected: list[str] = []
    revoked = parse_revoked(
        [{"identity": WEB, "serials": []}, {"serials": ["00ABC"]}], lambda w, *_: rejected.append(w)
    )
    assert not rejected
    assert revoked.match(WEB, "1") == "identity"
    assert revoked.match(DB, normal_serial("ABC")) == "serial"
    assert revoked.match(DB, "abd") is None
    assert revoked.match(None, None) is None


def test_a_peer_certificate_serial_is_compared_in_one_form() -> None:
    assert cert_serial({"serialNumber": "00FF10"}) == "ff10"
    assert cert_serial({"serialNumber": "nothex"}) is None
    assert cert_serial(None) is None
    assert normal_serial("FF10") == format(0xFF10, "x")


def test_a_revoked_host_that_renewed_is_listed_with_both_certificates(tmp_path: Path) -> None:
    """Its certificate before the renewal is still valid: the serial-only entry names it too."""
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    web1 = _enroll(authority, "shop/web", "web-1", "198.18.0.1")  # holds shop/web: serials only
    token = authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    enrolled = authority.enroll(token.secret, make_csr(key).decode(), "web-2", ["198.18.0.2"])
    csr = make_csr(generate_key())
    now = int(time.time())
    renewed = authority.renew(enrolled.chain_pem.decode(), csr.decode(), now, sign_possession(key, csr, now))
    assert renewed.host.serial != enrolled.host.serial
    authority.registry.revoke(enrolled.host.id, authority.clock())
    (entry,) = authority.host_config(web1)["revoked"]
    assert entry["serials"] == [renewed.host.serial, enrolled.host.serial]
    assert "identity" not in entry


def test_a_revoked_host_that_renewed_many_times_is_listed_with_every_valid_certificate(
    tmp_path: Path,
) -> None:
    """A compromised host may renew three times in a minute before it is revoked: four valid
    certificates, every one listed (not only the current and the previous)."""
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    other = _enroll(authority, "shop/web", "web-1", "198.18.0.1")
    token = authority.create_tokens("shop/web", "https://127.0.0.1:1", timedelta(minutes=5))[0]
    key = generate_key()
    issued = authority.enroll(token.secret, make_csr(key).decode(), "web-2", ["198.18.0.2"])
    serials = [issued.host.serial]
    chain = issued.chain_pem.decode()
    for step in range(3):
        new_key = generate_key()
        csr = make_csr(new_key)
        now = int(time.time()) + step  # each request is single-use: its own timestamp
        issued = authority.renew(chain, csr.decode(), now, sign_possession(key, csr, now))
        key, chain = new_key, issued.chain_pem.decode()
        serials.append(issued.host.serial)
    assert len(set(serials)) == 4
    authority.registry.revoke(issued.host.id, authority.clock())
    (entry,) = authority.host_config(other)["revoked"]
    assert sorted(entry["serials"]) == sorted(serials)
    # Once they have all expired, nothing is listed.
    now_dt = authority.clock()
    authority.clock = lambda: now_dt + timedelta(days=400)
    assert authority.host_config(other)["revoked"] == []
