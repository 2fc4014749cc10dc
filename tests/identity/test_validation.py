"""Names and what a host claims at enrollment: whole-string matches, tables of good and bad inputs."""

from __future__ import annotations

import pytest

from agent.identity.names import (
    InvalidName,
    WorkloadIdentity,
    validate_host_address,
    validate_host_addresses,
    validate_host_name,
    validate_mesh,
    validate_trust_domain,
)

# A trailing newline is what `$` let through (issue #15); the rest are their neighbours.
SMUGGLED = {
    "trailing-newline": "\n",
    "trailing-cr": "\r",
    "trailing-crlf": "\r\n",
    "trailing-nul": "\x00",
    "trailing-space": " ",
    "trailing-esc": "\x1b[31m",
}


@pytest.mark.parametrize("suffix", SMUGGLED.values(), ids=SMUGGLED.keys())
@pytest.mark.parametrize("where", ["namespace", "name"])
def test_identities_refuse_a_smuggled_suffix(suffix: str, where: str) -> None:
    short = "shop" + suffix + "/billing" if where == "namespace" else "shop/billing" + suffix
    with pytest.raises(InvalidName):
        WorkloadIdentity.parse_short(short, "cluster.local")


@pytest.mark.parametrize("suffix", SMUGGLED.values(), ids=SMUGGLED.keys())
def test_trust_domain_and_mesh_refuse_a_smuggled_suffix(suffix: str) -> None:
    with pytest.raises(InvalidName):
        validate_trust_domain("cluster.local" + suffix)
    with pytest.raises(InvalidName):
        validate_mesh("linkerd" + suffix)
    with pytest.raises(InvalidName):
        WorkloadIdentity.from_spiffe_id("spiffe://cluster.local/ns/shop/sa/billing" + suffix)


@pytest.mark.parametrize(
    "value",
    ["cluster.local", "example.org", "a", "td-1.corp.example", "x" * 63 + ".y"],
    ids=["cluster-local", "org", "one-char", "dashes", "long-label"],
)
def test_good_trust_domains(value: str) -> None:
    assert validate_trust_domain(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Cluster.local",
        "cluster..local",
        ".cluster",
        "cluster.",
        "-a.b",
        "a_b",
        "x" * 64,
        "a." * 127 + "a",
    ],
    ids=[
        "empty",
        "upper",
        "empty-label",
        "leading-dot",
        "trailing-dot",
        "leading-dash",
        "underscore",
        "label-64",
        "over-253",
    ],
)
def test_bad_trust_domains(value: str) -> None:
    with pytest.raises(InvalidName):
        validate_trust_domain(value)


@pytest.mark.parametrize(
    "value",
    ["legacy-1", "DB01", "ip-10-0-0-1.ec2.internal", "1host", "a", "a" * 63, ".".join(["a" * 63] * 4)[:253]],
    ids=["simple", "upper", "fqdn", "leading-digit", "one-char", "label-63", "len-253"],
)
def test_good_host_names(value: str) -> None:
    assert validate_host_name(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "legacy-1\n",
        "legacy\r1",
        "evil\x1b[31mred",
        "nul\x00",
        "two words",
        "under_score",
        "-lead",
        "trail-",
        "a..b",
        "fqdn.",
        "a" * 64,
        "a." * 127 + "ab",
        "caf\u00e9",
        "ten\u2028sion",
    ],
    ids=[
        "empty",
        "newline",
        "cr",
        "esc",
        "nul",
        "space",
        "underscore",
        "leading-dash",
        "trailing-dash",
        "empty-label",
        "trailing-dot",
        "label-64",
        "over-253",
        "non-ascii",
        "line-separator",
    ],
)
def test_bad_host_names(value: str) -> None:
    with pytest.raises(InvalidName) as err:
        validate_host_name(value)
    assert err.value.hint


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("198.18.0.10", "198.18.0.10"),
        ("10.1.2.3", "10.1.2.3"),
        ("100.64.0.1", "100.64.0.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("fd00::5", "fd00::5"),
    ],
    ids=["benchmark-net", "rfc1918", "cgnat", "ipv6-canonical", "ipv6-ula"],
)
def test_good_host_addresses(value: str, canonical: str) -> None:
    assert validate_host_address(value) == canonical


@pytest.mark.parametrize(
    "value",
    [
        "not-an-ip",
        "",
        "10.0.0.0/8",
        "10.0.0.1/32",
        "10.0.0.1:22",
        "10.0.0.1\n",
        " 10.0.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "2001:db8::1%eth0",
        "240.0.0.1",
        "::ffff:10.0.0.1",
        "010.000.000.001",
    ],
    ids=[
        "word",
        "empty",
        "network",
        "prefix",
        "port",
        "newline",
        "space",
        "unspecified-v4",
        "unspecified-v6",
        "multicast-v4",
        "multicast-v6",
        "broadcast",
        "loopback-v4",
        "loopback-v6",
        "metadata-link-local",
        "link-local-v6",
        "zone",
        "reserved",
        "v4-mapped",
        "leading-zeros",
    ],
)
def test_bad_host_addresses(value: str) -> None:
    with pytest.raises(InvalidName) as err:
        validate_host_address(value)
    assert err.value.hint


def test_addresses_deduplicated_in_order_and_bounded() -> None:
    assert validate_host_addresses(["10.0.0.2", "10.0.0.1", "10.0.0.2"]) == ("10.0.0.2", "10.0.0.1")
    with pytest.raises(InvalidName):
        validate_host_addresses([f"10.0.{i // 250}.{i % 250 + 1}" for i in range(65)])


@pytest.mark.parametrize(
    "value", [167772165, None, b"10.0.0.5", ["10.0.0.5"]], ids=["int", "none", "bytes", "list"]
)
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidName):
        validate_host_address(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        validate_host_name(value)  # type: ignore[arg-type]
