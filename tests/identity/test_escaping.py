"""Log and terminal injection: whatever a value holds, a log record and a table row stay one line,
and every control character (C0, DEL, C1) shows as an escape instead of acting on the terminal."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from agent.cli.output import error_text, printable, table
from agent.errors import MeshagentError
from agent.logs import JsonFormatter, LogfmtFormatter
from tests.support import issue_identity, run_cli

HOSTILE = {
    "cr-forged-line": "web\r\nts=2030-01-01 level=info event=host.enrolled forged=1",
    "ansi-colour": "web\x1b[31mred\x1b[0m",
    "clear-screen": "web\x1b[2J\x1b[H",
    "nul": "web\x00x",
    "newline": "web\nx",
    "del": "web\x7fx",
    "c1-csi": "web\x9b31mx",
    "line-separator": "web\u2028x",
    "tab-bell-backspace": "web\t\x07\x08x",
}
RAW = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]


def _record(value: str) -> logging.LogRecord:
    record = logging.LogRecord("meshagent.test", logging.INFO, __file__, 1, "host.enrolled", None, None)
    record.fields = {"host_name": value, "reason": f"quoted {value!r} and raw {value}"}
    return record


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_logfmt_keeps_one_line_with_visible_escapes(value: str) -> None:
    line = LogfmtFormatter().format(_record(value))
    assert not any(c in line for c in RAW), repr(line)
    # Still parseable: the quoted value is a JSON string that decodes to the original text.
    quoted = line.split("host_name=", 1)[1].split(" reason=", 1)[0]
    assert json.loads(quoted) == value


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_json_logs_escape_every_control_character(value: str) -> None:
    line = JsonFormatter().format(_record(value))
    assert not any(c in line for c in RAW), repr(line)
    assert json.loads(line)["host_name"] == value


def test_logfmt_shows_the_escapes_an_operator_can_read() -> None:
    line = LogfmtFormatter().format(_record("a\r\x1b[31m\x00\nb"))
    assert 'host_name="a\\r\\u001b[31m\\u0000\\nb"' in line
    assert "plain=1" in LogfmtFormatter().format(_plain())
    assert 'path="C:\\\\x"' in LogfmtFormatter().format(_plain(path="C:\\x"))


def _plain(**fields: str) -> logging.LogRecord:
    record = logging.LogRecord("meshagent.test", logging.INFO, __file__, 1, "ev", None, None)
    record.fields = {"plain": "1", **fields}
    return record


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_tables_and_errors_print_one_line_per_row(value: str) -> None:
    out = table(["ID", "HOST"], [("h-1", value), ("h-2", "ok")])
    assert len(out.splitlines()) == 3
    assert not any(c in out for c in RAW if c != "\n"), repr(out)
    err = error_text(MeshagentError(f"no host {value}", f"hint {value}"))
    assert len(err.splitlines()) == 2 and not any(c in err for c in RAW if c != "\n")


def test_printable_escapes() -> None:
    assert printable("a\r\x1b[31m\x00\nb\x7f\x9b\u2028") == "a\\r\\x1b[31m\\x00\\nb\\x7f\\x9b\\u2028"
    assert printable("café ✓") == "café ✓"  # text that is not a control stays as it is


def test_authority_hosts_shows_a_stored_hostile_name_on_one_line(tmp_path: Path) -> None:
    """A row from before host names were checked: `authority hosts` must not replay its escapes."""
    directory = tmp_path / "authority"
    issue_identity(directory, "shop/web", tmp_path / "host")
    db = sqlite3.connect(directory / "registry.db")
    with db:
        db.execute("UPDATE hosts SET host_name = ?", ("evil\r\x1b[2J\x1b[31m\x00\nforged",))
    db.close()
    proc = run_cli("authority", "hosts", "--dir", str(directory), check=True)
    lines = proc.stdout.splitlines()
    # The header, the host's row, and the line saying why it is not Ready (it never reported):
    # both of the host's lines carry the name, escaped, and nothing is split by its newline.
    assert len(lines) == 3, proc.stdout
    assert "evil\\r\\x1b[2J\\x1b[31m\\x00\\nforged" in lines[1]
    assert "evil\\r\\x1b[2J\\x1b[31m\\x00\\nforged" in lines[2] and "NeverReported" in lines[2]
    assert not any(c in proc.stdout for c in RAW if c != "\n")


@pytest.mark.parametrize(
    "pattern",
    ["spiffe://cluster.local/ns/shop/*\n", "spiffe://a b", "spiffe://x\x1b[31m", "shop/*", ""],
    ids=["newline", "space", "escape", "not-spiffe", "empty"],
)
def test_policy_allow_entries_are_one_printable_token(tmp_path: Path, pattern: str) -> None:
    directory = tmp_path / "authority"
    issue_identity(directory, "shop/web", tmp_path / "host")
    args = ("--identity", "shop/db", "--default", "deny", "--allow", pattern)
    proc = run_cli("authority", "policy", "set", "--dir", str(directory), *args)
    assert proc.returncode != 0 and "allow entry" in proc.stderr
    ok = run_cli(
        "authority", "policy", "set", "--dir", str(directory), *args[:-1], "spiffe://cluster.local/*"
    )
    assert ok.returncode == 0, ok.stderr
