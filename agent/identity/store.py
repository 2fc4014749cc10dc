"""The host's identity on disk: key, certificate chain and trust bundle, swapped atomically.

    <state_dir>/                   0700
      authority.json               the authority's URL, CA pin and PEM (from the join token)
      identity -> gen-<serial>     a symlink, replaced by rename(2): readers see old or new
      gen-<serial>/key.pem         0600, made on this host, never sent anywhere
      gen-<serial>/cert.pem        leaf first, then the issuer
      gen-<serial>/bundle.pem      the trust anchor(s)
      pending-key.pem              0600, the key of an enrollment in flight (kept for retries)
      renewal.json                 the last renewal attempt and its outcome

The key, certificate and bundle of one generation are written into a fresh directory that only
becomes visible through the symlink swap, so a crash at any point leaves either the previous
complete identity or the new complete one (Kubernetes swaps its secret volumes the same way).
The stable paths for other tools are `<state_dir>/identity/{key,cert,bundle}.pem`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import NotEnrolledError, StateError
from agent.fsutil import ensure_private_dir, fsync_dir, write_atomic
from agent.identity.certinfo import CertSummary, read_leaf
from agent.identity.names import WorkloadIdentity

if TYPE_CHECKING:  # `cryptography` is imported where keys are made or read, not by the daemon
    from cryptography import x509

    from agent.identity.pki import PrivateKey

DEFAULT_STATE_DIR = Path("/var/lib/meshagent")


@dataclass(frozen=True)
class AuthorityRef:
    url: str
    ca_pin: str
    ca_pem: str
    trust_domain: str
    mesh: str


@dataclass(frozen=True)
class StoredIdentity:
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]
    workload: WorkloadIdentity
    directory: Path  # the generation directory the files live in

    def __repr__(self) -> str:  # key material never reaches a log
        return f"StoredIdentity(workload={self.workload}, serial={self.summary.serial}, key=...)"

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def summary(self) -> CertSummary:
        from agent.identity.pki import summarize

        return summarize(self.leaf)

    @property
    def chain_pem(self) -> bytes:
        from agent.identity.pki import certs_to_pem

        return certs_to_pem(self.chain)


@dataclass(frozen=True)
class IdentityInfo:
    """The current identity's names and validity, read without `cryptography` (the daemon's view;
    TLS contexts load the files themselves)."""

    workload: WorkloadIdentity
    summary: CertSummary
    directory: Path


class IdentityStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    # Stable paths (through the symlink) for status, TLS contexts and other tools.
    @property
    def current(self) -> Path:
        return self.state_dir / "identity"

    @property
    def key_file(self) -> Path:
        return self.current / "key.pem"

    @property
    def cert_file(self) -> Path:
        return self.current / "cert.pem"

    @property
    def bundle_file(self) -> Path:
        return self.current / "bundle.pem"

    def _ensure_dir(self) -> None:
        try:
            ensure_private_dir(self.state_dir)
        except OSError as exc:
            raise StateError(
                f"cannot create state directory {self.state_dir}: {exc.strerror}",
                "run as root or as the meshagent user, or pass --state-dir",
            ) from None

    def _hand_over(self) -> None:
        """Root enrolling for the agent's own user: give the files to the state directory's owner
        (systemd's StateDirectory= makes it the meshagent user), so the service can read its key."""
        if os.geteuid() != 0:
            return
        st = self.state_dir.stat()
        if st.st_uid == 0:
            return
        for root, dirs, files in os.walk(self.state_dir):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), st.st_uid, st.st_gid)

    # --- the authority this host belongs to ----------------------------------------------

    def save_authority(self, ref: AuthorityRef) -> None:
        self._ensure_dir()
        write_atomic(self.state_dir / "authority.json", json.dumps(ref.__dict__, indent=2).encode(), 0o644)
        self._hand_over()

    def load_authority(self) -> AuthorityRef:
        path = self.state_dir / "authority.json"
        try:
            return AuthorityRef(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise NotEnrolledError(
                f"this host is not enrolled (no {path})",
                "enroll with: meshagent enroll <TOKEN>",
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"{path} is unreadable: {exc}", "enroll again with a new token") from None

    # --- the host token (bearer for catalog and policy reads), rotated with each certificate ---

    def save_api_token(self, token: str) -> None:
        write_atomic(self.state_dir / "api-token", token.encode(), 0o600)
        self._hand_over()

    def api_token(self) -> str:
        try:
            return (self.state_dir / "api-token").read_text().strip()
        except FileNotFoundError:
            raise NotEnrolledError(
                f"no host token in {self.state_dir}", "renew once (meshagent renew) to get one"
            ) from None

    # --- the pending key of an enrollment or renewal in flight ---------------------------

    def pending_key(self) -> PrivateKey:
        """The key for the next certificate: reused if a previous attempt was interrupted."""
        from agent.identity.pki import PkiError, generate_key, key_from_pem, key_to_pem

        self._ensure_dir()
        path = self.state_dir / "pending-key.pem"
        with contextlib.suppress(FileNotFoundError, PkiError):
            return key_from_pem(path.read_bytes())
        key = generate_key()
        write_atomic(path, key_to_pem(key), 0o600)
        self._hand_over()
        return key

    def drop_pending_key(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "pending-key.pem").unlink()

    # --- the identity itself -------------------------------------------------------------

    def save(
        self, key: PrivateKey, chain: list[x509.Certificate], bundle: list[x509.Certificate]
    ) -> StoredIdentity:
        """Write a new generation and make it current in one rename."""
        from agent.identity.pki import certs_to_pem, key_to_pem, same_public_key, summarize

        if not chain or not same_public_key(chain[0], key):
            raise StateError("refusing to store a certificate that does not match its key")
        workload = _workload_of(summarize(chain[0]))
        self._ensure_dir()
        serial = format(chain[0].serial_number, "x")
        tmp = Path(tempfile.mkdtemp(dir=self.state_dir, prefix=".gen-"))
        try:
            os.chmod(tmp, 0o700)
            write_atomic(tmp / "key.pem", key_to_pem(key), 0o600)
            write_atomic(tmp / "cert.pem", certs_to_pem(chain), 0o644)
            write_atomic(tmp / "bundle.pem", certs_to_pem(bundle), 0o644)
            gen = self.state_dir / f"gen-{serial}"
            if gen.exists():
                shutil.rmtree(gen)
            os.rename(tmp, gen)
            link_tmp = self.state_dir / ".identity.tmp"
            with contextlib.suppress(FileNotFoundError):
                link_tmp.unlink()
            os.symlink(gen.name, link_tmp)
            os.replace(link_tmp, self.current)
            fsync_dir(self.state_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._drop_old_generations(keep=gen.name)
        self._hand_over()
        return StoredIdentity(key, tuple(chain), tuple(bundle), workload, gen)

    def _drop_old_generations(self, keep: str) -> None:
        for entry in self.state_dir.iterdir():
            if (entry.name.startswith("gen-") or entry.name.startswith(".gen-")) and entry.name != keep:
                shutil.rmtree(entry, ignore_errors=True)

    def exists(self) -> bool:
        return self.current.exists()

    def load_info(self) -> IdentityInfo:
        """Names and validity of the current identity, without reading the key."""
        gen = self._current_generation()
        try:
            summary = read_leaf(gen / "cert.pem")
        except PermissionError as exc:
            raise StateError(
                f"cannot read {exc.filename}: permission denied", "run as root or as the meshagent user"
            ) from None
        except (OSError, ValueError, KeyError) as exc:
            raise StateError(
                f"the certificate in {gen} is unreadable: {exc}", "enroll again with a new token"
            ) from None
        return IdentityInfo(_workload_of(summary), summary, gen)

    def _current_generation(self) -> Path:
        if not self.current.exists():
            raise NotEnrolledError(
                f"no identity in {self.state_dir}",
                "enroll with: meshagent enroll <TOKEN> (or pass the right --state-dir)",
            )
        return self.current.resolve()

    def load(self) -> StoredIdentity:
        from agent.identity.pki import PkiError, key_from_pem, load_certs, same_public_key, summarize

        if not self.current.exists():
            raise NotEnrolledError(
                f"no identity in {self.state_dir}",
                "enroll with: meshagent enroll <TOKEN> (or pass the right --state-dir)",
            )
        gen = self.current.resolve()
        try:
            key = key_from_pem((gen / "key.pem").read_bytes())
            chain = load_certs((gen / "cert.pem").read_bytes())
            bundle = load_certs((gen / "bundle.pem").read_bytes())
        except PermissionError as exc:
            raise StateError(
                f"cannot read {exc.filename}: permission denied",
                "run as root or as the meshagent user",
            ) from None
        except (OSError, PkiError) as exc:
            raise StateError(
                f"the identity in {gen} is unreadable: {exc}", "enroll again with a new token"
            ) from None
        if not same_public_key(chain[0], key):
            raise StateError(
                f"the key and certificate in {gen} do not match", "enroll again with a new token"
            )
        return StoredIdentity(key, tuple(chain), tuple(bundle), _workload_of(summarize(chain[0])), gen)

    # --- renewal outcome, for status -----------------------------------------------------

    def record_renewal(self, when: datetime, ok: bool, detail: str) -> None:
        doc = self.renewal_record()
        doc.update(
            {
                "last_attempt": when.isoformat(),
                "last_result": "ok" if ok else "failed",
                "last_detail": detail,
            }
        )
        if ok:
            doc["last_success"] = when.isoformat()
        write_atomic(self.state_dir / "renewal.json", json.dumps(doc, indent=2).encode(), 0o644)
        self._hand_over()

    def renewal_record(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.state_dir / "renewal.json").read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def remove_all(self) -> None:
        """Delete every file meshagent keeps here (uninstall)."""
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _workload_of(s: CertSummary) -> WorkloadIdentity:
    if not s.spiffe_ids:
        raise StateError("the certificate has no SPIFFE ID (URI SAN)")
    mesh = "linkerd"
    for dns in s.dns_names:
        parts = dns.split(".")
        if len(parts) > 5 and parts[2:4] == ["serviceaccount", "identity"]:
            mesh = parts[4]
    return WorkloadIdentity.from_spiffe_id(s.spiffe_ids[0], mesh)
