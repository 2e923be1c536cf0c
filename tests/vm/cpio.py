"""Write an uncompressed ``newc`` cpio archive, the format the kernel unpacks as initramfs."""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["CpioWriter"]

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Append entries to a newc archive; ``close()`` writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory."""
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with the given contents."""
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. /dev/console, needed before devtmpfs is up)."""
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer entry; the archive is complete afterwards."""
        self._entry(_TRAILER, 0, b"", nlink=1)

    def _entry(
        self, name: str, mode: int, data: bytes, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + _padding(len(header) + len(encoded)))
        self._out.write(data + _padding(len(data)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
