"""The file syscalls thinwatchd makes on backing files, as one object the tests can fail.

Every method is the bare syscall (it raises OSError as the kernel reports it) behind one hook,
``_enter(op, target)``: the real class does nothing there; the engine tests' fake kernel records
the call and can fail it with any errno, so each step of creating, adopting and growing a pool
is exercised with every error the kernel can return there.
"""

from __future__ import annotations

import ctypes as _ctypes
import os as _os

from thinwatchd.kernel.libc import libc as _libc

__all__ = ["FALLOC_FL_KEEP_SIZE", "Syscalls"]

#: include/uapi/linux/falloc.h: allocate without changing the file size.
FALLOC_FL_KEEP_SIZE = 0x01

_libc.fallocate.argtypes = [_ctypes.c_int, _ctypes.c_int, _ctypes.c_int64, _ctypes.c_int64]
_libc.fallocate.restype = _ctypes.c_int


class Syscalls:
    """Thin wrappers over os.*; ``op`` names are the syscalls' own."""

    def _enter(self, op: str, target: str) -> None:
        """Called before each syscall; a no-op here (the fake kernel injects faults here)."""

    def lstat(self, path: str) -> _os.stat_result:
        self._enter("lstat", path)
        return _os.lstat(path)

    def stat(self, path: str) -> _os.stat_result:
        self._enter("stat", path)
        return _os.stat(path)

    def fstat(self, fd: int) -> _os.stat_result:
        self._enter("fstat", str(fd))
        return _os.fstat(fd)

    def statvfs(self, path: str) -> _os.statvfs_result:
        self._enter("statvfs", path)
        return _os.statvfs(path)

    def open(self, path: str, flags: int, mode: int = 0o600, dir_fd: int | None = None) -> int:
        self._enter("open", path)
        return _os.open(path, flags, mode, dir_fd=dir_fd)

    def close(self, fd: int) -> None:
        _os.close(fd)  # never failed on purpose: Linux releases the fd even when close errs

    def mkdir(self, path: str, mode: int) -> None:
        self._enter("mkdir", path)
        _os.mkdir(path, mode)

    def ftruncate(self, fd: int, size: int) -> None:
        self._enter("ftruncate", str(fd))
        _os.ftruncate(fd, size)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._enter("fallocate", str(fd))
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, _os.strerror(err))

    def fsync(self, fd: int) -> None:
        self._enter("fsync", str(fd))
        _os.fsync(fd)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._enter("pwrite", str(fd))
        return _os.pwrite(fd, data, offset)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self._enter("pread", str(fd))
        return _os.pread(fd, length, offset)

    def fadvise_dontneed(self, fd: int) -> None:
        self._enter("fadvise64", str(fd))
        _os.posix_fadvise(fd, 0, 0, _os.POSIX_FADV_DONTNEED)

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        self._enter("lseek", str(fd))
        return _os.lseek(fd, offset, whence)

    def link(
        self, src: str, dst: str, *, src_dir_fd: int | None, dst_dir_fd: int, follow: bool
    ) -> None:
        self._enter("link", dst)
        _os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow)

    def unlink(self, path: str, dir_fd: int) -> None:
        self._enter("unlink", path)
        _os.unlink(path, dir_fd=dir_fd)

    def listdir(self, dir_fd: int) -> list[str]:
        self._enter("getdents", str(dir_fd))
        return _os.listdir(dir_fd)
