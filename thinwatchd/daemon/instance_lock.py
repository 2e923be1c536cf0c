"""One `thinwatchd run` per host: an exclusive flock on a lock file that names its holder.

Two daemons growing one pool would suspend and reload it against each other. The kernel drops an
flock when its holder's last fd closes, at exit or on SIGKILL alike, so a crash leaves no stale
lock behind; the pid in the file only names the holder in the second instance's error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from thinwatchd.base.errors import ThinwatchError

__all__ = ["DEFAULT_LOCK_PATH", "InstanceLock", "InstanceLockedError", "LockFileError"]

DEFAULT_LOCK_PATH = Path("/run/thinwatchd/thinwatchd.lock")
_PID_BYTES = 32  # more than any pid's digits; a longer file is not ours


class InstanceLockedError(ThinwatchError):
    """Another process holds the lock; pid is the one it wrote, None if unreadable."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        super().__init__(str(self))

    def __str__(self) -> str:
        holder = f"pid {self.pid}" if self.pid else "pid unknown"
        return (
            f"another thinwatchd ({holder}) already manages the pools (lock {self.path} held); "
            "stop it first (systemctl stop thinwatchd)"
        )


class LockFileError(ThinwatchError):
    """The lock file or its directory cannot be created, opened, locked or written."""


class InstanceLock:
    """The held lock: keep it for the life of the process (or close it, or leave the with block)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock
            self.fd = -1

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def hold_instance_lock(path: Path = DEFAULT_LOCK_PATH) -> InstanceLock:
    """Take the lock at path and write our pid into it.

    Raise InstanceLockedError if another process holds it, LockFileError if it cannot be taken.
    """
    try:
        os.makedirs(path.parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise LockFileError(f"cannot create {path.parent} for the lock file: {_why(exc)}") from None
    try:
        # O_NOFOLLOW: root must not be led into truncating a file a symlink points at.
        # O_CLOEXEC: a child (thin_check) that outlived us would otherwise keep the lock.
        # O_NONBLOCK, O_NOCTTY: a FIFO or tty put here must not block us or become our terminal.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise LockFileError(f"cannot open the lock file {path}: {_why(exc)}") from None
    try:
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(path, fd)


def _lock(fd: int, path: Path) -> None:
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "fifo" if stat.S_ISFIFO(mode) else "special file"
            raise LockFileError(
                f"cannot open the lock file {path}: it is a {kind}, not a regular file"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstanceLockedError(path, _read_pid(fd)) from None
        # Write, then cut: a reader racing us sees the new pid's line, never an empty file.
        pid = f"{os.getpid()}\n".encode()
        os.pwrite(fd, pid, 0)
        os.ftruncate(fd, len(pid))
    except OSError as exc:
        raise LockFileError(f"cannot lock {path}: {_why(exc)}") from None


def _read_pid(fd: int) -> int | None:
    try:
        first = os.pread(fd, _PID_BYTES, 0).split(b"\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.isdigit() and 0 < int(first) < 2**22 else None


def _why(exc: OSError) -> str:
    """Return the error's text, with what to do for the likely causes."""
    text = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        return f"{text}; thinwatchd run needs root"
    if exc.errno == errno.EROFS:
        return f"{text}; under systemd, RuntimeDirectory=thinwatchd makes /run/thinwatchd writable"
    if exc.errno == errno.ELOOP:
        return f"{text}: it is a symlink; remove it"
    return text
