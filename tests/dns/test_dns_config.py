"""`[dns]` in the agent's config: off by default, each bad value refused with the key named, and
the rules the agent would install (rendered, not applied: the netns tests apply them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import DnsSettings, load_config
from agent.dns.service import DnsService
from agent.errors import ConfigError
from agent.intercept import dns_rules


def load(tmp_path: Path, body: str) -> DnsSettings:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return load_config(path, required=True).dns


def test_off_by_default(tmp_path: Path) -> None:
    dns = load(tmp_path, "")
    assert not dns.enabled and dns.cluster_domain == "cluster.local" and not dns.short_forms
    assert dns.stub_addresses == dns.upstreams == () and dns.port == 15053


def test_values_are_normalised(tmp_path: Path) -> None:
    dns = load(
        tmp_path,
        '[dns]\nenabled = true\ncluster_domain = "Corp.Example."\nstub_addresses = ["127.0.0.53", "::1"]\n',
    )
    assert dns.cluster_domain == "corp.example" and dns.stub_addresses == ("127.0.0.53", "::1")


@pytest.mark.parametrize(
    ("body", "message", "hint"),
    [
        (
            'cluster_domain = "bad_domain"',
            "dns.cluster_domain 'bad_domain' is not a DNS name",
            "cluster.local",
        ),
        ('stub_addresses = "127.0.0.53"', "dns.stub_addresses must be a list", '["127.0.0.53"]'),
        ('stub_addresses = ["127.0.0.53:53"]', "'127.0.0.53:53' is not an IP address", "no port"),
        ('upstreams = ["10.0.0.0/8"]', "dns.upstreams: '10.0.0.0/8' is not an IP address", "prefix"),
        ("port = 53", "dns.port must not be 53", "redirected"),
        ("port = 70000", "dns.port must be a port number", ""),
        ("ttl = -1", "dns.ttl must be between 0 and 86400", ""),
        ("max_inflight = 0", "dns.max_inflight must be between 1 and 4096", "file limit"),
        ("per_source_qps = 0", "dns.per_source_qps must be between 1", ""),
        ("short_form = true", "unknown key dns.short_form", "did you mean dns.short_forms?"),
    ],
)
def test_refusals_name_the_key(tmp_path: Path, body: str, message: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"[dns]\n{body}\n")
    assert message in err.value.message and hint in err.value.hint
    assert str(tmp_path / "agent.toml") in err.value.message  # which file said it


def test_no_mark_no_stub() -> None:
    with pytest.raises(ConfigError) as err:
        DnsService(DnsSettings(enabled=True), mark=0)
    assert "intercept.proxy_mark" in err.value.hint


def test_rules_redirect_only_port_53_to_the_stub_addresses() -> None:
    spec = dns_rules.DnsRedirect(("127.0.0.53", "fd00::53"), 15053, 0x1000000, uid=998)
    text = dns_rules.render(spec)
    assert text.startswith("add table inet meshagent_dns\ndelete table inet meshagent_dns\n")
    assert "priority -110;" in text and "meta mark & 0x1000000 == 0x1000000 return" in text
    assert "meta skuid 998 return" in text
    assert text.count("redirect to :15053") == 2 and "th dport @live4" in text
    assert dns_rules.beat(spec) == (
        "flush set inet meshagent_dns live4\n"
        "add element inet meshagent_dns live4 { 127.0.0.53 . 53 timeout 3s }\n"
        "flush set inet meshagent_dns live6\n"
        "add element inet meshagent_dns live6 { fd00::53 . 53 timeout 3s }\n"
    )
    assert text.endswith(dns_rules.beat(spec))  # installed live: the redirect works at once
    root = dns_rules.DnsRedirect(("127.0.0.53",), 15053, 0x1000000, uid=None)
    assert "skuid" not in dns_rules.render(root)  # skipping root would skip every root process
    assert "add element inet meshagent_dns live6" not in dns_rules.beat(root)
