"""What the authority does, free of HTTP: enroll a host, renew its certificate, mint tokens.

`api.py` turns requests into calls here and `RejectedError`s into JSON errors; the CLI calls
the same functions for the operator's local commands.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import re
import secrets
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from agent.errors import RejectedError
from agent.identity import delta as wire
from agent.identity.certinfo import utcnow
from agent.identity.names import (
    SPIFFE_SCHEME,
    InvalidName,
    WorkloadIdentity,
    spiffe_pattern,
    validate_host_address,
    validate_host_addresses,
    validate_host_name,
)
from agent.identity.pki import (
    certs_to_pem,
    load_certs,
    possession_message,
    spki_pin,
    verify_possession,
)
from agent.logs import Throttled, get_logger
from agent.proxy.policy import DefaultPolicy

from . import events, health, kube_routes, registry
from .ca import AuthorityMaterial, TrustBundleFile, load_authority
from .delta import DeltaStore, SharedDelta
from .host_meta import HostMeta
from .kube_routes import RouteObject
from .signing import issue_leaf, parse_csr, public_key_der
from .storage import (
    HostRecord,
    Issued,
    NewHost,
    PolicyRecord,
    Registration,
    Registry,
    RenewalRequest,
    ReportChange,
    StaticEntry,
)
from .tokens import JoinToken, hash_secret, new_token

log = get_logger("meshagent.authority")

# A renewal's timestamp must be this fresh: bounds how long the authority must remember a
# request it answered (renewal requests are single-use, see storage.SqliteRegistry.renew).
POSSESSION_WINDOW = timedelta(minutes=5)
# A join token is a bootstrap secret: a month covers staged rollouts; longer is a standing key.
MAX_TOKEN_TTL = timedelta(days=30)
# An allow-list entry: spiffe:// then printable ASCII without spaces (globs' * ? [ ] included).
_ALLOW_PATTERN = re.compile(r"spiffe://[!-~]{1,2000}")


@dataclass(frozen=True)
class RenderedConfig:
    """A host's directory as served: the JSON body (joined from `pieces` when read: a gzip
    answer never needs it) and its ETag (quoted, as HTTP writes it); `gzip`: the same body
    gzip-encoded, when the render was asked for it. `version`: the shared parts' version
    (agent.identity.delta); `delta_base`: set when the body is the delta from that version
    to this document (agent.identity.delta), not the document."""

    pieces: tuple[bytes, ...]
    etag: str
    gzip: bytes | None = None
    version: str = ""
    delta_base: str | None = None

    @functools.cached_property
    def body(self) -> bytes:
        return b"".join(self.pieces)


# Deflate level of the directory's gzip encoding: the shared parts are compressed once per
# registry version (12.7 ms for 10,000 hosts' catalog at 6), the host's own few bytes per render.
GZIP_LEVEL = 6
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, no mtime, OS unknown
_DEFLATE_END = b"\x03\x00"  # an empty final block: closes a stream of sync-flushed pieces


def _deflated(data: bytes, level: int = GZIP_LEVEL) -> bytes:
    """`data` as raw deflate blocks that end byte-aligned and not final, referring to nothing
    before them: such pieces concatenate into one stream (closed by _DEFLATE_END), so a piece
    shared by every host's body is compressed once."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def _gzip_of(pieces: Sequence[bytes], deflated: dict[int, bytes]) -> bytes:
    """The gzip member of the join of `pieces`: pieces whose id() is in `deflated` are taken
    from there, the runs of others compressed now."""
    out = [_GZIP_HEADER]
    run: list[bytes] = []
    crc = size = 0
    for piece in pieces:
        crc, size = zlib.crc32(piece, crc), size + len(piece)
        cached = deflated.get(id(piece))
        if cached is None:
            run.append(piece)
            continue
        if run:
            out.append(_deflated(b"".join(run), 1))
            run = []
        out.append(cached)
    if run:
        out.append(_deflated(b"".join(run), 1))
    out += [
        _DEFLATE_END,
        crc.to_bytes(4, "little"),
        (size & 0xFFFFFFFF).to_bytes(4, "little"),
    ]
    return b"".join(out)


@dataclass
class _Shared:
    """The host-independent parts of the directory at one `key` (Authority.version()), as
    canonical JSON: a render joins bytes instead of listing the registry.
    `until`: when the revoked list would drop an expired certificate (a render without a write)."""

    key: tuple[int, int, bytes]
    until: datetime | None
    catalog: bytes
    revoked: bytes
    trust_bundle: bytes
    catalog_hash: Any  # sha256 fed with the document up to the catalog (its first key) included
    policies: dict[str, bytes]  # identity -> its policy's canonical JSON
    deflated: dict[int, bytes]  # id(part bytes) -> _deflated(part), filled on the first gzip ask
    # The compiled `routes` member (#21) and its canonical JSON; None: compiling failed as a
    # whole (a bug), the key is left out and hosts keep the routes they hold.
    routes: list[dict[str, Any]] | None = None
    routes_json: bytes | None = None
    # (services json, discovery json) -> the version of the shared parts with them (a hash of
    # megabytes: once per version, not per render)
    versions: dict[tuple[bytes | None, bytes | None], str] = dataclasses.field(default_factory=dict)


