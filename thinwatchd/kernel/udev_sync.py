"""Wait for udev to finish with a dm device, the way libdm does (lvm2 libdm/libdm-common.c).

A resume or remove passes a cookie in dm_ioctl.event_nr: ``(UdevFlag bits << 16) | base``. The
kernel puts it in the uevent as DM_COOKIE; udev's 10-dm.rules decode the flags
(``dmsetup udevflags``) and 95-dm-notify.rules run ``dmsetup udevcomplete $DM_COOKIE``, which
decrements the SysV semaphore with key ``0x0D4D0000 | base``. The protocol, as libdm:

1. create the semaphore (0600, IPC_CREAT|IPC_EXCL, random non-zero base) with value 1;
2. increment it before the ioctl (value 2);
3. after the ioctl: if it failed or UEVENT_GENERATED did not come back, decrement once more;
4. decrement (our 1) and wait for zero — here with a timeout;
5. remove the semaphore, always, whatever happened.

Without udev (/run/udev/control absent) no semaphore is made (base 0: udevcomplete would do
nothing) and ``ensure_node``/``remove_node`` manage /dev/mapper/<name> themselves. With udev
but without 95-dm-notify.rules (dmsetup not installed), synced() instead waits for the
processed uevent carrying the cookie on a pyudev 'udev' monitor.
"""

from __future__ import annotations

import ctypes as _ctypes
import errno as _errno
import logging as _logging
import os as _os
import stat as _stat
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel.dm_abi import COOKIE_MAGIC, UDEV_FLAGS_SHIFT, UdevFlag
from thinwatchd.kernel.fs import make_node
from thinwatchd.kernel.libc import libc as _libc

__all__ = ["POOL_UDEV_FLAGS", "UDEV_CONTROL", "UdevOperation", "UdevSync"]

#: ONE resume() or remove() of a device, given the cookie to pass to it; it returns whether the
#: kernel generated a uevent (DM_UEVENT_GENERATED_FLAG), as those methods do.
UdevOperation = Callable[[int], bool]

#: Exists while systemd-udevd runs: without it, nobody would process a cookie's uevent.
UDEV_CONTROL = "/run/udev/control"

_log = _logging.getLogger(__name__)

#: For a pool: dm rules on (the /dev/mapper link), nothing else probes it (like lvm's -tpool).
POOL_UDEV_FLAGS = (
    UdevFlag.PRIMARY_SOURCE
    | UdevFlag.DISABLE_LIBRARY_FALLBACK
    | UdevFlag.DISABLE_SUBSYSTEM_RULES
    | UdevFlag.DISABLE_DISK_RULES
    | UdevFlag.DISABLE_OTHER_RULES
)

# sys/ipc.h, sys/sem.h (x86-64 glibc; checked with a C program on Debian 12)
_IPC_CREAT, _IPC_EXCL, _IPC_NOWAIT, _IPC_RMID = 0o1000, 0o2000, 0o4000, 0
_GETVAL, _SETVAL, _SEM_INFO = 12, 16, 19
_NOTIFY_RULE = "95-dm-notify.rules"
_RULE_DIRS = (
    "/etc/udev/rules.d",
    "/run/udev/rules.d",
    "/lib/udev/rules.d",
    "/usr/lib/udev/rules.d",
)


class _SemBuf(_ctypes.Structure):
    _fields_ = [
        ("sem_num", _ctypes.c_ushort),
        ("sem_op", _ctypes.c_short),
        ("sem_flg", _ctypes.c_short),
    ]


class _TimeSpec(_ctypes.Structure):
    _fields_ = [("tv_sec", _ctypes.c_long), ("tv_nsec", _ctypes.c_long)]


