"""What the daemon needs to know of a certificate, without loading `cryptography`.

The running agent reads its own certificate's names and validity many times and signs nothing
(renewal runs as a short-lived `meshagent renew` process). Reading them through the standard
library's `ssl` keeps `cryptography` (~13 MB of RSS) out of the long-lived process.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CertSummary:
    """What `status` and the registry show of a leaf certificate."""

    serial: str
    not_before: datetime
    not_after: datetime
    spiffe_ids: tuple[str, ...]
    dns_names: tuple[str, ...]
    issuer: str


def _when(text: str) -> datetime:
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(text), UTC)


def read_leaf(path: Path) -> CertSummary:
    """The first certificate in a PEM file, decoded by OpenSSL through the `ssl` module.

    `_test_decode_cert` is CPython's own certificate decoder (the `getpeercert()` format); it has
    been stable since Python 2.7 and is what the `ssl` test suite relies on.
    """
    doc = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    san = doc.get("subjectAltName", ())
    issuer = ",".join(
        f"{'CN' if k == 'commonName' else k}={v}" for rdn in doc.get("issuer", ()) for k, v in rdn
    )
    return CertSummary(
        serial=str(doc["serialNumber"]).lower().lstrip("0") or "0",
        not_before=_when(doc["notBefore"]),
        not_after=_when(doc["notAfter"]),
        spiffe_ids=tuple(v for k, v in san if k == "URI"),
        dns_names=tuple(v for k, v in san if k == "DNS"),
        issuer=issuer,
    )
