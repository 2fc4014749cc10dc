"""Printing for people (aligned tables, progress on stderr) and for scripts (--json on stdout)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import click

from agent.errors import MeshagentError

# Control characters (C0, DEL, C1) and Unicode line separators: never printed raw, so a host
# name like "web\x1b[2J" or "a\rb" cannot rewrite the operator's terminal (issue #15).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(value: object) -> str:
    """`value` as one line of text, every control character shown as an escape (\\n, \\x1b)."""
    return _CONTROL.sub(_visible, str(value))


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))  # ensure_ascii: no control character raw


def progress(message: str) -> None:
    click.echo(f"  - {printable(message)}", err=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns; each cell printable() so one row is one line whatever it holds."""
    cells = [[printable(h) for h in headers]] + [
        [("-" if v is None else printable(v)) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def rfc3339(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def human_duration(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [
        f"{d}d" if d else "",
        f"{h}h" if h else "",
        f"{m}m" if m and not d else "",
        f"{s}s" if not (d or h) else "",
    ]
    return sign + ("".join(parts) or "0s")


_DURATION = re.compile(r"([0-9]+)(d|h|m|s)")
_MAX_DURATION = timedelta(days=3650)


class Duration(click.ParamType):  # type: ignore[type-arg]
    """`90s`, `15m`, `1h30m`, `7d`, between `minimum` and `maximum` (a usage error naming the option)."""

    name = "duration"

    def __init__(self, minimum: timedelta = timedelta(seconds=1), maximum: timedelta = _MAX_DURATION) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip()
        if not text or _DURATION.sub("", text) != "":
            self.fail(f"{printable(value)!r} is not a duration like 90s, 15m, 1h30m or 7d", param, ctx)
        units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        # Integer seconds, digits bounded: a huge count is out of range, never an overflow.
        parts = _DURATION.findall(text)
        seconds = sum(int(n) * units[u] for n, u in parts) if all(len(n) <= 12 for n, _ in parts) else -1
        if not self.minimum.total_seconds() <= seconds <= self.maximum.total_seconds():
            self.fail(
                f"{text!r} is out of range: use {human_duration(self.minimum.total_seconds())} "
                f"to {human_duration(self.maximum.total_seconds())}",
                param,
                ctx,
            )
        return timedelta(seconds=seconds)


def error_text(exc: MeshagentError) -> str:
    text = f"error: {printable(exc.message)}"
    if exc.hint:
        text += f"\n  hint: {printable(exc.hint)}"
    return text
