"""systemd's notify protocol (sd_notify(3)): one datagram per state change, no dependency.

A no-op when not started by systemd with Type=notify (NOTIFY_SOCKET unset).
"""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=serving"); True if systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto("\n".join(states).encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of WatchdogSec, if systemd expects keep-alives from this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
