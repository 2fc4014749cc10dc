"""`meshagent uninstall` without its install record removes only what it can prove it made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.install import (
    DEFAULT_CONFIG,
    UNITS_SOURCE,
    Layout,
    Manifest,
    apply_uninstall,
    plan_uninstall,
    read_manifest,
)


def _put(root: Path, path: str, text: str) -> Path:
    full = root / path.lstrip("/")
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(text)
    return full


def _ours(root: Path) -> None:
    """What `install` and the agent leave on a host."""
    unit = (UNITS_SOURCE / "meshagent.service").read_text().replace("@MESHAGENT@", "/usr/bin/meshagent")
    _put(root, "/etc/systemd/system/meshagent.service", unit)
    _put(root, "/etc/sysusers.d/meshagent.conf", (UNITS_SOURCE / "meshagent.sysusers").read_text())
    _put(root, "/etc/tmpfiles.d/meshagent.conf", (UNITS_SOURCE / "meshagent.tmpfiles").read_text())
    _put(root, "/etc/meshagent/agent.toml", DEFAULT_CONFIG)
    for name in ("authority.json", "api-token", "renewal.json", "host-config.json", "gen-1a/key.pem"):
        _put(root, f"/var/lib/meshagent/{name}", "x")
    (root / "var/lib/meshagent/identity").symlink_to("gen-1a")


def _hand_made(root: Path) -> None:
    """An operator's own files at the same places."""
    _put(root, "/etc/systemd/system/meshagent.service", "[Service]\nExecStart=/opt/mine\n")
    _put(root, "/etc/meshagent/agent.toml", "# mine\n[log]\nlevel = 'debug'\n")
    _put(root, "/etc/meshagent/notes.txt", "mine\n")
    _put(root, "/var/lib/meshagent/db.sqlite", "mine")
    _put(root, "/var/lib/meshagent-authority/authority.json", "{}")


def _run(root: Path, manifest: Manifest | None, keep_state: bool = False) -> tuple[list[str], list[str]]:
    layout = Layout(root)
    plan = plan_uninstall(layout, manifest, keep_state)
    assert plan.users == ([] if manifest is None else manifest.users)
    done = apply_uninstall(plan, layout, remove_rules=lambda: [], systemd=False)
    return done, [x.what for x in plan.left]


@pytest.mark.parametrize(
    ("setup", "remaining", "left"),
    [
        (_ours, set(), []),
        (
            _hand_made,
            {
                "etc/systemd/system/meshagent.service",
                "etc/meshagent/agent.toml",
                "etc/meshagent/notes.txt",
                "var/lib/meshagent/db.sqlite",
                "var/lib/meshagent-authority/authority.json",
            },
            [
                "etc/systemd/system/meshagent.service",
                "etc/meshagent",
                "var/lib/meshagent",
                "var/lib/meshagent-authority",
            ],
        ),
    ],
    ids=["ours-all-removed", "hand-made-all-left"],
)
def test_without_a_record_only_what_is_provably_ours_goes(
    tmp_path: Path, setup: object, remaining: set[str], left: list[str]
) -> None:
    setup(tmp_path)  # type: ignore[operator]
    _, got_left = _run(tmp_path, None)
    assert [str(Path(x).relative_to(tmp_path)) for x in got_left] == left
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_dir()}
    assert files == remaining
    if not remaining:
        assert not (tmp_path / "etc/meshagent").exists()
        assert not (tmp_path / "var/lib/meshagent").exists()


def test_an_edited_config_and_foreign_state_are_left_with_how(tmp_path: Path) -> None:
    _ours(tmp_path)
    _put(tmp_path, "/etc/meshagent/agent.toml", DEFAULT_CONFIG + "# edited\n")
    _put(tmp_path, "/var/lib/meshagent/backup.tar", "mine")
    plan = plan_uninstall(Layout(tmp_path), None, keep_state=False)
    lines = [str(x) for x in plan.left]
    assert any("etc/meshagent" in x and "rm -r" in x and "agent.toml" in x for x in lines), lines
    assert any("var/lib/meshagent" in x and "backup.tar" in x for x in lines), lines
    assert tmp_path / "etc/systemd/system/meshagent.service" in plan.paths


def test_with_the_record_everything_it_lists_goes(tmp_path: Path) -> None:
    _ours(tmp_path)
    _put(tmp_path, "/etc/meshagent/extra.toml", "x")
    manifest = Manifest(files=[], users=[], units=["meshagent.service"], dirs=[])
    _put(tmp_path, "/var/lib/meshagent-install.json", json.dumps(manifest.__dict__))
    assert read_manifest(Layout(tmp_path)) == manifest
    _run(tmp_path, manifest)
    assert not (tmp_path / "etc/meshagent").exists()
    assert not (tmp_path / "var/lib/meshagent").exists()
    assert not (tmp_path / "var/lib/meshagent-install.json").exists()


# The real command, as root, in its own mount and network namespace: /etc is an overlay (so a
# user made here and anything removed never touch this machine), /var/lib a tmpfs, and the
# rules it removes are those of an empty network namespace.
REAL_RUN = r"""
set -e
mount -t overlay overlay -o lowerdir=/etc,upperdir=$T/upper,workdir=$T/work /etc
mount -t tmpfs tmpfs /var/lib
useradd --system --no-create-home --shell /usr/sbin/nologin meshagent
mkdir -p /etc/meshagent /var/lib/meshagent
echo '# mine' > /etc/meshagent/agent.toml
echo mine > /var/lib/meshagent/data
"$@" uninstall || echo "exit $?"
echo ---
getent passwd meshagent | cut -d: -f1
ls /etc/meshagent
ls /var/lib/meshagent
"""


@pytest.mark.netns
def test_real_uninstall_without_record_keeps_a_hand_made_user_and_dirs(tmp_path: Path) -> None:
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--net",
            "--propagation",
            "private",
            "sh",
            "-c",
            REAL_RUN,
            "sh",
            sys.executable,
            "-m",
            "agent.cli",
        ],
        capture_output=True,
        text=True,
        env={"T": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(proc.stderr)
    out, _, after = proc.stdout.partition("---\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert after.split() == ["meshagent", "agent.toml", "data"], proc.stdout + proc.stderr
    assert "left user meshagent" in out and "userdel meshagent" in out
    assert "left /etc/meshagent" in out and "left /var/lib/meshagent" in out
