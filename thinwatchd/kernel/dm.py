"""DeviceMapper: the device-mapper ioctls on /dev/mapper/control, one method per ioctl verb.

Every call goes through ``DeviceMapper._ioctl``: it packs the header (the command's minimum
interface version, only the flags the command honours, event_nr only where it is an input),
grows the buffer while the kernel answers DM_BUFFER_FULL, and turns an errno into a
KernelError naming the operation and the device.

Buffers are as small as the answer allows, on purpose: CPython's fcntl.ioctl releases the GIL
only for buffers of at most 1024 bytes, and does not retry EINTR. Header-only commands (resume,
suspend, create, remove, ...) and DEV_WAIT use a 312-byte buffer, table loads use header +
payload, readers start at 1024 bytes and double on DM_BUFFER_FULL. EINTR is retried here.
"""

from __future__ import annotations

import errno as _errno
import fcntl as _fcntl
import os as _os
import time as _time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel import dm_abi as _abi
from thinwatchd.kernel.api import DmDevice, DmInfo, Target
from thinwatchd.kernel.dm_structs import (
    DmHeader,
    align8,
    cstring,
    encode,
    pack_header,
    pack_message,
    pack_targets,
    parse_name_list,
    parse_targets,
    unpack_header,
)
from thinwatchd.kernel.fs import open_device_node
from thinwatchd.kernel.names import name_problem

__all__ = [
    "CONTROL_PATH",
    "DeviceMapper",
    "IoctlFn",
    "check_name",
]

#: Signature of fcntl.ioctl as used here: (fd, request, mutable buffer) -> int.
IoctlFn = Callable[[int, int, bytearray], int]

CONTROL_PATH = "/dev/mapper/control"
_CONTROL_SYSFS = "/sys/class/misc/device-mapper/dev"
#: First buffer for commands that return data (see the module docstring).
_READ_BUFFER = 1024
#: Give up doubling here; data_size is a u32 and no sane answer is this big.
_MAX_BUFFER = 1 << 28
_REMOVE_RETRIES = 5  # EBUSY: udev's blkid may hold a fresh device open for a moment
_REMOVE_DELAY = 0.2


