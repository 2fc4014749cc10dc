"""What each host carries for the service catalog: owner, description, links and SLOs.

The metadata is data about a host, set by people (`token create`, `authority host set`, the
Ansible role), so every field is checked here, once, before it reaches the registry:

- text fields (owner_team, owner_contact, system, tier, link titles, SLO names) at most
  `MAX_TEXT` (200) characters, the description at most `MAX_DESCRIPTION` (2,000);
- at most `MAX_LINKS` (10) links, each an absolute http(s) URL of at most `MAX_URL` (2,000)
  characters; at most `MAX_SLOS` (10) SLOs with unique names;
- the whole document, as JSON, at most `MAX_DOC_BYTES` (16 KiB);
- control characters are refused (the description may hold newlines and tabs); HTML is just
  text: stored as given and escaped by whoever renders it.

Errors name the field: `slos[1].objective: must be between 50 and 100 (exclusive), got 100`.
An SLO can also be written as one string (`parse_slo_spec`), for the CLI and Ansible:
`availability=99.9`, `latency=99:300ms`, with optional `,window=28d,direction=inbound,port=8080,name=x`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from agent.errors import ExitCode, MeshagentError
from agent.telemetry.proxy_metrics import LATENCY_BOUNDS_MS

MAX_TEXT: Final = 200
MAX_DESCRIPTION: Final = 2000
MAX_URL: Final = 2000
MAX_LINKS: Final = 10
MAX_SLOS: Final = 10
MAX_DOC_BYTES: Final = 16 * 1024

KINDS: Final = ("availability", "latency")
DIRECTIONS: Final = ("inbound", "outbound")
DEFAULT_WINDOW_DAYS: Final = 28
MAX_WINDOW_DAYS: Final = 90

_NAME = re.compile(r"[a-z0-9-]{1,40}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # keeps \t and \n
_TEXT_FIELDS: Final = ("owner_team", "owner_contact", "system", "tier")
_FIELDS: Final = (*_TEXT_FIELDS, "description", "links", "slos")
_SLO_FIELDS: Final = ("name", "kind", "objective", "window_days", "threshold_ms", "direction", "port")

SPEC_SYNTAX: Final = (
    "availability=99.9 or latency=99:300ms, optionally followed by "
    ",window=28d,direction=inbound|outbound,port=8080,name=NAME"
)


class MetaInvalid(MeshagentError):
    """Host metadata that cannot be stored; the message starts with the field at fault."""

    code = "metadata_invalid"
    exit_code = ExitCode.USAGE

    def __init__(self, field_name: str, problem: str, hint: str = "") -> None:
        super().__init__(
            f"{field_name}: {problem}",
            hint or "fix that field (see `meshagent authority host set --help` for the syntax and limits)",
        )
        self.field = field_name


@dataclass(frozen=True)
class Slo:
    name: str  # [a-z0-9-]{1,40}, unique per host: "availability", "latency"
    kind: str  # "availability" | "latency"
    objective: float  # percent, 50 < x < 100, e.g. 99.9
    window_days: int = DEFAULT_WINDOW_DAYS  # 1..90
    threshold_ms: int | None = None  # latency only; one of proxy_metrics.LATENCY_BOUNDS_MS
    direction: str = "inbound"  # "inbound" (requests the host serves) | "outbound"
    port: int | None = None  # the host's port (inbound) / the destination port (outbound); None = all

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "objective": self.objective,
            "window_days": self.window_days,
            "threshold_ms": self.threshold_ms,
            "direction": self.direction,
            "port": self.port,
        }

    def spec(self) -> str:
        """This SLO in `parse_slo_spec`'s syntax (defaults left out): parse_slo_spec(s.spec()) == s."""
        head = f"{self.kind}={_number(self.objective)}"
        if self.kind == "latency":
            head += f":{self.threshold_ms}ms"
        extra = []
        if self.window_days != DEFAULT_WINDOW_DAYS:
            extra.append(f"window={self.window_days}d")
        if self.direction != "inbound":
            extra.append(f"direction={self.direction}")
        if self.port is not None:
            extra.append(f"port={self.port}")
        if self.name != self.kind:
            extra.append(f"name={self.name}")
        return ",".join([head, *extra])

    def describe(self) -> str:
        """For people: '99.9% of inbound requests succeed over 28 d (port 8080)'."""
        what = "succeed" if self.kind == "availability" else f"answer under {self.threshold_ms} ms"
        where = f" (port {self.port})" if self.port is not None else ""
        return (
            f"{_number(self.objective)}% of {self.direction} requests {what} over {self.window_days} d{where}"
        )


