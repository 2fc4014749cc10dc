"""Structured logs: an event name plus fields, rendered as logfmt (people) or JSON (machines).

    log = get_logger("meshagent.identity")
    log.info("renew.failed", reason=str(err), retry_in_s=4.0)

prints `ts=... level=info logger=meshagent.identity event=renew.failed reason="..." retry_in_s=4.0`
on stderr (journald adds its own timestamp and keeps the line as it is).

Values come from outside (host names, request paths, refusal reasons): one record is always one
line, and no control character reaches a terminal or a log viewer raw. Every C0 control, DEL,
C1 control and Unicode line/paragraph separator is written as an escape in both formats.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

_FIELDS = "fields"


class StructLogger:
    """A thin front on a stdlib logger that takes fields as keyword arguments."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={_FIELDS: fields})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(name))


class Throttled:
    """A warning a remote client can cause at will (a handshake flood, a plaintext flood): the
    first of each kind is logged at once, then at most one line per `interval_s` for that kind,
    carrying how many were left out (`suppressed`). Counting stays with the caller's metrics;
    this only keeps the log readable and its volume bounded."""

    def __init__(self, log: StructLogger, event: str, interval_s: float = 10.0, max_kinds: int = 256) -> None:
        self.log, self.event, self.interval_s, self.max_kinds = log, event, interval_s, max_kinds
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last logged, left out since)

    def warning(self, kind: str, now: float | None = None, **fields: Any) -> None:
        now = time.monotonic() if now is None else now
        last, suppressed = self._kinds.get(kind, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._kinds[kind] = (last, suppressed + 1)
            return
        if kind not in self._kinds and len(self._kinds) >= self.max_kinds:
            self._kinds.clear()  # kinds come from outside: bounded, at the price of a repeat
        self._kinds[kind] = (now, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.log.warning(self.event, **fields)


# What json.dumps(ensure_ascii=False) leaves raw but a terminal or log viewer may act on.
_RAW_AFTER_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")
# A value needs quotes if it has any of these: separators, quotes, backslashes, controls.
_NEEDS_QUOTES = re.compile('[\\s="\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def _u_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or _NEEDS_QUOTES.search(text):
        # JSON string syntax (what logfmt readers parse); non-ASCII text stays readable.
        return _RAW_AFTER_JSON.sub(_u_escape, json.dumps(text, ensure_ascii=False))
    return text


def _logfmt_key(key: str) -> str:
    return _KEY_UNSAFE.sub("_", key) or "_"


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_logfmt_value(record.getMessage())}",
        ]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{_logfmt_key(key)}={_logfmt_value(value)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        # ensure_ascii (the default) escapes everything outside printable ASCII, controls included.
        return json.dumps(doc, default=str)


def configure(level: str = "info", fmt: str = "logfmt") -> None:
    """Send meshagent's logs to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger("meshagent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
