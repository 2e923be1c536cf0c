"""The kernel's dirty-memory counters, read as text (parsed by thinwatchd/policy/writeback.py).

Two small procfs files, read with one pread each through the Syscalls object (so the engine
tests can fail them like any other file syscall). Both are global and cheap to read: the
daemon samples them once per pass, not once per pool.
"""

from __future__ import annotations

import errno as _errno
import os as _os

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel.syscalls import Syscalls

__all__ = ["MEMINFO", "VMSTAT", "Memory"]

MEMINFO = "/proc/meminfo"
VMSTAT = "/proc/vmstat"
#: Both files are a few KiB (vmstat ~ 180 lines on 6.1); procfs returns them in one read.
_READ_BYTES = 64 * 1024


class Memory:
    """Reads /proc/meminfo and /proc/vmstat (MemoryApi)."""

    def __init__(self, syscalls: Syscalls | None = None) -> None:
        self.sys = syscalls or Syscalls()

    def writeback_texts(self) -> tuple[str, str]:
        return self._read(MEMINFO), self._read(VMSTAT)

    def _read(self, path: str) -> str:
        try:
            fd = self.sys.open(path, _os.O_RDONLY | _os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError("open", path, exc.errno or _errno.EIO) from exc
        try:
            return self.sys.pread(fd, _READ_BYTES, 0).decode("ascii", "replace")
        except OSError as exc:
            raise KernelError("read", path, exc.errno or _errno.EIO) from exc
        finally:
            self.sys.close(fd)