#: The C boundary as data: name -> (argtypes, restype). semctl is variadic; its 4th argument
#: (union semun) is passed as a long, which is how x86-64 passes the union.
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "semget": ([_ctypes.c_int, _ctypes.c_int, _ctypes.c_int], _ctypes.c_int),
    "semctl": ([_ctypes.c_int, _ctypes.c_int, _ctypes.c_int, _ctypes.c_long], _ctypes.c_int),
    "semop": ([_ctypes.c_int, _ctypes.POINTER(_SemBuf), _ctypes.c_size_t], _ctypes.c_int),
    "semtimedop": (
        [_ctypes.c_int, _ctypes.POINTER(_SemBuf), _ctypes.c_size_t, _ctypes.POINTER(_TimeSpec)],
        _ctypes.c_int,
    ),
}
for _name, (_args, _res) in _SIGNATURES.items():
    getattr(_libc, _name).argtypes, getattr(_libc, _name).restype = _args, _res


def _call(name: str, *args: Any) -> int:
    """Call a libc function; raise OSError from errno when it returns -1."""
    result = int(getattr(_libc, name)(*args))
    if result == -1:
        code = _ctypes.get_errno()
        raise OSError(code, f"{name}: {_os.strerror(code)}")
    return result


def _semop(semid: int, op: int, flags: int = 0, timeout: float | None = None) -> None:
    buf = _SemBuf(0, op, flags)
    if timeout is None:
        _call("semop", semid, _ctypes.byref(buf), 1)
    else:
        ts = _TimeSpec(int(timeout), int((timeout % 1) * 1e9))
        _call("semtimedop", semid, _ctypes.byref(buf), 1, _ctypes.byref(ts))