@dataclass(frozen=True)
class HostMeta:
    owner_team: str = ""
    owner_contact: str = ""
    description: str = ""
    system: str = ""
    tier: str = ""  # free text, e.g. "1", "critical"
    links: tuple[tuple[str, str], ...] = ()  # (title, http(s) URL), e.g. ("runbook", "https://...")
    slos: tuple[Slo, ...] = field(default=())

    def to_doc(self) -> dict[str, Any]:
        return {
            "owner_team": self.owner_team,
            "owner_contact": self.owner_contact,
            "description": self.description,
            "system": self.system,
            "tier": self.tier,
            "links": [{"title": t, "url": u} for t, u in self.links],
            "slos": [s.to_doc() for s in self.slos],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_doc(), sort_keys=True, separators=(",", ":"))

    @property
    def empty(self) -> bool:
        return self == HostMeta()


def parse_meta(doc: Any) -> HostMeta:
    """The HostMeta `doc` (a mapping as `HostMeta.to_doc` writes it; missing keys are empty).

    Raises MetaInvalid naming the field. `links` may also be a mapping {title: url}; an SLO in
    `slos` may also be a spec string (`parse_slo_spec`)."""
    if doc is None:
        return HostMeta()
    if not isinstance(doc, Mapping):
        raise MetaInvalid("metadata", f"must be a mapping of fields, got {_kind(doc)}")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise MetaInvalid(unknown[0], f"unknown field (known: {', '.join(_FIELDS)})")
    texts = {name: _text(doc.get(name), name, MAX_TEXT) for name in _TEXT_FIELDS}
    meta = HostMeta(
        **texts,
        description=_text(doc.get("description"), "description", MAX_DESCRIPTION, lines=True),
        links=_links(doc.get("links")),
        slos=_slos(doc.get("slos")),
    )
    size = len(meta.to_json().encode())
    if size > MAX_DOC_BYTES:
        raise MetaInvalid("metadata", f"is {size} bytes as JSON, at most {MAX_DOC_BYTES} allowed")
    return meta


def loads_meta(text: str) -> HostMeta:
    """The HostMeta stored as JSON by `HostMeta.to_json` ('' or null: empty)."""
    if not text:
        return HostMeta()
    return parse_meta(json.loads(text))


def parse_slo_spec(text: str, field_name: str = "slo") -> Slo:
    """The Slo a spec string names: `availability=99.9`, `latency=99:300ms`, each optionally
    followed by `,window=28d,direction=inbound,port=8080,name=x` (any order)."""
    if not isinstance(text, str):
        raise MetaInvalid(field_name, f"must be a spec string, got {_kind(text)}", _spec_hint())
    parts = [p.strip() for p in text.strip().split(",")]
    kind, sep, value = parts[0].partition("=")
    kind = kind.strip()
    if not sep or kind not in KINDS:
        raise MetaInvalid(
            field_name, f"{text!r} does not start with availability=... or latency=...", _spec_hint()
        )
    doc: dict[str, Any] = {"kind": kind, "name": kind}
    if kind == "latency":
        objective, colon, threshold = value.partition(":")
        if not colon:
            raise MetaInvalid(
                field_name, f"{text!r}: latency needs PERCENT:THRESHOLD, e.g. latency=99:300ms", _spec_hint()
            )
        doc["threshold_ms"] = _duration_ms(threshold.strip(), f"{field_name}.threshold_ms")
    else:
        objective = value
    doc["objective"] = _float(objective.strip(), f"{field_name}.objective")
    for part in parts[1:]:
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or key not in ("window", "direction", "port", "name"):
            raise MetaInvalid(
                field_name, f"{part!r} is not one of window=, direction=, port=, name=", _spec_hint()
            )
        if key == "window":
            days = val[:-1] if val.endswith("d") else val
            doc["window_days"] = _int(days, f"{field_name}.window_days")
        elif key == "port":
            doc["port"] = _int(val, f"{field_name}.port")
        else:
            doc[key] = val
    return _slo(doc, field_name)


