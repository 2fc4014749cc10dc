from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "absent.toml")
    assert cfg.identity.state_dir == Path("/var/lib/meshagent")
    assert cfg.source is None


def test_values_are_read(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[identity]\nstate_dir = "/srv/ma"\n[log]\nformat = "json"\n')
    cfg = load_config(f)
    assert cfg.identity.state_dir == Path("/srv/ma")
    assert cfg.log.format == "json"
    assert cfg.source == f


@pytest.mark.parametrize(
    ("text", "needle", "hint"),
    [
        ('[identity]\nstate_dri = "/x"\n', "identity.state_dri", "identity.state_dir"),
        ('[identiti]\nstate_dir = "/x"\n', "[identiti]", "[identity]"),
        ("[identity]\nstate_dir = 3\n", "identity.state_dir", ""),
        ('[log]\nlevel = "loud"\n', "log.level", ""),
        ("[identity\n", "not valid TOML", ""),
    ],
    ids=["typo-key", "typo-section", "wrong-type", "bad-choice", "bad-toml"],
)
def test_errors_name_file_key_and_fix(tmp_path: Path, text: str, needle: str, hint: str) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in err.value.message
    assert needle in err.value.message
    assert hint in err.value.hint


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml", required=True)


def test_environment_overrides_the_file_and_says_so(tmp_path: Path) -> None:
    from agent.config import describe

    f = tmp_path / "agent.toml"
    f.write_text('[proxy]\non_stop = "keep-rules"\nidle_timeout_s = 60\n')
    cfg = load_config(
        f,
        environ={
            "MESHAGENT_PROXY_IDLE_TIMEOUT_S": "600",
            "MESHAGENT_INTERCEPT_SSH_PORTS": "[22, 2222]",
            "MESHAGENT_LOG_FORMAT": "json",
        },
    )
    assert cfg.proxy.on_stop == "keep-rules"
    assert cfg.proxy.idle_timeout_s == 600.0
    assert cfg.intercept.ssh_ports == (22, 2222)
    assert cfg.log.format == "json"
    sources = {r["key"]: r["source"] for r in describe(cfg)}
    assert sources["proxy.on_stop"] == str(f)
    assert sources["proxy.idle_timeout_s"] == "env MESHAGENT_PROXY_IDLE_TIMEOUT_S"
    assert sources["proxy.drain_timeout_s"] == "default"


def test_a_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "none.toml", environ={"MESHAGENT_PROXY_ON_STOP": "sometimes"})
    assert "proxy.on_stop" in err.value.message


@pytest.mark.parametrize(
    ("text", "environ", "key", "origin", "fix"),
    [
        ("[inbound]\nports = false\n", {}, "inbound.ports", "agent.toml", "[[inbound.ports]]"),
        ("[outbound]\ncatalog = 3\n", {}, "outbound.catalog", "agent.toml", "[[outbound.catalog]]"),
        ("[proxy]\nskip_detect_ports = 1.5\n", {}, "proxy.skip_detect_ports", "agent.toml", "= [25"),
        ("[intercept]\nssh_ports = 22\n", {}, "intercept.ssh_ports", "agent.toml", "ssh_ports = [22]"),
        (
            '[[outbound.catalog]]\ncidr = "10.0.0.0/8"\nidentity = "spiffe://td/x"\nports = 5432\n',
            {},
            "outbound.catalog[0].ports",
            "agent.toml",
            "list",
        ),
        ("", {"MESHAGENT_INBOUND_PORTS": "false"}, "inbound.ports", "env MESHAGENT_INBOUND_PORTS", "'[{"),
        (
            "",
            {"MESHAGENT_INTERCEPT_SSH_PORTS": "2222"},
            "intercept.ssh_ports",
            "env MESHAGENT_INTERCEPT_SSH_PORTS",
            "MESHAGENT_INTERCEPT_SSH_PORTS='[2222]'",
        ),
    ],
    ids=[
        "file-table-list",
        "file-catalog",
        "file-float",
        "file-int",
        "catalog-entry-ports",
        "env-bool",
        "env-int",
    ],
)
def test_a_scalar_for_a_list_names_key_origin_and_fix(
    tmp_path: Path, text: str, environ: dict[str, str], key: str, origin: str, fix: str
) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ=environ)
    assert key in err.value.message
    assert origin in err.value.message
    assert fix in err.value.message + err.value.hint
