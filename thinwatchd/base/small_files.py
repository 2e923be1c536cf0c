"""Reading a small file someone else may have put there (the config, the estimates file):
what kind of file an opened descriptor is, and its bytes up to a cap, never more."""

from __future__ import annotations

import os
import stat

__all__ = ["FILE_KINDS", "file_kind", "read_capped"]

#: The kinds of file that are not regular, as messages name them.
FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def file_kind(mode: int) -> str:
    """Return the kind of a file that is not regular, from its st_mode."""
    return FILE_KINDS.get(stat.S_IFMT(mode), "special file")


def read_capped(fd: int, cap: int) -> bytes | None:
    """Return the file's bytes, or None if it holds more than cap: one byte past the cap is
    read to see it is passed (the file may grow while it is read). Raise OSError."""
    data = bytearray()
    while len(data) <= cap:
        chunk = os.read(fd, cap + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return None if len(data) > cap else bytes(data)