def merge_links(
    links: Iterable[tuple[str, str]], changes: Iterable[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """`links` with each (title, url) of `changes` set (same title replaced, empty url removes)."""
    merged = dict(links)
    for title, url in changes:
        if url:
            merged[title] = url
        else:
            merged.pop(title, None)
    return tuple(merged.items())


def merge_slos(slos: Iterable[Slo], changes: Iterable[Slo]) -> tuple[Slo, ...]:
    """`slos` with each of `changes` added, replacing the one of the same name."""
    merged = {s.name: s for s in slos}
    for slo in changes:
        merged[slo.name] = slo
    return tuple(merged.values())


def _spec_hint() -> str:
    return f"an SLO spec is {SPEC_SYNTAX}"


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: float) -> str:
    return f"{value:g}"


def _text(value: Any, name: str, limit: int, *, lines: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MetaInvalid(name, f"must be text, got {_kind(value)}")
    text = str(value)
    if len(text) > limit:
        raise MetaInvalid(name, f"is {len(text)} characters long, at most {limit} allowed")
    bad = (_CONTROL_BUT_LINES if lines else _CONTROL).search(text)
    if bad:
        raise MetaInvalid(name, f"holds a control character (U+{ord(bad.group()):04X} at {bad.start()})")
    return text


def _links(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items: list[Any] = [{"title": k, "url": v} for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise MetaInvalid("links", f"must be a list of {{title, url}}, got {_kind(value)}")
    if len(items) > MAX_LINKS:
        raise MetaInvalid("links", f"has {len(items)} entries, at most {MAX_LINKS} allowed")
    links: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        where = f"links[{i}]"
        if not isinstance(item, Mapping) or set(item) - {"title", "url"}:
            raise MetaInvalid(where, "must be a mapping with title and url")
        title = _text(item.get("title"), f"{where}.title", MAX_TEXT)
        if not title:
            raise MetaInvalid(f"{where}.title", "must not be empty")
        if any(title == t for t, _ in links):
            raise MetaInvalid(f"{where}.title", f"{title!r} appears twice")
        links.append((title, _url(item.get("url"), f"{where}.url")))
    return tuple(links)


def _url(value: Any, name: str) -> str:
    url = _text(value, name, MAX_URL)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise MetaInvalid(name, f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or " " in url:
        raise MetaInvalid(
            name, f"{url!r} is not an absolute http(s) URL", "links must be http:// or https:// URLs"
        )
    return url


def _slos(value: Any) -> tuple[Slo, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise MetaInvalid("slos", f"must be a list, got {_kind(value)}")
    if len(value) > MAX_SLOS:
        raise MetaInvalid("slos", f"has {len(value)} entries, at most {MAX_SLOS} allowed")
    slos: list[Slo] = []
    for i, item in enumerate(value):
        where = f"slos[{i}]"
        slo = parse_slo_spec(item, where) if isinstance(item, str) else _slo(item, where)
        if any(s.name == slo.name for s in slos):
            raise MetaInvalid(
                f"{where}.name", f"{slo.name!r} appears twice", "give each SLO its own name (name=...)"
            )
        slos.append(slo)
    return tuple(slos)


def _slo(doc: Any, where: str) -> Slo:
    if not isinstance(doc, Mapping):
        raise MetaInvalid(where, f"must be a mapping or a spec string, got {_kind(doc)}", _spec_hint())
    unknown = sorted(str(k) for k in doc if k not in _SLO_FIELDS)
    if unknown:
        raise MetaInvalid(f"{where}.{unknown[0]}", f"unknown field (known: {', '.join(_SLO_FIELDS)})")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise MetaInvalid(f"{where}.kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    name = doc.get("name", kind)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MetaInvalid(f"{where}.name", f"must match [a-z0-9-]{{1,40}}, got {name!r}")
    objective = _float(doc.get("objective"), f"{where}.objective")
    if not 50 < objective < 100:
        raise MetaInvalid(
            f"{where}.objective", f"must be between 50 and 100 (exclusive), got {_number(objective)}"
        )
    window = _int(doc.get("window_days", DEFAULT_WINDOW_DAYS), f"{where}.window_days")
    if not 1 <= window <= MAX_WINDOW_DAYS:
        raise MetaInvalid(
            f"{where}.window_days", f"must be between 1 and {MAX_WINDOW_DAYS} days, got {window}"
        )
    threshold = doc.get("threshold_ms")
    if kind == "latency":
        if threshold is None:
            raise MetaInvalid(
                f"{where}.threshold_ms", "a latency SLO needs a threshold, e.g. latency=99:300ms"
            )
        threshold = _int(threshold, f"{where}.threshold_ms")
        if threshold not in LATENCY_BOUNDS_MS:
            raise MetaInvalid(
                f"{where}.threshold_ms",
                f"{threshold} ms is not a bucket bound of the agents' latency histogram",
                f"use one of {', '.join(str(b) for b in LATENCY_BOUNDS_MS)} (ms)",
            )
    elif threshold is not None:
        raise MetaInvalid(f"{where}.threshold_ms", "only a latency SLO has a threshold")
    direction = doc.get("direction", "inbound")
    if direction not in DIRECTIONS:
        raise MetaInvalid(f"{where}.direction", f"must be inbound or outbound, got {direction!r}")
    port = doc.get("port")
    if port is not None:
        port = _int(port, f"{where}.port")
        if not 1 <= port <= 65535:
            raise MetaInvalid(f"{where}.port", f"must be a port (1..65535), got {port}")
    return Slo(name, kind, objective, window, threshold, direction, port)


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise MetaInvalid(name, "must be a number, got bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetaInvalid(name, f"must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise MetaInvalid(name, f"must be a finite number, got {value!r}")
    return number


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise MetaInvalid(name, "must be a whole number, got bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise MetaInvalid(name, f"must be a whole number, got {value!r}")


def _duration_ms(text: str, name: str) -> int:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s)?", text)
    if not match:
        raise MetaInvalid(name, f"{text!r} is not a duration like 300ms or 1s", _spec_hint())
    value = float(match.group(1)) * (1000 if match.group(2) == "s" else 1)
    if not value.is_integer():
        raise MetaInvalid(name, f"{text!r} is not a whole number of milliseconds")
    return int(value)