@dataclass(kw_only=True, eq=False)  # compared and hashed as itself, as before
class UdevSync:
    """udev synchronisation for dm devices, compatible with lvm2's udev rules."""

    dev_dir: str = "/dev"
    udev_control: str = UDEV_CONTROL
    timeout: float = 30.0  # seconds to wait for udev to finish a device's rules
    flags: UdevFlag = POOL_UDEV_FLAGS
    rule_dirs: tuple[str, ...] = _RULE_DIRS  # where lvm2's dm rules may be installed

    def udev_running(self) -> bool:
        """Return True when udevd is running (its control socket exists), as libudev checks."""
        return _os.path.exists(self.udev_control)

    def notify_rules_installed(self) -> bool:
        """Return True if some rules directory has 95-dm-notify.rules (dmsetup udevcomplete)."""
        return any(_os.path.exists(_os.path.join(d, _NOTIFY_RULE)) for d in self.rule_dirs)

    def synced(self, name: str, operation: UdevOperation, flags: UdevFlag | None = None) -> bool:
        """Run operation(cookie) on name, then wait until udev is done; return its result.

        When it succeeded, /dev/mapper/<name> reflects the change on return (if udev runs).
        The semaphore is removed on every path; an exception from operation propagates. Raise
        KernelError(ETIMEDOUT) if udev did not finish within the timeout (only after operation
        succeeded). Without 95-dm-notify.rules, or when no semaphore can be made (no SysV IPC,
        limits), it waits for udev's processed uevent on a pyudev monitor instead.
        """
        prefix = int(self.flags if flags is None else flags) << UDEV_FLAGS_SHIFT
        if not self.udev_running():
            return operation(prefix)
        try:
            semid, base = self._create(name) if self.notify_rules_installed() else (-1, 0)
        except KernelError as exc:  # no SysV IPC in this kernel, or its limits are reached
            _log.warning("%s; waiting for udev's event instead", exc)
            semid = -1
        if semid < 0:
            return self._monitored(name, prefix, operation)
        cookie = prefix | base
        incremented = generated = ok = False
        try:
            _semop(semid, +1)
            incremented = True
            generated = operation(cookie)
            ok = True
        finally:
            self._finish(name, cookie, semid, ours=incremented and not generated, raise_timeout=ok)
        return generated

    def _create(self, name: str) -> tuple[int, int]:
        for _ in range(256):
            base = int.from_bytes(_os.urandom(2), "little")
            if base == 0:
                continue
            try:
                semid = _call(
                    "semget", (COOKIE_MAGIC << 16) | base, 1, 0o600 | _IPC_CREAT | _IPC_EXCL
                )
            except OSError as exc:
                if exc.errno == _errno.EEXIST:
                    continue
                raise KernelError("udev cookie create", name, exc.errno or _errno.EIO) from exc
            try:
                _call("semctl", semid, 0, _SETVAL, 1)
            except OSError as exc:
                _call("semctl", semid, 0, _IPC_RMID, 0)
                raise KernelError("udev cookie create", name, exc.errno or _errno.EIO) from exc
            return semid, base
        raise KernelError("udev cookie create", name, _errno.EEXIST, "no free cookie")

    def _finish(
        self, name: str, cookie: int, semid: int, *, ours: bool, raise_timeout: bool
    ) -> None:
        """ours: we incremented the semaphore and no uevent will come (none generated, or the
        operation failed), so that decrement is ours; with a uevent, udevcomplete makes it."""
        done = False
        try:
            if ours:
                _semop(semid, -1, _IPC_NOWAIT)  # nobody else will: no uevent (or the ioctl failed)
            _semop(semid, -1, _IPC_NOWAIT)  # our own initial 1
            deadline = _time.monotonic() + self.timeout
            while not done:
                remaining = deadline - _time.monotonic()
                if remaining <= 0:
                    break
                try:
                    _semop(semid, 0, 0, remaining)
                    done = True
                except OSError as exc:
                    if exc.errno == _errno.EAGAIN:
                        break  # timed out
                    if exc.errno == _errno.EIDRM:
                        done = True  # removed behind us (dmsetup udevcomplete_all)
                    elif exc.errno != _errno.EINTR:
                        raise
        except OSError as exc:
            _log.warning("udev cookie %#x for %s: %s", cookie, name, exc)
            done = True  # the semaphore is in a state we cannot wait on; do not report a timeout
        finally:
            try:
                _call("semctl", semid, 0, _IPC_RMID, 0)
            except OSError as exc:
                if exc.errno not in (_errno.EINVAL, _errno.EIDRM):
                    _log.warning("udev cookie %#x for %s: cannot remove: %s", cookie, name, exc)
        if not done and raise_timeout:
            raise KernelError(
                "udev wait",
                name,
                _errno.ETIMEDOUT,
                f"cookie {cookie:#x} not completed by udev in {self.timeout:g}s",
            )

    def _monitored(self, name: str, cookie: int, operation: UdevOperation) -> bool:
        """No 95-dm-notify.rules: wait for udev's processed uevent for name with our cookie.

        Base 0, so a notify rule we did not find can never fail on a missing semaphore.
        """
        import pyudev  # only here: the cookie path must not depend on it

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        monitor.filter_by("block")
        monitor.start()  # before the ioctl, so its event cannot be missed; closed by GC
        if not operation(cookie):
            return False
        deadline = _time.monotonic() + self.timeout
        want = (name, str(cookie))
        while (left := deadline - _time.monotonic()) > 0:
            dev = monitor.poll(timeout=left)
            if (
                dev is not None
                and (dev.properties.get("DM_NAME"), dev.properties.get("DM_COOKIE")) == want
            ):
                return True
        raise KernelError("udev wait", name, _errno.ETIMEDOUT, "no processed uevent")

    def node_path(self, name: str) -> str:
        """Return /dev/mapper/<name>."""
        return _os.path.join(self.dev_dir, "mapper", name)

    def ensure_node(self, name: str, dev: int) -> bool:
        """Without udev, make /dev/mapper/<name> a block node for dev; return True if changed.

        With udev running this does nothing (udev owns /dev; synced() waits for its
        link). A stale node with another number is replaced atomically. Raise KernelError.
        """
        if self.udev_running():
            return False
        try:
            return make_node(self.node_path(name), dev, block=True)
        except OSError as exc:
            raise KernelError("mknod", self.node_path(name), exc.errno or _errno.EIO) from exc

    def remove_node(self, name: str) -> bool:
        """Without udev, remove /dev/mapper/<name> (a node or symlink); return True if removed."""
        if self.udev_running():
            return False
        path = self.node_path(name)
        try:
            if not _stat.S_ISBLK(_os.lstat(path).st_mode) and not _os.path.islink(path):
                return False
            _os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise KernelError("unlink", path, exc.errno or _errno.EIO) from exc
