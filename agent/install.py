"""Put meshagent in place on a host, and take it away again (what a package's scripts do).

`install` writes the systemd unit(s), the sysusers/tmpfiles snippets and a default config,
creates the system user and directories; every step is idempotent and recorded in a manifest,
so `uninstall` removes exactly what install added (plus the rules, keys and state the agent
made), and the host is as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import MeshagentError
from agent.logs import get_logger

log = get_logger("meshagent.install")

UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS = Path("/etc/sysusers.d/meshagent.conf")
TMPFILES = Path("/etc/tmpfiles.d/meshagent.conf")
CONFIG_DIR = Path("/etc/meshagent")
STATE_DIR = Path("/var/lib/meshagent")
AUTHORITY_DIR = Path("/var/lib/meshagent-authority")
MANIFEST = Path("/var/lib/meshagent-install.json")
UNITS_SOURCE = Path(__file__).resolve().parent / "units"  # shipped inside the package (= systemd/)


class InstallError(MeshagentError):
    code = "install_failed"


DEFAULT_CONFIG = """\
# meshagent agent configuration. Every key, its default and its meaning: README, "Configuration".
# Each key can also be set with MESHAGENT_<SECTION>_<KEY> (see `meshagent config show`).

[identity]
state_dir = "/var/lib/meshagent"

[inbound]
# all-unauthenticated (plaintext clients too), all-authenticated (mesh only) or deny
default_policy = "all-unauthenticated"

[proxy]
# remove-rules: the app keeps working without the mesh while the agent is down (fail open)
on_stop = "remove-rules"
"""


@dataclass
class Manifest:
    files: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)  # directories install made (e.g. /etc/sysusers.d)

    @classmethod
    def load(cls) -> Manifest:
        try:
            return cls(**json.loads(MANIFEST.read_text()))
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self) -> None:
        MANIFEST.write_text(json.dumps(self.__dict__, indent=2) + "\n")


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def executable() -> Path:
    """The `meshagent` command the units will run (this installation's)."""
    candidate = Path(sys.executable).parent / "meshagent"
    if candidate.exists():
        return candidate
    found = shutil.which("meshagent")
    if found:
        return Path(found)
    raise InstallError(
        "cannot find the meshagent command", "install meshagent (pip) so that `meshagent` is on PATH"
    )


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _mkdirs(path: Path, manifest: Manifest) -> None:
    """Make `path` and its missing parents, recording each so uninstall takes them away again
    (a minimal Debian has no /etc/sysusers.d, for one)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o755)
        if str(directory) not in manifest.dirs:
            manifest.dirs.append(str(directory))


def _write(path: Path, text: str, manifest: Manifest, mode: int = 0o644) -> bool:
    """Write if different; returns whether something changed."""
    if path.exists() and path.read_text() == text:
        return False
    _mkdirs(path.parent, manifest)
    path.write_text(text)
    os.chmod(path, mode)
    if str(path) not in manifest.files:
        manifest.files.append(str(path))
    return True


def install(authority: bool = False) -> list[str]:
    """Install; returns what changed (empty: it was all in place)."""
    if os.geteuid() != 0:
        raise InstallError("installing needs root", "run: sudo meshagent install")
    manifest = Manifest.load()
    exe = str(executable())
    changes: list[str] = []
    users = ["meshagent"] + (["meshagent-authority"] if authority else [])
    units = ["meshagent.service"] + (["meshagent-authority.service"] if authority else [])
    sysusers = [
        line
        for line in (UNITS_SOURCE / "meshagent.sysusers").read_text().splitlines()
        if line.startswith("#") or any(line.startswith(f"u {u} ") for u in users)
    ]
    if _write(SYSUSERS, "\n".join(sysusers) + "\n", manifest):
        changes.append(f"wrote {SYSUSERS}")
    for user in users:
        if not _user_exists(user):
            home = STATE_DIR if user == "meshagent" else AUTHORITY_DIR
            _run(
                "useradd",
                "--system",
                "--user-group",
                "--home-dir",
                str(home),
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                f"meshagent ({user})",
                user,
            )
            manifest.users.append(user)
            changes.append(f"created user {user}")
    if _write(TMPFILES, (UNITS_SOURCE / "meshagent.tmpfiles").read_text(), manifest):
        changes.append(f"wrote {TMPFILES}")
    for unit in units:
        text = (UNITS_SOURCE / unit).read_text().replace("@MESHAGENT@", exe)
        if _write(UNIT_DIR / unit, text, manifest):
            changes.append(f"wrote {UNIT_DIR / unit}")
        if unit not in manifest.units:
            manifest.units.append(unit)
    CONFIG_DIR.mkdir(mode=0o755, exist_ok=True)
    if not (CONFIG_DIR / "agent.toml").exists():
        _write(CONFIG_DIR / "agent.toml", DEFAULT_CONFIG, manifest)
        changes.append(f"wrote {CONFIG_DIR / 'agent.toml'}")
    agent = pwd.getpwnam("meshagent")
    if not STATE_DIR.exists():
        changes.append(f"created {STATE_DIR}")
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    os.chown(STATE_DIR, agent.pw_uid, agent.pw_gid)
    os.chmod(STATE_DIR, 0o700)
    if _systemd_running():
        _run("systemctl", "daemon-reload")
    manifest.save()
    log.info("install.done", changes=len(changes))
    return changes


def uninstall(keep_state: bool = False) -> list[str]:
    """Stop and disable the units, remove rules, keys, state, config, units and users."""
    if os.geteuid() != 0:
        raise InstallError("uninstalling needs root", "run: sudo meshagent uninstall")
    from agent.intercept.apply import remove_all

    manifest = Manifest.load()
    done: list[str] = []
    units = manifest.units or ["meshagent.service", "meshagent-authority.service"]
    if _systemd_running():
        for unit in units:
            if (UNIT_DIR / unit).exists():
                _run("systemctl", "disable", "--now", unit, check=False)
                done.append(f"stopped and disabled {unit}")
    removed = remove_all()
    if removed.backends or removed.routes:
        done.append(f"removed interception rules ({', '.join(removed.backends) or 'routes'})")
    paths = [*(UNIT_DIR / u for u in units), SYSUSERS, TMPFILES, CONFIG_DIR, *map(Path, manifest.files)]
    if not keep_state:
        paths += [STATE_DIR]
        if "meshagent-authority" in manifest.users:
            paths.append(AUTHORITY_DIR)
    for path in dict.fromkeys(paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            done.append(f"removed {path}")
        elif path.exists() or path.is_symlink():
            path.unlink()
            done.append(f"removed {path}")
    for directory in reversed(manifest.dirs):  # deepest first; only if nothing else moved in
        with contextlib.suppress(OSError):
            Path(directory).rmdir()
            done.append(f"removed {directory}")
    for user in manifest.users or ["meshagent"]:
        if _user_exists(user):
            _run("userdel", user, check=False)
            with contextlib.suppress(OSError):
                _run("groupdel", user, check=False)
            done.append(f"removed user {user}")
    if _systemd_running():
        _run("systemctl", "daemon-reload", check=False)
    with contextlib.suppress(FileNotFoundError):
        MANIFEST.unlink()
    log.info("uninstall.done", steps=len(done))
    return done
