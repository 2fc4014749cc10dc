"""The fleet simulator's Gunzip (bench/fleet_directory.py) against the authority's real gzip
bodies: a body that shares its leading pieces with the last one inflated in full is inflated
from the shared boundary on, byte for byte what a whole inflate gives; a damaged body is
refused, never half-trusted."""

from __future__ import annotations

import gzip
import zlib
from datetime import timedelta
from pathlib import Path

import pytest

from agent.authority.service import Authority
from agent.identity.pki import generate_key, make_csr
from bench.fleet_directory import Gunzip
from tests.support import init_authority


def _bodies(tmp_path: Path, hosts: int = 40) -> list[bytes]:
    init_authority(tmp_path / "authority")
    authority = Authority.open(tmp_path / "authority")
    secrets = [
        t.secret
        for t in authority.create_tokens("fleet/sim", "https://127.0.0.1:1", timedelta(hours=1), hosts)
    ]
    csr = make_csr(generate_key()).decode()
    for i, secret in enumerate(secrets):
        authority.enroll(secret, csr, f"sim-{i}", [f"198.18.0.{i + 1}"])
    bodies = []
    for record in authority.registry.list_hosts():
        rendered = authority.render_host_config(record, True)
        assert rendered.gzip is not None
        bodies.append(rendered.gzip)
    return bodies


def test_bodies_sharing_the_catalog_are_inflated_from_the_shared_boundary(tmp_path: Path) -> None:
    bodies = _bodies(tmp_path)
    assert len(set(bodies)) == len(bodies)  # each host's own members differ
    g = Gunzip()
    for body in bodies:
        assert g.decode(body) == gzip.decompress(body)
    assert g.reused == len(bodies) - 1  # all but the first, inflated whole


def test_a_damaged_body_is_refused(tmp_path: Path) -> None:
    bodies = _bodies(tmp_path, hosts=3)
    g = Gunzip()
    g.decode(bodies[0])
    damaged = bytearray(bodies[1])
    damaged[-12] ^= 0xFF  # in the host's own piece, after the shared catalog
    with pytest.raises((zlib.error, gzip.BadGzipFile, EOFError)):
        g.decode(bytes(damaged))
    assert g.decode(bodies[2]) == gzip.decompress(bodies[2])
