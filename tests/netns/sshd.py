"""A real sshd inside a test host, with its own keys and config in a temp directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.netlab import Host


def start_sshd(host: Host, keys: Path, listen: list[str]) -> tuple[subprocess.Popen[str], list[str]]:
    """Start sshd on port 22 of `listen`; returns the process and the ssh argv that logs in as root."""
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    (keys / "sshd_config").write_text(
        "Port 22\n" + "".join(f"ListenAddress {ip}\n" for ip in listen) + f"HostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PidFile none\nPrintMotd no\n"
    )
    # sshd wants /run/sshd: give it one on a tmpfs in this process's own mount namespace
    # (ip netns exec makes one), so the machine's /run is not touched.
    start = "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd && exec /usr/sbin/sshd -D -e -f"
    sshd = host.popen("sh", "-c", f"{start} {keys / 'sshd_config'}")
    ssh = [
        "ssh", "-F", "/dev/null", "-i", str(keys / "client_key"), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
        "-o", "ConnectionAttempts=10",
    ]  # fmt: skip
    return sshd, ssh