def check_name(name: str, *, uuid: str = "") -> None:
    """Raise ValueError unless the kernel would accept name (and uuid) for a device."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"invalid dm device name {name!r}: {problem}")
    if len(encode(uuid)) >= _abi.DM_UUID_LEN or "\0" in uuid:
        raise ValueError(f"dm uuid {uuid!r} is over {_abi.DM_UUID_LEN - 1} bytes or has NUL")


def _fcntl_ioctl(fd: int, request: int, buf: bytearray) -> int:
    return int(_fcntl.ioctl(fd, request, buf, True))


_OnFull = Literal["grow", "ignore", "raise"]
_NO_FLAGS = _abi.DmFlag(0)


class DeviceMapper:
    """The device-mapper control device; implements thinwatchd.kernel.api.DeviceMapperApi.

    Use as a context manager or call close(). fileno() is the control fd, selectable: it polls
    readable once any dm event happened after the last arm_poll(). Devices are named by name;
    every method raises KernelError(op, name, errno) on failure unless it says otherwise, and
    ValueError for an argument the kernel would refuse.
    """

    def __init__(
        self, fd: int | None = None, *, ioctl: IoctlFn | None = None, path: str = CONTROL_PATH
    ) -> None:
        """Open path (creating the node from sysfs if missing), or adopt fd (tests pass one)."""
        self._owns_fd = fd is None
        self._fd = (
            fd
            if fd is not None
            else open_device_node(path, _CONTROL_SYSFS, block=False, flags=_os.O_RDWR)
        )
        self._ioctl_fn: IoctlFn = ioctl or _fcntl_ioctl

    def fileno(self) -> int:
        """Return the control fd."""
        return self._fd

    def close(self) -> None:
        """Close the control fd if this object opened it."""
        if self._owns_fd and self._fd >= 0:
            _os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> DeviceMapper:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _ioctl(
        self,
        cmd: _abi.Command,
        op: str,
        *,
        name: str = "",
        flags: _abi.DmFlag = _NO_FLAGS,
        event_nr: int = 0,
        uuid: str = "",
        target_count: int = 0,
        payload: bytes = b"",
        on_full: _OnFull = "grow",
        detail: str = "",
    ) -> tuple[DmHeader, bytes]:
        """Run one command; return the answer's header and its data area."""
        flags &= _abi.VALID_FLAGS[cmd]
        if cmd not in _abi.EVENT_NR_INPUT:
            event_nr = 0
        if cmd in _abi.HEADER_ONLY or cmd == _abi.Command.DEV_WAIT:
            size = _abi.DATA_START
        elif on_full == "grow" or cmd == _abi.Command.TARGET_MSG:
            size = max(_READ_BUFFER, align8(_abi.DATA_START + len(payload)))
        else:
            size = align8(_abi.DATA_START + len(payload))
        label = f"{op} (DM_{cmd.name})"
        while True:
            hdr = DmHeader(
                version=_abi.MIN_VERSION[cmd],
                data_size=size,
                target_count=target_count,
                flags=int(flags),
                event_nr=event_nr & 0xFFFFFFFF,
                name=name,
                uuid=uuid,
            )
            buf = bytearray(size)
            buf[: _abi.DATA_START] = pack_header(hdr)
            buf[_abi.DATA_START : _abi.DATA_START + len(payload)] = payload
            try:
                self._ioctl_fn(self._fd, cmd.request, buf)
            except InterruptedError:
                continue
            except OSError as exc:
                raise KernelError(label, name or uuid, exc.errno or _errno.EIO, detail) from exc
            out = unpack_header(buf)
            if out.flags & _abi.DmFlag.BUFFER_FULL and on_full != "ignore":
                if on_full == "raise" or size >= _MAX_BUFFER:
                    why = f"answer did not fit in {size} bytes"
                    raise KernelError(label, name or uuid, _errno.ENOBUFS, why)
                size *= 2
                continue
            end = min(max(out.data_size, out.data_start), size)
            return out, bytes(buf[out.data_start : end])

    @staticmethod
    def _info(h: DmHeader) -> DmInfo:
        f = _abi.DmFlag(h.flags)
        return DmInfo(
            name=h.name,
            uuid=h.uuid,
            dev=h.dev,
            event_nr=h.event_nr,
            open_count=h.open_count,
            target_count=h.target_count,
            suspended=_abi.DmFlag.SUSPEND in f,
            read_only=_abi.DmFlag.READONLY in f,
            active_present=_abi.DmFlag.ACTIVE_PRESENT in f,
            inactive_present=_abi.DmFlag.INACTIVE_PRESENT in f,
        )

    def version(self) -> tuple[int, int, int]:
        """Return the kernel's dm ioctl interface version (DM_VERSION)."""
        return self._ioctl(_abi.Command.VERSION, "version")[0].version

    def list_devices(self) -> list[DmDevice]:
        """Return every dm device with its event_nr, from one DM_LIST_DEVICES (needs 4.37)."""
        return parse_name_list(self._ioctl(_abi.Command.LIST_DEVICES, "list_devices")[1])

    def info(self, name: str) -> DmInfo | None:
        """Return the device's header (DM_DEV_STATUS), or None if there is no such device.

        suspended/read_only/target_count describe the ACTIVE table; inactive_present says
        whether a loaded table waits in the INACTIVE slot.
        """
        check_name(name)
        try:
            return self._info(self._ioctl(_abi.Command.DEV_STATUS, "info", name=name)[0])
        except KernelError as exc:
            if exc.errno == _errno.ENXIO:
                return None
            raise

    def create(self, name: str, uuid: str = "") -> DmInfo:
        """Create a device with no table in either slot (DM_DEV_CREATE); it starts suspended.

        Raise KernelError EBUSY if the name or uuid is taken.
        """
        check_name(name, uuid=uuid)
        return self._info(self._ioctl(_abi.Command.DEV_CREATE, "create", name=name, uuid=uuid)[0])

    def remove(self, name: str, cookie: int = 0) -> bool:
        """Remove the device and both its tables (DM_DEV_REMOVE); return UEVENT_GENERATED.

        The 'remove' uevent carries cookie (UdevSync.synced). EBUSY (device open) is retried a
        few times, 0.2 s apart, then raised. ENXIO: no such device.
        """
        check_name(name)
        attempt = 1
        while True:
            try:
                out, _ = self._ioctl(_abi.Command.DEV_REMOVE, "remove", name=name, event_nr=cookie)
                break
            except KernelError as exc:
                if exc.errno != _errno.EBUSY or attempt >= _REMOVE_RETRIES:
                    raise
                attempt += 1
                _time.sleep(_REMOVE_DELAY)
        return bool(out.flags & _abi.DmFlag.UEVENT_GENERATED)

    def load_table(self, name: str, targets: Sequence[Target], *, read_only: bool = False) -> None:
        """Load targets into the device's INACTIVE slot (DM_TABLE_LOAD); no suspend needed.

        The ACTIVE table keeps serving I/O until resume() swaps the slots; a table already in
        the inactive slot is replaced. Valid flag: READONLY (read_only). The kernel's reason
        for EINVAL is in its log; the error's detail carries the table.
        """
        check_name(name)
        if not targets:
            raise ValueError("a table needs at least one target")
        text = "; ".join(f"{t.start} {t.length} {t.target_type} {t.params}" for t in targets)
        self._ioctl(
            _abi.Command.TABLE_LOAD,
            "load_table",
            name=name,
            target_count=len(targets),
            flags=_abi.DmFlag.READONLY if read_only else _abi.DmFlag(0),
            payload=pack_targets(targets),
            on_full="ignore",
            detail=f"table: {text}",
        )

    def clear_table(self, name: str) -> None:
        """Drop the table in the INACTIVE slot, if any (DM_TABLE_CLEAR); the ACTIVE one stays."""
        check_name(name)
        self._ioctl(_abi.Command.TABLE_CLEAR, "clear_table", name=name)

    def suspend(self, name: str, *, noflush: bool = False, skip_lockfs: bool = False) -> None:
        """Suspend the device (DM_DEV_SUSPEND with SUSPEND); I/O queues until resume().

        Waits for in-flight I/O unless noflush. Valid flags: NOFLUSH, SKIP_LOCKFS. No uevent.
        """
        check_name(name)
        flags = _abi.DmFlag.SUSPEND
        flags |= _abi.DmFlag.NOFLUSH if noflush else 0
        flags |= _abi.DmFlag.SKIP_LOCKFS if skip_lockfs else 0
        self._ioctl(_abi.Command.DEV_SUSPEND, "suspend", name=name, flags=flags)

    def resume(
        self, name: str, cookie: int = 0, *, noflush: bool = False, skip_lockfs: bool = False
    ) -> bool:
        """Resume; if the INACTIVE slot holds a table, swap it in first. Return UEVENT_GENERATED.

        DM_DEV_SUSPEND without SUSPEND: the kernel suspends (noflush/skip_lockfs apply to that
        suspend), swaps the INACTIVE table into the ACTIVE slot, resumes and emits a 'change'
        uevent carrying cookie (RESIZE=1 if the size changed; see UdevSync.synced).
        """
        check_name(name)
        flags = _abi.DmFlag(0)
        flags |= _abi.DmFlag.NOFLUSH if noflush else 0
        flags |= _abi.DmFlag.SKIP_LOCKFS if skip_lockfs else 0
        out, _ = self._ioctl(
            _abi.Command.DEV_SUSPEND, "resume", name=name, flags=flags, event_nr=cookie
        )
        return bool(out.flags & _abi.DmFlag.UEVENT_GENERATED)

    def table(self, name: str, *, inactive: bool = False) -> list[Target]:
        """Return the ACTIVE table (or the INACTIVE one); DM_TABLE_STATUS with STATUS_TABLE.

        The kernel canonicalises device paths to "major:minor" in the params.
        """
        check_name(name)
        flags = _abi.DmFlag.STATUS_TABLE
        flags |= _abi.DmFlag.QUERY_INACTIVE_TABLE if inactive else 0
        out, data = self._ioctl(_abi.Command.TABLE_STATUS, "table", name=name, flags=flags)
        return parse_targets(data, out.target_count)

    def status(self, name: str, *, noflush: bool = False) -> list[Target]:
        """Return the ACTIVE table's INFO status lines (DM_TABLE_STATUS).

        Valid flag: NOFLUSH (noflush) — a thin-pool then reports without committing metadata.
        """
        check_name(name)
        flags = _abi.DmFlag.NOFLUSH if noflush else _abi.DmFlag(0)
        out, data = self._ioctl(_abi.Command.TABLE_STATUS, "status", name=name, flags=flags)
        return parse_targets(data, out.target_count)

    def wait(self, name: str, event_nr: int) -> int:
        """Block until the device's event_nr differs from event_nr (DM_DEV_WAIT); return it.

        Returns at once if it already differs. Blocks with the GIL released (312-byte buffer);
        signals do not end the wait (EINTR is retried). The status the kernel would append is
        not asked for (NOFLUSH, no room), so waiting never commits thin-pool metadata.
        """
        check_name(name)
        out, _ = self._ioctl(
            _abi.Command.DEV_WAIT,
            "wait",
            name=name,
            event_nr=event_nr,
            flags=_abi.DmFlag.NOFLUSH,
            on_full="ignore",
        )
        return out.event_nr

    def arm_poll(self) -> None:
        """Re-arm the control fd: it polls readable again only after the next dm event."""
        self._ioctl(_abi.Command.DEV_ARM_POLL, "arm_poll")

    def message(self, name: str, message: str, sector: int = 0) -> str:
        """Send message to the ACTIVE table's target at sector (DM_TARGET_MSG); return its reply.

        Thin-pool messages (create_thin N, delete N, ...) reply nothing (""). Never retried: a
        reply over ~700 bytes raises KernelError ENOBUFS although the message was delivered.
        """
        check_name(name)
        out, data = self._ioctl(
            _abi.Command.TARGET_MSG,
            "message",
            name=name,
            payload=pack_message(sector, message),
            on_full="raise",
            detail=message,
        )
        return cstring(data) if out.flags & _abi.DmFlag.DATA_OUT else ""
