"""sd_notify: the messages systemd reads, and never a blocked daemon when nobody reads them."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from thinwatchd.base.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return sock


def test_messages_reach_the_socket(listener: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled and notifier.watchdog_interval == 15.0
    assert notifier.ready("1 pool")
    assert listener.recv(4096) == b"READY=1\nSTATUS=1 pool"
    assert not notifier.status("1 pool")  # unchanged: not sent again
    assert notifier.watchdog()
    assert listener.recv(4096) == b"WATCHDOG=1"


def test_a_listener_that_never_reads_never_blocks_the_daemon(listener: socket.socket) -> None:
    """Found on the real kernel: a full notify queue froze the loop (and SIGTERM) forever."""
    notifier = Notifier()
    started = time.monotonic()
    sent = [notifier.status(f"{n}% full") for n in range(2000)]
    assert time.monotonic() - started < 5
    assert not all(sent)  # the queue filled and the rest were dropped, not waited for
    listener.setblocking(False)
    while True:
        try:
            listener.recv(4096)
        except BlockingIOError:
            break
    assert notifier.status("drained")  # sends again once there is room
    assert listener.recv(4096) == b"STATUS=drained"


def test_no_socket_no_notifications(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert not notifier.ready("x")
