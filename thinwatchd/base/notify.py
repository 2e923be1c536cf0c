"""The systemd notification facade: ready, status, reloading, stopping, watchdog.

Every call does nothing (and returns False) outside systemd, i.e. without NOTIFY_SOCKET.

The datagram goes out with MSG_DONTWAIT, not through sd_notify(3), whose send blocks while the
receiver's queue is full: a listener that stops reading (a test harness, a wedged manager)
would otherwise freeze the loop that grows the pools, and SIGTERM with it (found on the real
kernel). A message that does not fit is dropped; STATUS= is sent again at its next change.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

log = logging.getLogger("thinwatchd")

__all__ = ["Notifier"]


class Notifier:
    """Wraps sd_notify(3) via python-systemd, with the watchdog interval systemd asked for."""

    def __init__(self) -> None:
        self.address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
        self.enabled = self.address is not None
        self.watchdog_interval = _watchdog_interval() if self.enabled else None
        self._last_status = ""
        self._socket: socket.socket | None = None
        self._dropped = False

    def _send(self, state: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(
                state.encode(), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address
            )
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                if not self._dropped:
                    log.warning(
                        "the notify socket is full (is systemd reading it?); dropping "
                        "notifications until it drains"
                    )
                self._dropped = True
                if state.startswith("STATUS="):
                    self._last_status = ""  # resend at the next change
            else:
                log.debug("sd_notify %r failed: %s", state.split("\n")[0], exc)
            return False
        self._dropped = False
        return True

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


def _socket_address(value: str) -> str | bytes | None:
    """Return NOTIFY_SOCKET as a socket address ('@name' is the abstract namespace)."""
    if not value or value[0] not in "/@":
        return None
    return b"\0" + value[1:].encode() if value[0] == "@" else value


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
