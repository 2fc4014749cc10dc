"""The agent's settings: typed, frozen, loaded from one TOML file (default /etc/meshagent/agent.toml).

Every section is a frozen dataclass; its fields are the file's keys, with the defaults the
README documents. The loader walks the dataclasses, so a new setting is a new field. Errors
name the file, the key and the fix. This module imports nothing else from `agent`, except errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from agent.errors import ConfigError

DEFAULT_CONFIG_FILE = Path("/etc/meshagent/agent.toml")


@dataclass(frozen=True)
class IdentitySettings:
    state_dir: Path = Path("/var/lib/meshagent")
    """Where the key, certificate chain, trust bundle and authority reference are kept."""


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    """debug, info, warning or error."""
    format: str = "logfmt"
    """logfmt (one key=value line per event) or json."""

    def __post_init__(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level {self.level!r} is not one of debug, info, warning, error")
        if self.format not in ("logfmt", "json"):
            raise ConfigError(f"log.format {self.format!r} is not one of logfmt, json")


@dataclass(frozen=True)
class AgentConfig:
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None  # the file this came from, None for built-in defaults


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a path string, got {type(value).__name__}")
        return Path(value)
    if kind in (int, float, str, bool):
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(f"{where} must be {kind.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _section(cls: type[Any], doc: dict[str, Any], name: str, path: Path) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {name}.{close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{path}: unknown key {name}.{key}", hint)
        kwargs[key] = _coerce(value, hints[key], f"{path}: {name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", exc.hint) from None


def load_config(path: Path | None, required: bool = False) -> AgentConfig:
    """Load `path`; a missing default file means built-in defaults, a missing explicit one is an error."""
    path = path or DEFAULT_CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file {path} does not exist",
                "create it (see the README's configuration reference) or drop --config",
            ) from None
        return AgentConfig()
    except PermissionError:
        raise ConfigError(
            f"config file {path} is not readable", "run as root or as the meshagent user"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(AgentConfig) if f.name != "source"}
    hints = get_type_hints(AgentConfig)
    values: dict[str, Any] = {}
    for name, doc in raw.items():
        if name not in sections:
            close = difflib.get_close_matches(name, sections, n=1)
            hint = (
                f"did you mean [{close[0]}]?" if close else f"known sections: {', '.join(sorted(sections))}"
            )
            raise ConfigError(f"{path}: unknown section [{name}]", hint)
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: {name} must be a table ([{name}])")
        values[name] = _section(hints[name], doc, name, path)
    return AgentConfig(**values, source=path)