# The one serialization ETags are computed over (sorted keys, no spaces, ASCII): the agent's
# (agent.identity.delta), which checks a delta's result against the ETag with it.
canonical_json = wire.canonical_json


def _object_of(parts: dict[str, bytes]) -> list[bytes]:
    """The canonical JSON of an object, as pieces, from its members' canonical JSON: what
    canonical_json would write for the whole, without serializing the parts again."""
    pieces = [b"{"]
    for i, key in enumerate(sorted(parts)):
        pieces += [b"," if i else b"", canonical_json(key), b":", parts[key]]
    pieces.append(b"}")
    return pieces


@dataclass(frozen=True)
class EnrollResult:
    host: HostRecord
    chain_pem: bytes
    trust_bundle_pem: bytes
    identity: WorkloadIdentity
    api_token: str  # the host's bearer token for catalog and policy reads; a new one each time


def open_registry(directory: Path, database: str | None = None) -> Registry:
    """The registry the authority directory names (registry.open_registry: --database, env,
    recorded URL, SQLite)."""
    return registry.open_registry(directory, database)


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
        self._skipped: set[tuple[str, str]] = set()  # stored records left out of the catalog, logged
        # Route objects that no longer compile: every new version compiles them again, the log
        # says so once per object and reason per ROUTE_LOG_EVERY_S.
        self._route_failures = Throttled(log, "routes.compile_failed", ROUTE_LOG_EVERY_S)
        # In-cluster Services from the controller's discovery (kube_discovery), in memory:
        # rebuilt from the watches after a restart. Serialized once per change, not per host.
        self._discovery_lock = threading.Lock()  # (set by the controller, read by requests)
        self._discovered: list[dict[str, Any]] = []
        self._discovered_json = canonical_json([])
        self._discovered_deflated: tuple[bytes, bytes] | None = None  # (services json, deflated)
        self._discovery_generation = 0
        # Whether the controller reaches the Kubernetes API (None: no controller, key left out).
        # Only transitions are recorded: the ETag changes when the state does, not every second.
        self._discovery_state: dict[str, Any] | None = None
        self._discovered_at: float | None = None  # when the served Services last changed
        # False in controller mode until discovery's first result: the `services` key is left
        # out meanwhile, so a restarted authority never tells hosts "no Services" (they keep theirs).
        self._services_known = True
        self._listeners: list[Callable[[], None]] = []
        # The directory's shared parts for the last version: one thread builds, the others wait
        # for it rather than list the registry eight times over (api.py renders in a pool).
        self._shared_lock = threading.Lock()
        self._shared: _Shared | None = None
        # The last few versions' shared parts and the deltas between them (long polls that ask).
        self.deltas = DeltaStore()
        registry.on_report_change(self._report_changed)

    @classmethod
    def open(cls, directory: Path, database: str | None = None) -> Authority:
        return cls(load_authority(directory), open_registry(directory, database))

    @property
    def ca_pin(self) -> str:
        return spki_pin(self.material.api_ca_cert)

    def identity(self, short: str) -> WorkloadIdentity:
        s = self.material.settings
        return WorkloadIdentity.parse_short(short, s.trust_domain, s.mesh)

    def workload(self, value: str) -> WorkloadIdentity:
        """An identity the operator names in any form: NAMESPACE/NAME, its SPIFFE ID or its mesh
        DNS name; the last two must be of this authority's trust domain (and mesh)."""
        s = self.material.settings
        if "/" in value and not value.startswith(SPIFFE_SCHEME):
            return self.identity(value)
        try:
            workload = WorkloadIdentity.parse_any(value, s.mesh)
        except InvalidName as exc:
            raise InvalidName(
                exc.message,
                "give NAMESPACE/NAME (shop/orders), a SPIFFE ID "
                f"(spiffe://{s.trust_domain}/ns/shop/sa/orders) or a mesh identity name "
                f"(orders.shop.serviceaccount.identity.{s.mesh}.{s.trust_domain})",
            ) from None
        if (workload.trust_domain, workload.mesh) != (s.trust_domain, s.mesh):
            raise InvalidName(
                f"identity {value[:300]!r} is not of this authority's trust domain {s.trust_domain!r}"
                f" (mesh {s.mesh!r})",
                f"name it as shop/orders, spiffe://{s.trust_domain}/ns/shop/sa/orders or "
                f"orders.shop.serviceaccount.identity.{s.mesh}.{s.trust_domain}",
            )
        return workload

    # --- tokens (operator side, local) ---------------------------------------------------

    def create_tokens(
        self,
        identity: str,
        url: str,
        ttl: timedelta,
        count: int = 1,
        registration: Registration | None = None,
        meta: HostMeta | None = None,
    ) -> list[JoinToken]:
        """`registration`: labels and ports the enrolled host's Kubernetes objects get
        (validated by the caller with kube_export.check_registration); `meta`: what the host
        carries in the service catalog (host_meta.parse_meta), copied to it at enrollment."""
        workload = self.identity(identity)  # validates before anything is stored
        registration = registration or Registration()
        if not timedelta(0) < ttl <= MAX_TOKEN_TTL:
            raise RejectedError(
                f"token lifetime {ttl} is out of range",
                f"give a lifetime above 0 and at most {MAX_TOKEN_TTL.days} days, e.g. --ttl 1h",
                code="invalid_request",
            )
        now = self.clock()
        tokens = []
        for _ in range(count):
            token = new_token(url, self.ca_pin)
            self.registry.add_token(token.hash, workload.short, now, now + ttl, registration, meta)
            tokens.append(token)
        log.info(
            "token.created",
            identity=workload.short,
            count=count,
            labels=",".join(f"{k}={v}" for k, v in registration.labels),
            ports=",".join(f"{n}={p}/{proto}" for n, p, proto in registration.ports),
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
        # What the host claims is checked here, for the API and any other caller alike: one bad
        # address in the catalog used to stop updates on every host (issue #15).
        try:
            host_name = validate_host_name(host_name)
            claimed = validate_host_addresses(addresses)
        except InvalidName as exc:
            raise RejectedError(exc.message, exc.hint, code="invalid_request") from None
        csr = parse_csr(csr_pem)
        key_fp = hashlib.sha256(public_key_der(csr)).hexdigest()

        def sign(identity: str) -> Issued:
            return self._issue(self.identity(identity), csr)

        api_token = secrets.token_urlsafe(32)  # stored as its hash in the enrollment's transaction
        host = self.registry.enroll(
            hash_secret(token_secret),
            key_fp,
            NewHost(host_name, claimed),
            self.clock(),
            sign,
            api_token_hash=hash_secret(api_token),
        )
        log.info(
            "host.enrolled",
            host_id=host.id,
            identity=host.identity,
            host_name=host_name,
            serial=host.serial,
        )
        return EnrollResult(
            host,
            host.cert_pem.encode(),
            self.trust_bundle.pem(),
            self.identity(host.identity),
            api_token,
        )

    def _current_certificate(self, chain_pem: str, timestamp: int, now: datetime) -> x509.Certificate:
        """The host's presented certificate, if this authority issued it, it is valid and fresh."""
        try:
            current = load_certs(chain_pem.encode())[0]
        except Exception:  # any parse failure is the same refusal
            raise RejectedError(
                "the presented certificate is not readable PEM", code="invalid_certificate"
            ) from None
        try:
            current.verify_directly_issued_by(self.material.issuer_cert)
        except Exception:  # InvalidSignature, ValueError, TypeError
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
        # Integers: a huge timestamp must be refused, not overflow a float.
        if abs(int(now.timestamp()) - timestamp) > int(POSSESSION_WINDOW.total_seconds()):
            raise RejectedError(
                "the request's timestamp is too far from the authority's clock",
                "check this host's clock (timedatectl) and retry",
                code="clock_skew",
            )
        return current

    def _host_of(self, cert: x509.Certificate) -> HostRecord:
        host = self.registry.find_by_serial(format(cert.serial_number, "x"))
        if host is None:
            raise RejectedError(
                "no enrolled host holds this certificate",
                code="host_unknown",
                hint="enroll again with a new join token",
            )
        return _active(host)

    def renew(self, chain_pem: str, csr_pem: str, timestamp: int, signature: str) -> EnrollResult:
        now = self.clock()
        current = self._current_certificate(chain_pem, timestamp, now)
        csr = parse_csr(csr_pem)
        if not verify_possession(current, csr_pem.encode(), timestamp, signature):
            raise RejectedError(
                "proof of possession failed: the request is not signed by the certificate's key",
                code="possession_failed",
            )
        host = self._host_of(current)
        workload = self.identity(host.identity)
        serial = format(current.serial_number, "x")
        # The proof names the signed content, not the signature: ECDSA signatures are malleable
        # (s -> n-s), so a replayer could alter one and still verify.
        proof = hashlib.sha256(
            serial.encode() + b"\n" + possession_message(csr_pem.encode(), timestamp)
        ).hexdigest()
        request = RenewalRequest(
            presented_serial=serial,
            key_fingerprint=hashlib.sha256(public_key_der(csr)).hexdigest(),
            proof=proof,
            proof_expires_at=datetime.fromtimestamp(timestamp, UTC) + POSSESSION_WINDOW,
        )
        signed: list[Issued] = []

        def sign() -> Issued:
            signed.append(self._issue(workload, csr))
            return signed[-1]

        api_token = secrets.token_urlsafe(32)  # stored as its hash in the renewal's transaction
        updated = self.registry.renew(host.id, request, now, sign, api_token_hash=hash_secret(api_token))
        # No signing: the host's previous answer was lost and it got the same certificate again.
        log.info("host.renewed", host_id=host.id, serial=updated.serial, lost_answer_retry=not signed)
        return EnrollResult(updated, updated.cert_pem.encode(), self.trust_bundle.pem(), workload, api_token)

    def authenticate(self, bearer: str) -> HostRecord:
        """The enrolled, unrevoked host holding this bearer token."""
        host = self.registry.find_by_api_token(hash_secret(bearer)) if bearer else None
        if host is None:
            raise RejectedError(
                "the host token is not valid (superseded by a renewal, or never issued)",
                "renew (meshagent renew) or enroll again",
                code="unauthenticated",
            )
        return _active(host)

    # --- catalog and policy --------------------------------------------------------------

    def add_static_entry(
        self, cidr: str, ports: tuple[int, ...], identity: str, opaque_port: int | None = None
    ) -> StaticEntry:
        """`opaque_port`: the destination's linkerd2-proxy expects Linkerd's transport header
        there; hosts dial it with ALPN transport.l5d.io/v1 and name the original port."""
        try:
            network = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise RejectedError(f"{cidr!r} is not an address or network", code="invalid_request") from None
        if any(not 0 < p < 65536 for p in ports):
            raise RejectedError("ports must be 1..65535", code="invalid_request")
        if opaque_port is not None and not _is_port(opaque_port):
            raise RejectedError(
                f"opaque port {opaque_port} is not a port number (1-65535)",
                "the in-cluster proxy's inbound port: 4143 unless the pods' linkerd-proxy listens elsewhere",
                code="invalid_request",
            )
        return self.registry.add_static_entry(
            str(network), ports, self.workload(identity).short, self.clock(), opaque_port
        )

    def set_policy(
        self, identity: str, port: int, default: str, allow: tuple[str, ...], actor: str = "unknown"
    ) -> PolicyRecord:
        record = self._policy_record(identity, port, default, allow)
        self.registry.set_policy(record, actor)
        return record

    def set_policies(
        self, records: Sequence[PolicyRecord], actor: str = events.ACTOR_CONTROLLER
    ) -> list[PolicyRecord]:
        """Check every record, then store them in one transaction: a refusal or a failure
        leaves the registry as it was. Adds and replaces; never removes. `actor`: who is logged
        as changing the hosts' policy (the controller unless the caller says otherwise)."""
        checked = [self._policy_record(r.identity, r.port, r.default_policy, r.allow) for r in records]
        self.registry.set_policies(checked, actor)
        log.info("policy.applied", records=len(checked), identities=len({r.identity for r in checked}))
        return checked

    def _policy_record(self, identity: str, port: int, default: str, allow: Sequence[str]) -> PolicyRecord:
        """The record as stored: a known default, SPIFFE-form allow patterns, a valid identity."""
        if not (port == 0 or _is_port(port)):
            raise RejectedError(f"port {port!r} is not 0 (default) or 1-65535", code="invalid_request")
        try:
            DefaultPolicy(default)
        except ValueError:
            choices = ", ".join(p.value for p in DefaultPolicy)
            raise RejectedError(
                f"policy {default!r} is not one of {choices}", code="invalid_request"
            ) from None
        try:
            # Stored and served in the SPIFFE form, whichever form the operator wrote.
            patterns = tuple(spiffe_pattern(p) for p in allow)
        except InvalidName as exc:
            raise RejectedError(exc.message, exc.hint, code="invalid_request") from None
        for pattern in patterns:
            # A SPIFFE ID or glob, one token: the hosts match it against peers' IDs and log it.
            if not _ALLOW_PATTERN.fullmatch(pattern):
                raise RejectedError(
                    f"allow entry {pattern[:80]!r} is not a SPIFFE ID or glob",
                    "for example: --allow 'spiffe://cluster.local/ns/shop/*' "
                    "or --allow '*.shop.serviceaccount.identity.linkerd.cluster.local'",
                    code="invalid_request",
                )
        return PolicyRecord(self.identity(identity).short, port, default, patterns)

    def _skip(self, source: str, what: str, reason: str) -> None:
        """Leave a stored record out of what hosts get, saying so once per process."""
        if (source, what) not in self._skipped:
            self._skipped.add((source, what))
            log.warning("catalog.record_skipped", source=source, value=what, reason=reason)

    def _served_workload(self, source: str, short: str) -> WorkloadIdentity | None:
        try:
            return self.identity(short)
        except InvalidName as exc:
            self._skip(source, short, exc.message)
            return None

    def _served_addresses(self, host: HostRecord) -> list[str]:
        """The host's stored addresses that are valid now (rows from before validation may not be)."""
        served = []
        for address in host.addresses:
            try:
                served.append(validate_host_address(address))
            except InvalidName as exc:
                self._skip(f"host:{host.id}", address, exc.message)
        return served

    def catalog(self, hosts: Sequence[HostRecord] | None = None) -> list[dict[str, Any]]:
        """Every meshed destination: unrevoked hosts' addresses (all ports) and static entries.
        A stored record that is invalid is left out (and logged once): one bad row must never
        make the catalog unusable for the whole fleet. `hosts`: list_hosts(), if already read."""
        catalog: list[dict[str, Any]] = []
        # A host may not claim a Service's cluster IP: host entries win over discovered Services
        # on the hosts, so that claim would take every host's connections to the Service.
        cluster_ips = {ip for service in self.discovered() for ip in service.get("cluster_ips") or ()}
        for other in self.registry.list_hosts() if hosts is None else hosts:
            if other.revoked:
                continue
            workload = self._served_workload(f"host:{other.id}", other.identity)
            if workload is None:
                continue
            for address in self._served_addresses(other):
                if address in cluster_ips:
                    self._skip(f"host:{other.id}", address, "the address is a Service's cluster IP")
                    continue
                prefix = 32 if ":" not in address else 128
                catalog.append(
                    {
                        "cidr": f"{address}/{prefix}",
                        "ports": [],
                        "identity": workload.spiffe_id,
                        "server_name": workload.dns_name,
                        "source": f"host:{other.id}",
                    }
                )
        for entry in self.registry.static_entries():
            workload = self._served_workload(f"static:{entry.id}", entry.identity)
            if workload is None:
                continue
            doc: dict[str, Any] = {
                "cidr": entry.cidr,
                "ports": list(entry.ports),
                "identity": workload.spiffe_id,
                "server_name": workload.dns_name,
                "source": f"static:{entry.id}",
            }
            if entry.opaque_port is not None:
                # A row written by hand with a bad port would fail the hosts' whole entry check.
                if not _is_port(entry.opaque_port):
                    self._skip(f"static:{entry.id}", str(entry.opaque_port), "opaque_port is not 1-65535")
                    continue
                doc["opaque_port"] = entry.opaque_port
            catalog.append(doc)
        return catalog

    def revoked(
        self, hosts: Sequence[HostRecord] | None = None, now: datetime | None = None
    ) -> list[dict[str, Any]]:
        """The hosts' `revoked` key (interfaces §2): each revoked host whose certificate has not
        expired yet (after that it cannot connect anyway, and the list stays short), with
        - `serials`: every certificate issued to it that has not expired (hex), refused
          wherever they show up;
        - `identity` (SPIFFE form) only when no unrevoked host holds that identity any more:
          hosts sharing a service account keep working when one of them is revoked;
        - `addresses`: its addresses no unrevoked host claims, so agents refuse new connections
          there (it left the catalog: they would otherwise pass through as unmeshed)."""
        hosts = self.registry.list_hosts() if hosts is None else hosts
        now = self.clock() if now is None else now
        listed = [h for h in hosts if h.revoked_at is not None and h.not_after > now]
        if not listed:  # (the usual case: one pass, no sets built, per host's render)
            return []
        held = {h.identity for h in hosts if not h.revoked}
        issued = self.registry.unexpired_serials([h.id for h in listed], now)
        # Stored addresses were validated (and so normalized) at enrollment: compared as stored.
        claimed = {a for h in hosts if not h.revoked for a in h.addresses}
        revoked = []
        for host in listed:
            assert host.revoked_at is not None
            previous = [host.previous_serial] if host.previous_serial else []
            doc: dict[str, Any] = {
                "host_id": host.id,
                # Every certificate it was issued that has not expired: a host that renewed
                # several times (a compromised one may) holds several valid ones.
                "serials": list(dict.fromkeys([host.serial, *previous, *issued[host.id]])),
                "revoked_at": host.revoked_at.isoformat(),
                "addresses": [a for a in self._served_addresses(host) if a not in claimed],
            }
            if host.identity not in held:
                workload = self._served_workload(f"host:{host.id}", host.identity)
                if workload is not None:
                    doc["identity"] = workload.spiffe_id
            revoked.append(doc)
        revoked.sort(key=lambda d: (d["revoked_at"], d["host_id"]))
        return revoked

    def prometheus_targets(self, metrics_port: int) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: every enrolled, unrevoked host's admin endpoint.
        Besides its own labels, a host gets the two Linkerd's dashboards select by: it shows as
        `pod` (its host name) of a `deployment` named after its service account."""
        groups = []
        for host in self.registry.list_hosts():
            if host.revoked:
                continue
            workload = self._served_workload(f"host:{host.id}", host.identity)
            addresses = self._served_addresses(host)
            if workload is None or not addresses:
                continue
            address = addresses[0]
            target = f"[{address}]:{metrics_port}" if ":" in address else f"{address}:{metrics_port}"
            groups.append(
                {
                    "targets": [target],
                    "labels": {
                        "namespace": workload.namespace,
                        "serviceaccount": workload.name,
                        "identity": workload.spiffe_id,
                        "host": host.host_name,
                        "host_id": host.id,
                        "deployment": workload.name,
                        "pod": host.host_name,
                    },
                }
            )
        return groups

    def host_config(self, host: HostRecord) -> dict[str, Any]:
        """What an enrolled host needs to route and authorize: the catalog, its own policy, the
        revoked peers and the in-cluster Services discovered (interfaces: /v1/host/config)."""
        doc = self._host_config_parts(host)
        routes = doc.pop("routes")
        if self._services_known:
            doc["services"] = self.discovered()
            if routes is not None:
                doc["routes"] = routes
        state = self.discovery_state()
        if state is not None:
            doc["discovery"] = state
        doc["generated_at"] = self.clock().timestamp()
        return doc

    def _policy(self, identity: str) -> dict[str, Any]:
        policy: dict[str, Any] = {"ports": {}}
        for record in self.registry.policies(identity):
            doc = {"default": record.default_policy, "allow": list(record.allow)}
            if record.port == 0:
                policy["default"] = doc
            else:
                policy["ports"][str(record.port)] = doc
        return policy

    def _host_config_parts(self, host: HostRecord) -> dict[str, Any]:
        hosts = self.registry.list_hosts()
        catalog = self.catalog(hosts)
        return {
            "host_id": host.id,
            "catalog": catalog,
            "policy": self._policy(host.identity),
            "revoked": self.revoked(hosts),
            "trust_bundle": self.trust_bundle.pem().decode(),
            "routes": self._compile_routes(catalog, hosts),
        }

    # --- traffic policy (#21) ----------------------------------------------------------------

    def routes_member(self) -> list[dict[str, Any]]:
        """The directory's `routes` member as served now (design §3.3): the stored route objects
        compiled against the registry's hosts and the discovered Services, cached with the
        shared parts (so every host, and every replica at the same state, gets the same bytes).
        [] also when the key is left out (no route object ever stored)."""
        return list(self._shared_parts(self.version()).routes or ())

    def _compile_routes(
        self, catalog: Sequence[dict[str, Any]], hosts: Sequence[HostRecord]
    ) -> list[dict[str, Any]] | None:
        """The `routes` member from the stored objects; an object that no longer compiles (its
        hosts revoked, a Service gone, a row edited by hand) is left out and logged. None (the
        key left out, hosts keep what they hold): no route object was ever stored, or compiling
        fails as a whole (a bug: better than telling hosts there are none)."""
        objects = self.registry.route_objects()
        if not objects:  # (no grouping of every host per version)
            # Never any: no key, so a document is byte for byte a pre-#21 replica's (a rolling
            # upgrade: agents alternating replicas would otherwise never see the same ETag).
            return None if self.registry.route_policy_since() is None else []
        discovered = self.discovered()

        def compiled(
            chosen: Sequence[RouteObject], skip: Callable[[RouteObject, str], None] = self._route_skipped
        ) -> list[dict[str, Any]]:
            known = kube_routes.known_refs(catalog, hosts, discovered, chosen)
            return kube_routes.compile_routes(chosen, known, skip)

        try:
            routes = compiled(objects)
        except Exception as exc:  # a bug some object meets: find which, serve the others
            log.error(
                "routes.compile_error", objects=len(objects), error=f"{type(exc).__name__}: {exc}"[:300]
            )
        else:
            self._note_unresolved(routes, discovered)
            return routes
        kept = []
        for obj in objects:
            try:
                compiled([obj], lambda o, r: None)  # (alone, its references may not resolve)
            except Exception as exc:
                self._route_skipped(obj, f"compiling it failed: {type(exc).__name__}: {exc}")
            else:
                kept.append(obj)
        try:
            return compiled(kept)
        except Exception:  # (objects failing only together: keep what the hosts hold)
            return None

    def _note_unresolved(
        self, routes: Sequence[dict[str, Any]], discovered: Sequence[dict[str, Any]]
    ) -> None:
        """Say once per process which Service parents and backends the hosts cannot resolve: they
        take a Service's addresses and endpoints from `services`, which only discovery fills
        (design §3.2's trap: file routes naming Services on an authority without --kubernetes)."""
        served = {(d.get("namespace"), d.get("name")) for d in discovered}
        for item in routes:
            refs = [("parent", item["parent"])]
            refs += [
                ("backend", backend["ref"])
                for route in item["routes"]
                for rule in route["rules"]
                for backend in rule["backends"]
            ]
            for role, ref in refs:
                if ref["kind"] != "Service" or (ref["namespace"], ref["name"]) in served:
                    continue
                what = f"Service {ref['namespace']}/{ref['name']}"
                if ("route-unresolved", what) in self._skipped:
                    continue
                self._skipped.add(("route-unresolved", what))
                log.warning(
                    f"routes.{role}_unresolved",
                    service=what,
                    sources=",".join(item["sources"]),
                    reason="not among the discovered Services"
                    if self._discovery_state is not None
                    else "this authority discovers no Services (serve --kubernetes)",
                )

    def _route_skipped(self, obj: RouteObject, reason: str) -> None:
        self._route_failures.warning(f"{obj.label}\0{reason}", object=obj.label, reason=reason[:300])

    def _shared_parts(self, key: tuple[int, int, bytes]) -> _Shared:
        """The shared parts at `key`, read before them: data newer than its key is harmless (the
        next key rebuilds), data older than it would be served until the next write."""
        with self._shared_lock:
            shared, now = self._shared, self.clock()
            if shared is not None and shared.key == key and (shared.until is None or now < shared.until):
                return shared
            hosts = self.registry.list_hosts()
            catalog_doc = self.catalog(hosts)
            catalog = canonical_json(catalog_doc)
            revoked = canonical_json(self.revoked(hosts, now))
            routes = self._compile_routes(catalog_doc, hosts)
            listed = [h.not_after for h in hosts if h.revoked_at is not None and h.not_after > now]
            trust_bundle = canonical_json(key[2].decode())
            catalog_hash = hashlib.sha256()
            for piece in _object_of({"catalog": catalog})[:-1]:
                catalog_hash.update(piece)
            self._shared = _Shared(
                key,
                min(listed, default=None),
                catalog,
                revoked,
                trust_bundle,
                catalog_hash,
                {},
                {},
                routes=routes,
                routes_json=None if routes is None else canonical_json(routes),
            )
            return self._shared

    def render_host_config(
        self, host: HostRecord, gzip: bool = False, delta_base: str | None = None
    ) -> RenderedConfig:
        """`host_config` as served, with its ETag, and with `gzip` its gzip encoding too; with
        `delta_base` (the version of the shared parts the host holds) the delta from it
        instead of the document, when this process still has that version (else the document).

        The parts every host shares (catalog, revoked peers, trust bundle: O(hosts) to build)
        are serialized once per Authority.version() and the host's policy once per version and
        identity; the Services once per discovery change. The ETag is the sha256 of the
        document's canonical JSON without `generated_at`; the catalog's share of it (the
        megabytes) is hashed once per version too."""
        with self._discovery_lock:
            generation = self._discovery_generation
            services = self._discovered_json if self._services_known else None
            state = self._discovery_doc()
        shared = self._shared_parts((self.registry.data_version(), generation, self.trust_bundle.pem()))
        with self._shared_lock:
            policy = shared.policies.get(host.identity)
        if policy is None:
            policy = canonical_json(self._policy(host.identity))
            with self._shared_lock:
                policy = shared.policies.setdefault(host.identity, policy)
        discovery = None if state is None else canonical_json(state)
        parts = {
            "host_id": canonical_json(host.id),
            "catalog": shared.catalog,
            "policy": policy,
            "revoked": shared.revoked,
            "trust_bundle": shared.trust_bundle,
        }
        if services is not None:
            parts["services"] = services
            # Routes name Services: while discovery has not answered yet (services left out)
            # they are left out too, and hosts keep the ones they hold.
            if shared.routes_json is not None:
                parts["routes"] = shared.routes_json
        if discovery is not None:
            parts["discovery"] = discovery
        # The catalog is the first key: the hash of the document up to it is taken once.
        tagged = _object_of(parts)
        assert tagged[4] is shared.catalog
        digest = shared.catalog_hash.copy()
        for piece in tagged[5:]:
            digest.update(piece)
        etag = f'"{digest.hexdigest()}"'
        version = self._version_of(shared, {k: v for k, v in parts.items() if k in wire.SHARED_MEMBERS})
        parts["generated_at"] = canonical_json(self.clock().timestamp())
        made = None if delta_base is None else self.deltas.delta(delta_base, version)
        if made is not None:
            host_parts = {k: parts[k] for k in wire.HOST_MEMBERS}
            pieces = _delta_pieces(made, host_parts)
            encoded = _gzip_of(pieces, self._deflated_delta(made)) if gzip else None
            return RenderedConfig(tuple(pieces), etag, encoded, version, made.base)
        pieces = _object_of(parts)
        encoded = None
        if gzip:
            encoded = _gzip_of(pieces, self._deflated_parts(shared, services))
        return RenderedConfig(tuple(pieces), etag, encoded, version)

    def _version_of(self, shared: _Shared, members: dict[str, bytes]) -> str:
        """The version of the shared `members` (wire.version_of), computed once and kept for
        deltas (self.deltas) the first time it is served."""
        key = (members.get("services"), members.get("discovery"))
        with self._shared_lock:
            version = shared.versions.get(key)
        if version is None:
            version = wire.version_of(members)
            self.deltas.remember(version, members)
            with self._shared_lock:
                shared.versions[key] = version
        return version

    def _deflated_delta(self, made: SharedDelta) -> dict[int, bytes]:
        """id() of a delta's large pieces -> their deflate pieces, compressed once per delta."""
        with self._shared_lock:
            if made.deflated is None:
                large = [made.splice, *made.sets.values()]
                made.deflated = {id(p): _deflated(p) for p in large if len(p) >= _DEFLATE_ONCE_BYTES}
            return dict(made.deflated)

    def _deflated_parts(self, shared: _Shared, services: bytes | None) -> dict[int, bytes]:
        """id() of each large shared part -> its deflate pieces, compressed once."""
        with self._shared_lock:
            if not shared.deflated:
                for part in (shared.catalog, shared.revoked, shared.trust_bundle, shared.routes_json):
                    if part is not None:
                        shared.deflated[id(part)] = _deflated(part)
            deflated = dict(shared.deflated)
            if services is not None:
                if self._discovered_deflated is None or self._discovered_deflated[0] is not services:
                    self._discovered_deflated = (services, _deflated(services))
                deflated[id(services)] = self._discovered_deflated[1]
        return deflated

    # --- discovery and change notification -------------------------------------------------

    def set_discovered(self, services: list[dict[str, Any]]) -> None:
        """Replace the discovered Services (kube_discovery.build_services(...).services) and
        wake the hosts' long polls. Callable from any thread."""
        encoded = canonical_json(services)  # (outside the lock: a megabyte for 5,000 endpoints)
        with self._discovery_lock:
            # The first result counts as a change even if empty: "discovered nothing" is news.
            changed = encoded != self._discovered_json or self._discovered_at is None
            changed = changed or not self._services_known
            self._services_known = True
            self._discovered = services
            self._discovered_json = encoded
            if changed:
                self._discovery_generation += 1
                self._discovered_at = self.clock().timestamp()
            listeners = list(self._listeners)
        if changed:
            log.info("discovery.updated", services=len(services), bytes=len(encoded))
            for listener in listeners:
                listener()

    def await_discovery(self) -> None:
        """Controller mode: serve no `services` key until the first `set_discovered` (hosts
        keep the Services they have, rather than be told there are none)."""
        with self._discovery_lock:
            self._services_known = False

    def set_discovery_state(self, reachable: bool, since: float | None) -> None:
        """Called by the controller when the Kubernetes API becomes reachable or unreachable
        (`since`: when it went away). Hosts see it as the directory's `discovery` key: while
        unreachable they are served the last known Services. Wakes the long polls on a change."""
        state = "ok" if reachable else "unreachable"
        with self._discovery_lock:
            old = self._discovery_state
            if old is not None and old["state"] == state and (reachable or old["since"] == since):
                return
            self._discovery_state = {
                "source": "kubernetes",
                "state": state,
                "since": None if reachable else since,
            }
            self._discovery_generation += 1
            listeners = list(self._listeners)
        log.info("discovery.state", state=state, since=since)
        for listener in listeners:
            listener()

    def discovery_state(self) -> dict[str, Any] | None:
        """The directory's `discovery` key: {source, state, since, updated_at}, or None without
        a controller."""
        with self._discovery_lock:
            return self._discovery_doc()

    def _discovery_doc(self) -> dict[str, Any] | None:
        if self._discovery_state is None:
            return None
        return {**self._discovery_state, "updated_at": self._discovered_at}

    def discovered(self) -> list[dict[str, Any]]:
        with self._discovery_lock:
            return self._discovered

    def on_discovery_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from the setter's thread) whenever set_discovered changes something."""
        with self._discovery_lock:
            self._listeners.append(listener)

    def version(self) -> tuple[int, int, bytes]:
        """Changes whenever a host's directory may have: the registry written by any process
        (SQLite data_version), discovery updated, or the trust bundle file edited (anchor
        rotation). Compare for inequality."""
        with self._discovery_lock:
            generation = self._discovery_generation
        return self.registry.data_version(), generation, self.trust_bundle.pem()

    # --- health reports --------------------------------------------------------------------

    def record_report(self, host: HostRecord, doc: Any) -> None:
        """Keep an agent's health report (checked by health.parse_report: invalid_request).

        Its state (health.report_state) goes with it: when the write-behind batch holding it is
        written, a state that differs from the host's stored one comes back to
        `_report_changed`, which logs the events. O(1) here; the batch reads the stored states
        of its own hosts only, locked, so across replicas each change is logged once."""
        report = health.parse_report(doc)
        self.registry.record_report(
            host.id, report.to_json(), self.clock(), state=health.report_state(report)
        )

    def _report_changed(self, changes: Sequence[ReportChange]) -> None:
        """Log what changed in these reports (agent version, restart, Ready, probes): rare, but a
        fleet-wide upgrade changes every host at once, so one transaction for the batch."""
        found: list[tuple[str, str, str, str, datetime]] = []
        for change in changes:
            at = datetime.fromtimestamp(change.received_at, UTC)
            report = health.load_report(change.report)
            for kind, detail in health.state_changes(change.old_state, change.new_state, report):
                found.append((change.host_id, kind, detail, events.ACTOR_REPORT, at))
        self.registry.record_events(found)
        for host_id, kind, detail, _, _ in found:
            log.info("host.changed", host_id=host_id, kind=kind, detail=detail[:200])

    # --- the service catalog's metadata and change log (#20) --------------------------------

    def set_host_meta(
        self, ref: str, meta: HostMeta | Callable[[HostMeta], HostMeta], actor: str
    ) -> HostRecord:
        """registry.set_host_meta at this authority's clock."""
        return self.registry.set_host_meta(ref, meta, actor, self.clock())


# A route object that no longer compiles is logged again at most this often (per reason).
ROUTE_LOG_EVERY_S = 300.0
# A delta's pieces at least this large are deflated once for every host's gzip answer.
_DEFLATE_ONCE_BYTES = 4096


def _delta_pieces(made: SharedDelta, host_parts: dict[str, bytes]) -> list[bytes]:
    """The delta's canonical JSON (agent.identity.delta) as pieces: the shared ones as made
    once, the host's own members (host_parts) set whole."""
    sets = _object_of({**made.sets, **host_parts})
    return [
        b'{"base":',
        canonical_json(made.base),
        b',"remove":',
        canonical_json(made.removed),
        b',"set":',
        *sets,
        b',"splice":',
        made.splice,
        b',"version":',
        canonical_json(made.version),
        b"}",
    ]


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _active(host: HostRecord) -> HostRecord:
    """`host`, unless it has been revoked."""
    if host.revoked:
        raise RejectedError(
            "this host has been revoked",
            code="host_revoked",
            hint="enroll again with a new join token if it should be back",
        )
    return host
