"""Property tests of the agent's config loader (agent/config.py `load_config`): any file, TOML
or not, UTF-8 or not, with any keys and values of any type, gives an AgentConfig or a
ConfigError (code config_invalid, exit 3) that says what is wrong, never another exception; and
so do the environment overrides (MESHAGENT_<SECTION>_<KEY>)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import AgentConfig, _sections, env_name, load_config
from agent.errors import ConfigError, ExitCode

SECTIONS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _sections().items()}
WORK = Path(tempfile.mkdtemp(prefix="meshagent-fuzz-config-"))


def toml_value(value: Any) -> str:
    """A TOML rendering of `value` (json's string escapes are TOML's too, but for \\/)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(
            value, "nan" if value != value else repr(value)
        )
    if isinstance(value, int | date | time | datetime):
        return value.isoformat() if not isinstance(value, int) else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


WORDS = [
    "8000-8100", "9-1", "22", "10.0.0.0/8", "fd00::/8", "::1", "1.2.3.4/33", "spiffe://td/ns/a/sa/b",
    "spiffe://*", "redirect", "tproxy", "nft", "iptables", "keep-rules", "remove-rules", "deny",
    "all-unauthenticated", "root", "0.0.0.0:4191", "[::]:4191", "host:99999", "/var/lib/x", "\x00",
]  # fmt: skip
# Values a careless operator or an attacker with write access to a drop-in might put there: the
# right types and the wrong ones, ports and CIDRs and ids at and past their limits.
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, 65535, 65536, -1, 2**32 - 1, 2**32, 2**63 - 1, -(2**63)]),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(WORDS),
    st.dates(),
    st.times(),
    st.datetimes(),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["cidr", "identity", "ports", "default", "allow", "x"]) | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
keys = st.sampled_from(sorted({k for ks in SECTIONS.values() for k in ks})) | st.text(max_size=8)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    lines = []
    for section in draw(
        st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=8), max_size=4, unique=True)
    ):
        lines.append(f"[{json.dumps(section)}]")
        own = st.sampled_from(SECTIONS.get(section, ["x"]))
        for key in draw(st.lists(own | keys, max_size=6, unique=True)):
            lines.append(f"{json.dumps(key)} = {toml_value(draw(values))}")
        if section == "inbound" and draw(st.booleans()):  # [inbound.ports.N] tables
            lines.append(f"[inbound.ports.{json.dumps(str(draw(st.integers(-5, 70000))))}]")
            lines.append(f"default = {toml_value(draw(values))}")
        if section == "outbound" and draw(st.booleans()):
            lines.append("[[outbound.catalog]]")
            for key in draw(
                st.lists(st.sampled_from(["cidr", "identity", "ports", "x"]), max_size=3, unique=True)
            ):
                lines.append(f"{key} = {toml_value(draw(values))}")
    text = "\n".join(lines).encode()
    if draw(st.integers(0, 9)) == 0:  # now and then: not TOML, not UTF-8, cut short
        text = text[: draw(st.integers(0, len(text)))] + draw(st.binary(max_size=20))
    return text


def load(data: bytes, environ: dict[str, str]) -> AgentConfig | ConfigError:
    path = WORK / "meshagent.toml"
    path.write_bytes(data)
    try:
        return load_config(path, required=True, environ=environ)
    except ConfigError as exc:
        assert exc.code == "config_invalid" and exc.exit_code == ExitCode.CONFIG
        assert exc.message
        return exc


@given(documents() | st.binary(max_size=300))
def test_any_file_is_a_config_or_a_config_error(data: bytes) -> None:
    result = load(data, {})
    if isinstance(result, AgentConfig):
        assert result.source is not None


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env = {}
    for section, fields in draw(st.lists(st.sampled_from(sorted(SECTIONS.items())), max_size=3)):
        key = draw(st.sampled_from(fields))
        env[env_name(section, key)] = draw(st.builds(toml_value, values) | st.text(max_size=20))
    return env


@given(environments())
def test_any_environment_override_is_a_config_or_a_config_error(environ: dict[str, str]) -> None:
    load(b"", environ)


# Found by this suite (fixed in 62b9747): a list setting given a scalar escaped as TypeError.
@pytest.mark.parametrize(
    ("data", "environ"),
    [
        (b"[inbound]\nports = false\n", {}),
        (b"[outbound]\ncatalog = 3\n", {}),
        (b"[proxy]\nskip_detect_ports = 1.5\n", {}),
        (b"", {"MESHAGENT_INBOUND_PORTS": "false"}),
    ],
)
def test_a_scalar_for_a_list_setting_is_a_config_error(data: bytes, environ: dict[str, str]) -> None:
    assert isinstance(load(data, environ), ConfigError)
