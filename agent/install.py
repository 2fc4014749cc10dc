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
from collections.abc import Callable
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


# What proves a file is ours when there is no install record: the header every shipped file
# starts with (see agent/units/), or being byte-for-byte the default config we write.
UNIT_MARKER = "Installed by `meshagent install`"
SNIPPET_MARKER = "# meshagent's "
# Every name the agent and `enroll` create in the state directory (agent/identity/store.py,
# agent/daemon.py), temp files of crash-safe writes included.
STATE_NAMES = frozenset(
    {"identity", "authority.json", "api-token", "pending-key.pem", "renewal.json", "host-config.json"}
)


def _state_name_is_ours(name: str) -> bool:
    return name in STATE_NAMES or name.startswith("gen-") or (name.startswith(".") and name.endswith(".tmp"))


@dataclass(frozen=True)
class Layout:
    """Where install puts things, under `root` (/ on a real host; a temp dir in tests)."""

    root: Path = Path("/")

    def at(self, path: Path) -> Path:
        return self.root / path.relative_to("/")


@dataclass(frozen=True)
class Left:
    """Something uninstall did not remove, why, and how to remove it by hand."""

    what: str
    why: str
    how: str

    def __str__(self) -> str:
        return f"left {self.what}: {self.why}; to remove it: {self.how}"


@dataclass
class UninstallPlan:
    units: list[str] = field(default_factory=list)  # to stop and disable
    paths: list[Path] = field(default_factory=list)  # files and trees to remove
    empty_dirs: list[Path] = field(default_factory=list)  # removed only if empty, deepest first
    users: list[str] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)


