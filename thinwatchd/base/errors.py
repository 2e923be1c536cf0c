"""The exception hierarchy: every error thinwatchd raises on purpose derives from ThinwatchError."""

from __future__ import annotations

import errno as _errno
import os as _os
from dataclasses import dataclass

__all__ = [
    "EX_CANTCREAT",
    "EX_CONFIG",
    "EX_DATAERR",
    "EX_NOPERM",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "ConfigError",
    "KernelError",
    "PoolMismatchError",
    "PoolSetupError",
    "RollbackError",
    "StatusParseError",
    "ThinwatchError",
]

#: sysexits.h EX_CONFIG: the exit code for any configuration error, and for a pool device that
#: does not match its configuration.
EX_CONFIG = 78
#: sysexits.h EX_DATAERR: a pool's files are damaged or inconsistent (e.g. thin_check fails).
#: Like EX_CONFIG, restarting will not help: the unit lists both in RestartPreventExitStatus=.
EX_DATAERR = 65
#: sysexits.h EX_UNAVAILABLE: device-mapper or loop cannot be opened (no driver, or an I/O error).
EX_UNAVAILABLE = 69
#: sysexits.h EX_CANTCREAT: the instance lock file (or its directory) cannot be created, e.g. a
#: read-only /run; the unit lists it in RestartPreventExitStatus=.
EX_CANTCREAT = 73
#: sysexits.h EX_TEMPFAIL: another instance holds the lock; the unit lists it in
#: RestartPreventExitStatus=.
EX_TEMPFAIL = 75
#: sysexits.h EX_NOPERM: the kernel refused device-mapper to a user without CAP_SYS_ADMIN.
EX_NOPERM = 77


class ThinwatchError(Exception):
    """Root of every error thinwatchd raises deliberately.

    The subclasses with fields are dataclasses (eq=False: an error is itself, and hashable);
    their args are the message, as an Exception's would be.
    """

    def __post_init__(self) -> None:
        super().__init__(str(self))


@dataclass(eq=False)
class KernelError(ThinwatchError):
    """A kernel call (ioctl or syscall) failed; names the operation and the device."""

    op: str
    device: str
    errno: int
    detail: str = ""

    def __str__(self) -> str:
        code = _errno.errorcode.get(self.errno, str(self.errno))
        device = self.device or "(no device)"
        text = f"{self.op} on {device} failed: {_os.strerror(self.errno)} ({code})"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(eq=False)
class ConfigError(ThinwatchError):
    """The configuration is invalid; names the key path, the bad value and what is allowed."""

    key_path: str
    message: str

    def __str__(self) -> str:
        return f"{self.key_path}: {self.message}" if self.key_path else self.message

    def located(self, source: object) -> str:
        """Return the message naming source once (file-level messages already name it)."""
        return f"{source}: {self}" if self.key_path else str(self)


@dataclass(eq=False)
class StatusParseError(ThinwatchError):
    """A kernel status or table line had a token we do not understand."""

    field: str
    index: int
    value: str
    line: str = ""

    def __str__(self) -> str:
        where = f" in {self.line!r}" if self.line else ""
        return f"cannot parse {self.field} (token {self.index}): {self.value!r}{where}"


class PoolMismatchError(ThinwatchError):
    """An existing pool device does not match its configuration; it is left untouched."""


class PoolSetupError(ThinwatchError):
    """A pool cannot be built or adopted safely; nothing was changed that could lose data."""


@dataclass(eq=False)
class RollbackError(ThinwatchError):
    """An operation failed and so did undoing it; keeps both errors."""

    cause: BaseException
    rollback: BaseException

    def __str__(self) -> str:
        return f"{self.cause} (and undoing it failed too: {self.rollback})"
