"""Byte channels from the guest to the host: a socketpair per qemu chardev, pumped by a thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Channel", "Sink", "Tee"]


class Sink(Protocol):
    """Where a channel's bytes go: a binary file, our stdout's buffer, a Tee."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


class Tee:
    """A Sink that copies to several sinks."""

    def __init__(self, *sinks: Sink) -> None:
        self._sinks = sinks

    def write(self, data: bytes, /) -> int:
        for sink in self._sinks:
            sink.write(data)
        return len(data)

    def flush(self) -> None:
        for sink in self._sinks:
            sink.flush()


_BUFFER = 1 << 20


class Channel:
    """One chardev: qemu gets ``guest_fd``; a thread copies what arrives to every sink.

    The thread ends when qemu exits (end of stream). Sinks are flushed after each chunk, so
    output streams live.
    """

    def __init__(self, name: str, sinks: Sequence[Sink]) -> None:
        self.name = name
        self._sinks = list(sinks)
        self._host, self._guest = socket.socketpair()
        for end in (self._host, self._guest):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
        self._thread = threading.Thread(target=self._pump, name=f"vm-{name}", daemon=True)

    @property
    def guest_fd(self) -> int:
        """The descriptor to hand to qemu (``-chardev socket,fd=N``)."""
        return self._guest.fileno()

    def chardev(self) -> str:
        """Return the qemu ``-chardev`` option value for this channel."""
        return f"socket,id={self.name},fd={self.guest_fd}"

    def start(self) -> None:
        """Close the host's copy of qemu's end and start pumping (call after qemu started)."""
        self._guest.close()
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the end of the stream, then stop reading (the socket is closed)."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._host.close()

    def close(self) -> None:
        """Close both ends (for when qemu never started)."""
        self._guest.close()
        self._host.close()

    def _pump(self) -> None:
        while True:
            try:
                chunk = self._host.recv(_BUFFER)
            except OSError:
                return
            if not chunk:
                return
            for sink in self._sinks:
                try:
                    sink.write(chunk)
                    sink.flush()
                except (OSError, ValueError):
                    continue
