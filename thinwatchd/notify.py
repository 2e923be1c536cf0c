"""The systemd notification facade: ready, status, reloading, stopping, watchdog.

Every call does nothing (and returns False) outside systemd, i.e. without NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import time

__all__ = ["Notifier"]


class Notifier:
    """Wraps sd_notify(3) via python-systemd, with the watchdog interval systemd asked for."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _watchdog_interval() if self.enabled else None
        self._last_status = ""

    def _send(self, state: str) -> bool:
        if not self.enabled:
            return False
        from systemd import daemon  # type: ignore[attr-defined]

        return bool(daemon.notify(state))

    def ready(self, status: str = "") -> bool:
        """Tell systemd start-up (or a reload) is complete."""
        if status:
            self._last_status = status
            return self._send(f"READY=1\nSTATUS={status}")
        return self._send("READY=1")

    def reloading(self) -> bool:
        """Tell systemd a reload has begun (READY=1 must follow)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Tell systemd we are shutting down."""
        return self._send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Update the one-line STATUS= shown by systemctl status (only when it changed)."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self._send(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Pet the watchdog; call from the main loop only, so a stuck loop is noticed."""
        return self._send("WATCHDOG=1")


def _watchdog_interval() -> float | None:
    """Return how often to pet the watchdog (half of WATCHDOG_USEC), or None when it is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None