def read_manifest(layout: Layout) -> Manifest | None:
    """The install record, or None when there is none (or it cannot be read)."""
    try:
        return Manifest(**json.loads(layout.at(MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _starts_with(path: Path, marker: str, lines: int = 3) -> bool:
    try:
        head = path.read_text(errors="replace").splitlines()[:lines]
    except OSError:
        return False
    return any(marker in line for line in head)


def plan_uninstall(layout: Layout, manifest: Manifest | None, keep_state: bool) -> UninstallPlan:
    """What to remove and what to leave. Reads the disk, changes nothing.

    With the install record: what it lists, and the state. Without it, only what can be
    proved ours: shipped files by their header, the config if it is still our default, a
    state directory holding nothing but the agent's own files; never a user or an authority.
    """
    if manifest is not None:
        return _plan_with_record(layout, manifest, keep_state)
    plan = UninstallPlan()
    no_record = "no install record, so meshagent cannot prove it made it"
    for unit in ("meshagent.service", "meshagent-authority.service"):
        path = layout.at(UNIT_DIR / unit)
        if not path.exists():
            continue
        if _starts_with(path, UNIT_MARKER):
            plan.units.append(unit)
            plan.paths.append(path)
        else:
            plan.left.append(Left(str(path), f"{no_record} (no meshagent header)", f"rm {path}"))
    for snippet in (SYSUSERS, TMPFILES):
        path = layout.at(snippet)
        if not path.exists():
            continue
        if _starts_with(path, SNIPPET_MARKER, 1):
            plan.paths.append(path)
        else:
            plan.left.append(Left(str(path), f"{no_record} (no meshagent header)", f"rm {path}"))
    config_dir = layout.at(CONFIG_DIR)
    if config_dir.is_dir():
        config = config_dir / "agent.toml"
        try:
            default = config.read_text() == DEFAULT_CONFIG
        except (OSError, UnicodeDecodeError):
            default = False
        if default:
            plan.paths.append(config)
        others = sorted(p.name for p in config_dir.iterdir() if not (default and p.name == "agent.toml"))
        if others:
            plan.left.append(
                Left(
                    str(config_dir),
                    f"{no_record}, and it holds {', '.join(others)} (not the default config)",
                    f"rm -r {config_dir}",
                )
            )
        else:
            plan.empty_dirs.append(config_dir)
    state_dir = layout.at(STATE_DIR)
    if state_dir.is_dir() and not keep_state:
        foreign = sorted(p.name for p in state_dir.iterdir() if not _state_name_is_ours(p.name))
        if not any(state_dir.iterdir()):
            plan.left.append(Left(str(state_dir), f"{no_record}, and it is empty", f"rmdir {state_dir}"))
        elif foreign:
            plan.left.append(
                Left(
                    str(state_dir),
                    f"{no_record}, and it holds files meshagent does not make: {', '.join(foreign[:5])}",
                    f"rm -r {state_dir}",
                )
            )
        else:
            plan.paths.append(state_dir)
    authority_dir = layout.at(AUTHORITY_DIR)
    if authority_dir.exists():
        plan.left.append(
            Left(
                str(authority_dir),
                f"{no_record} (an authority's keys: never removed without it)",
                f"rm -r {authority_dir}",
            )
        )
    for user in ("meshagent", "meshagent-authority"):
        if _user_exists(user) and layout.root == Path("/"):
            plan.left.append(Left(f"user {user}", no_record, f"userdel {user}"))
    return plan


def _plan_with_record(layout: Layout, manifest: Manifest, keep_state: bool) -> UninstallPlan:
    units = manifest.units or ["meshagent.service"]
    plan = UninstallPlan(units=[u for u in units if layout.at(UNIT_DIR / u).exists()])
    plan.paths = [
        *(layout.at(UNIT_DIR / u) for u in units),
        layout.at(SYSUSERS),
        layout.at(TMPFILES),
        layout.at(CONFIG_DIR),
        *(layout.at(Path(f)) for f in manifest.files),
    ]
    if not keep_state:
        plan.paths.append(layout.at(STATE_DIR))
        if "meshagent-authority" in manifest.users:
            plan.paths.append(layout.at(AUTHORITY_DIR))
    plan.empty_dirs = [layout.at(Path(d)) for d in reversed(manifest.dirs)]
    plan.users = list(manifest.users)
    return plan


RemoveRules = Callable[[], list[str]]


def _remove_rules() -> list[str]:
    """Our interception rules, found by their own tables and comments (install record or not)."""
    from agent.intercept.apply import remove_all

    removed = remove_all()
    if removed.backends or removed.routes:
        return [f"removed interception rules ({', '.join(removed.backends) or 'routes'})"]
    return []


def apply_uninstall(
    plan: UninstallPlan, layout: Layout, remove_rules: RemoveRules = _remove_rules, systemd: bool = True
) -> list[str]:
    done: list[str] = []
    if systemd:
        for unit in plan.units:
            _run("systemctl", "disable", "--now", unit, check=False)
            done.append(f"stopped and disabled {unit}")
    done += remove_rules()
    for path in dict.fromkeys(plan.paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            done.append(f"removed {path}")
        elif path.exists() or path.is_symlink():
            path.unlink()
            done.append(f"removed {path}")
    for directory in plan.empty_dirs:  # deepest first; only if nothing else moved in
        with contextlib.suppress(OSError):
            directory.rmdir()
            done.append(f"removed {directory}")
    for user in plan.users:
        if _user_exists(user):
            _run("userdel", user, check=False)
            with contextlib.suppress(OSError):
                _run("groupdel", user, check=False)
            done.append(f"removed user {user}")
    if systemd:
        _run("systemctl", "daemon-reload", check=False)
    with contextlib.suppress(FileNotFoundError):
        layout.at(MANIFEST).unlink()
    return done


def uninstall(keep_state: bool = False, layout: Layout | None = None) -> tuple[list[str], list[Left]]:
    """Stop and disable the units, remove rules, keys, state, config, units and users: all of
    it with the install record, only what is provably ours without. Returns (done, left)."""
    if os.geteuid() != 0:
        raise InstallError("uninstalling needs root", "run: sudo meshagent uninstall")
    layout = layout or Layout()
    plan = plan_uninstall(layout, read_manifest(layout), keep_state)
    done = apply_uninstall(plan, layout, systemd=_systemd_running() and layout.root == Path("/"))
    for left in plan.left:
        log.info("uninstall.left", what=left.what, why=left.why, how=left.how)
    log.info("uninstall.done", steps=len(done), left=len(plan.left))
    return done, plan.left
