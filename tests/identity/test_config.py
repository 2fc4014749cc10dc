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
