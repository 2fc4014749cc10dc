"""What the authority does, free of HTTP: enroll a host, renew its certificate, mint tokens.

`api.py` turns requests into calls here and `RejectedError`s into JSON errors; the CLI calls
the same functions for the operator's local commands.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from agent.errors import RejectedError
from agent.identity.names import WorkloadIdentity
from agent.identity.pki import certs_to_pem, load_certs, spki_pin, utcnow, verify_possession
from agent.logs import get_logger

from .ca import AuthorityMaterial, TrustBundleFile, load_authority
from .signing import issue_leaf, parse_csr, public_key_der
from .storage import HostRecord, Issued, NewHost, Registry, SqliteRegistry
from .tokens import JoinToken, hash_secret, new_token

log = get_logger("meshagent.authority")

# A renewal's timestamp must be this fresh: bounds how long a captured request stays usable.
POSSESSION_WINDOW = timedelta(minutes=5)


@dataclass(frozen=True)
class EnrollResult:
    host: HostRecord
    chain_pem: bytes
    trust_bundle_pem: bytes
    identity: WorkloadIdentity


def open_registry(directory: Path) -> SqliteRegistry:
    return SqliteRegistry(directory / "registry.db")


class Authority:
    def __init__(
        self,
        material: AuthorityMaterial,
        registry: Registry,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.material = material
        self.registry = registry
        self.clock = clock
        self.trust_bundle = TrustBundleFile(material.trust_bundle_file, material.trust_bundle)

    @classmethod
    def open(cls, directory: Path) -> Authority:
        return cls(load_authority(directory), open_registry(directory))

    @property
    def ca_pin(self) -> str:
        return spki_pin(self.material.api_ca_cert)

    def identity(self, short: str) -> WorkloadIdentity:
        s = self.material.settings
        return WorkloadIdentity.parse_short(short, s.trust_domain, s.mesh)

    # --- tokens (operator side, local) ---------------------------------------------------

    def create_tokens(self, identity: str, url: str, ttl: timedelta, count: int = 1) -> list[JoinToken]:
        workload = self.identity(identity)  # validates before anything is stored
        now = self.clock()
        tokens = []
        for _ in range(count):
            token = new_token(url, self.ca_pin)
            self.registry.add_token(token.hash, workload.short, now, now + ttl)
            tokens.append(token)
        log.info(
            "token.created",
            identity=workload.short,
            count=count,
            expires_in_s=int(ttl.total_seconds()),
        )
        return tokens

    # --- host requests -------------------------------------------------------------------

    def _issue(self, workload: WorkloadIdentity, csr: x509.CertificateSigningRequest) -> Issued:
        leaf = issue_leaf(self.material, workload, csr, self.clock())
        return Issued(
            serial=format(leaf.serial_number, "x"),
            not_after=leaf.not_valid_after_utc,
            cert_pem=certs_to_pem([leaf, *self.material.chain_tail]).decode(),
        )

    def enroll(self, token_secret: str, csr_pem: str, host_name: str, addresses: list[str]) -> EnrollResult:
        csr = parse_csr(csr_pem)
        key_fp = hashlib.sha256(public_key_der(csr)).hexdigest()

        def sign(identity: str) -> Issued:
            return self._issue(self.identity(identity), csr)

        host = self.registry.enroll(
            hash_secret(token_secret),
            key_fp,
            NewHost(host_name, tuple(addresses)),
            self.clock(),
            sign,
        )
        log.info(
            "host.enrolled",
            host_id=host.id,
            identity=host.identity,
            host_name=host_name,
            serial=host.serial,
        )
        return EnrollResult(
            host, host.cert_pem.encode(), self.trust_bundle.pem(), self.identity(host.identity)
        )

    def renew(self, chain_pem: str, csr_pem: str, timestamp: int, signature: str) -> EnrollResult:
        now = self.clock()
        try:
            current = load_certs(chain_pem.encode())[0]
        except Exception:
            raise RejectedError(
                "the presented certificate is not readable PEM", code="invalid_certificate"
            ) from None
        try:
            current.verify_directly_issued_by(self.material.issuer_cert)
        except Exception:
            raise RejectedError(
                "the presented certificate was not issued by this authority",
                "enroll again with a join token from this authority",
                code="foreign_certificate",
            ) from None
        if current.not_valid_after_utc <= now:
            raise RejectedError(
                "the presented certificate has expired; renewal needs a valid one",
                "enroll again with a new join token",
                code="certificate_expired",
            )
        if abs(now.timestamp() - timestamp) > POSSESSION_WINDOW.total_seconds():
            raise RejectedError(
                "the renewal request's timestamp is too far from the authority's clock",
                "check this host's clock (timedatectl) and retry",
                code="clock_skew",
            )
        csr = parse_csr(csr_pem)
        if not verify_possession(current, csr_pem.encode(), timestamp, signature):
            raise RejectedError(
                "proof of possession failed: the request is not signed by the certificate's key",
                code="possession_failed",
            )
        serial = format(current.serial_number, "x")
        host = self.registry.find_by_serial(serial)
        if host is None:
            raise RejectedError(
                "no enrolled host holds this certificate",
                code="host_unknown",
                hint="enroll again with a new join token",
            )
        if host.revoked:
            raise RejectedError(
                "this host has been revoked",
                code="host_revoked",
                hint="enroll again with a new join token if it should be back",
            )
        workload = self.identity(host.identity)
        updated = self.registry.renew(host.id, serial, now, self._issue(workload, csr))
        log.info("host.renewed", host_id=host.id, serial=updated.serial)
        return EnrollResult(updated, updated.cert_pem.encode(), self.trust_bundle.pem(), workload)
