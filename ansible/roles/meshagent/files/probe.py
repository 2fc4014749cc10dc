"""Preflight probe of a host, run by the role with the host's meshagent_python: one process
answers every question the role asks before changing anything (it replaces fact gathering, a
Python probe, stat calls and a `systemctl is-active`, each a module run of its own).

    probe.py VENV STATE_DIR SERVICE AUTHORITY_URL

Prints one JSON object and exits 0; it only reads. Written for any Python 3 (RHEL 8's 3.6
included), so that an old interpreter is reported rather than crashing the probe.
"""

import glob
import json
import os
import ssl
import subprocess
import sys
import sysconfig
import urllib.request

venv, state_dir, service, authority_url = sys.argv[1:5]
out = {"python": "{}.{}".format(*sys.version_info[:2])}

try:  # what `python3 -m venv` needs (Debian ships them apart, in python3-venv)
    import ensurepip
    import venv as _venv  # noqa: F401

    out["venv"] = True
except ImportError:
    out["venv"] = False


# A pip wheel that came with this Python (the distribution's python3-pip-whl / python3-pip-wheel,
# or Python's own bundled one). With it the role makes the venv without pip, since ensurepip is
# most of what `python3 -m venv` costs, and runs pip from the wheel instead. pip 22 or later:
# older ones predate Python 3.11.
def _pip_version(path):
    try:
        return tuple(int(n) for n in os.path.basename(path).split("-")[1].split(".")[:2])
    except (IndexError, ValueError):
        return (0,)


wheel_dirs = [sysconfig.get_config_var("WHEEL_PKG_DIR") or "", "/usr/share/python-wheels"]
if out["venv"]:
    wheel_dirs.append(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"))
pips = [w for d in wheel_dirs if d for w in glob.glob(os.path.join(d, "pip-*.whl"))]
pips = sorted((w for w in pips if _pip_version(w) >= (22,)), key=_pip_version)
out["pip_wheel"] = pips[-1] if pips else ""

# The OS family as Ansible names it, from os-release.
release = {}
try:
    with open("/etc/os-release") as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            release[key] = value.strip("\"'")
except OSError:
    pass
ids = [release.get("ID", ""), *release.get("ID_LIKE", "").split()]
if any(i in ("debian", "ubuntu") for i in ids):
    out["os_family"] = "Debian"
elif any(i in ("rhel", "fedora", "centos", "rocky", "almalinux") for i in ids):
    out["os_family"] = "RedHat"
else:
    out["os_family"] = release.get("NAME", "unknown")
out["init"] = "systemd" if os.path.isdir("/run/systemd/system") else "not systemd"

# What is installed: the command, the release in the venv (its dist-info), an identity.
out["bin"] = os.path.exists(os.path.join(venv, "bin", "meshagent"))
infos = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "meshagent-*.dist-info"))
out["installed"] = os.path.basename(infos[0])[10:-10] if len(infos) == 1 else ""  # meshagent-X.dist-info
out["identity"] = os.path.exists(os.path.join(state_dir, "identity", "cert.pem"))

try:
    argv = ["systemctl", "is-active", service]
    active = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out["active"] = active.stdout.decode().strip()  # bytes: `text=` is Python 3.7+
except OSError as exc:
    out["active"] = f"unknown ({exc})"

# Reachability only: enrollment verifies the authority by the token's pin.
if authority_url:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        url = authority_url.rstrip("/") + "/healthz"  # https:// (the role's preflight asserts it)
        with urllib.request.urlopen(url, timeout=10, context=context) as answer:  # noqa: S310
            out["authority"] = {"status": answer.status, "error": ""}
    except Exception as exc:  # any failure is the answer
        out["authority"] = {"status": getattr(exc, "code", 0), "error": str(exc)}

print(json.dumps(out))
