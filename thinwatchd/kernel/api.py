"""What the engine needs from the kernel, as Protocols, with the records they return.

Two implementations exist: the real one (``thinwatchd.kernel.dm.DeviceMapper``,
``thinwatchd.kernel.loop.LoopControl``) and the in-memory fake the engine tests use
(``testbed/fake_kernel.py``). Everything above ``thinwatchd/kernel/`` sees only these.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from thinwatchd.base.units import Bytes, Sectors

__all__ = [
    "DeviceMapperApi",
    "DeviceNodes",
    "DmDevice",
    "DmInfo",
    "FileInfo",
    "FilesApi",
    "FsSpace",
    "Kernel",
    "LoopControlApi",
    "LoopDevice",
    "MemoryApi",
    "MetadataChecker",
    "Target",
]


@dataclass(frozen=True)
class DmDevice:
    """One entry of DM_LIST_DEVICES."""

    name: str
    dev: int  # new-style dev_t (os.makedev)
    event_nr: int


@dataclass(frozen=True)
class DmInfo:
    """The header of a DM_DEV_STATUS answer."""

    name: str
    uuid: str
    dev: int
    event_nr: int
    open_count: int
    target_count: int
    suspended: bool
    read_only: bool
    active_present: bool
    inactive_present: bool


@dataclass(frozen=True)
class Target:
    """One line of a table (params = constructor args) or of a status (params = status text)."""

    start: Sectors
    length: Sectors
    target_type: str
    params: str


class DeviceMapperApi(Protocol):
    """The device-mapper ioctls thinwatchd uses; names follow the ioctl verbs."""

    def fileno(self) -> int:
        """Return the control fd; it polls readable when a dm event happened since arm_poll()."""

    def version(self) -> tuple[int, int, int]:
        """Return the kernel's dm ioctl interface version."""

    def list_devices(self) -> list[DmDevice]:
        """Return every dm device with its event number (one DM_LIST_DEVICES)."""

    def info(self, name: str) -> DmInfo | None:
        """Return the device's header (DM_DEV_STATUS), or None if no such device."""

    def create(self, name: str, uuid: str = "") -> DmInfo:
        """Create a device with no table (DM_DEV_CREATE); EBUSY if the name or uuid is taken.

        I/O to it fails until a table is loaded and resumed. Note: the real kernel reports a
        table-less device as NOT suspended (info().suspended is False until a resume).
        """

    def remove(self, name: str, cookie: int = 0) -> bool:
        """Remove the device and both tables (DM_DEV_REMOVE); cookie and result as resume()'s."""

    def load_table(self, name: str, targets: Sequence[Target]) -> None:
        """Load targets into the device's INACTIVE slot (DM_TABLE_LOAD); no suspend needed."""

    def clear_table(self, name: str) -> None:
        """Drop the inactive table (DM_TABLE_CLEAR)."""

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        """Suspend the device (DM_DEV_SUSPEND with DM_SUSPEND_FLAG)."""

    def resume(self, name: str, cookie: int = 0) -> bool:
        """Resume; swaps in the inactive table if there is one. Return UEVENT_GENERATED.

        cookie goes to the uevent as DM_COOKIE (see udev_sync.UdevSync.synced), which needs
        the result to know whether to wait for udev.
        """

    def table(self, name: str) -> list[Target]:
        """Return the ACTIVE table (DM_TABLE_STATUS with DM_STATUS_TABLE_FLAG)."""

    def status(self, name: str, *, noflush: bool = False) -> list[Target]:
        """Return the ACTIVE table's INFO status lines (DM_TABLE_STATUS)."""

    def wait(self, name: str, event_nr: int) -> int:
        """Block until the device's event_nr differs from event_nr (DM_DEV_WAIT); return it."""

    def arm_poll(self) -> None:
        """Re-arm the control fd's readiness (DM_DEV_ARM_POLL)."""

    def message(self, name: str, message: str, sector: int = 0) -> str:
        """Send a target message (DM_TARGET_MSG); return any reply text."""


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device and the file behind it."""

    index: int
    backing_dev: int  # st_dev of the backing file
    backing_inode: int  # st_ino of the backing file
    dev: int  # the loop block device's own dev_t (os.makedev(7, index) normally)

    @property
    def path(self) -> str:
        return f"/dev/loop{self.index}"


class LoopControlApi(Protocol):
    """The loop-device ioctls thinwatchd uses."""

    def list_loops(self) -> list[LoopDevice]:
        """Return every bound loop device, lowest index first (a LOOP_GET_STATUS64 per loop)."""

    def find(self, path: str) -> LoopDevice | None:
        """Return the loop device backed by this file (same st_dev and st_ino), if any.

        A scan of every loop per call: a lookup of many files goes through a LoopIndex.
        """

    def attach(self, path: str, *, direct_io: bool = False) -> LoopDevice:
        """Attach the file to a free loop device (LOOP_CONFIGURE, or SET_FD + SET_STATUS64)."""

    def set_capacity(self, loop: LoopDevice) -> None:
        """Make the loop device re-read its backing file's size (LOOP_SET_CAPACITY)."""

    def size(self, loop: LoopDevice) -> Bytes:
        """Return the loop device's size in bytes (BLKGETSIZE64)."""

    def detach(self, loop: LoopDevice) -> None:
        """Detach the loop device (LOOP_CLR_FD); deferred by the kernel while it is held open."""


@dataclass(frozen=True)
class FileInfo:
    """What lstat says about a backing file (links are not followed)."""

    dev: int
    ino: int
    mode: int
    uid: int
    size: Bytes  # apparent size
    allocated: Bytes  # really on disk (st_blocks)

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): two paths with the same identity are the same file."""
        return (self.dev, self.ino)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class FsSpace:
    """statvfs of the filesystem holding a file."""

    free: Bytes  # available to unprivileged users
    total: Bytes


class FilesApi(Protocol):
    """Operations on the pools' backing files; every failure raises KernelError."""

    def inspect(self, path: str, *, follow: bool = False) -> FileInfo | None:
        """lstat path (stat with follow); None if it does not exist."""

    def space(self, path: str) -> FsSpace:
        """statvfs the filesystem holding path."""

    def make_dirs(self, directory: str) -> list[str]:
        """Create directory and missing parents (mode 0700); return the ones created."""

    def create(self, path: str, size: Bytes, *, preallocate: bool) -> None:
        """Create a new regular file of size bytes (0600) atomically; EEXIST if path exists."""

    def grow(
        self,
        path: str,
        new_size: Bytes,
        *,
        preallocate: bool,
        sync: bool = True,
        identity: tuple[int, int] | None = None,
    ) -> Bytes:
        """Extend a regular file to new_size (never shrink); return the previous size.

        With identity, refuse (ESTALE) unless the file opened is that (st_dev, st_ino).
        """

    def claim(self, path: str, identity: tuple[int, int] | None = None) -> Bytes:
        """Allocate every hole of the file, changing no byte; return the bytes that took.

        With identity, refuse (ESTALE) unless the file opened is that (st_dev, st_ino).
        """

    def holds_data(self, path: str) -> bool:
        """Return whether any byte of the file was ever written (SEEK_DATA finds data)."""

    def header_is_zero(self, path: str) -> bool:
        """Return whether the first 4 KiB are all zero (a never-activated metadata file)."""


class MemoryApi(Protocol):
    """The kernel's global dirty-memory counters (thinwatchd.kernel.memory.Memory)."""

    def writeback_texts(self) -> tuple[str, str]:
        """Return the texts of /proc/meminfo and /proc/vmstat; KernelError if unreadable."""


class DeviceNodes(Protocol):
    """Keeps /dev/mapper/<name> in step with the kernel (udev sync, or mknod without udev)."""

    def resume_synced(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name and return once /dev/mapper/<name> exists."""

    def resume_nowait(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name without waiting for udev (the node already exists)."""


class MetadataChecker(Protocol):
    """Runs thin_check on a metadata device before a pool is activated over it."""

    def __call__(self, metadata_path: str) -> str | None:
        """Return None if the metadata is sound (or no checker is installed), else the report."""


@dataclass
class Kernel:
    """The kernel interfaces a pool needs."""

    dm: DeviceMapperApi
    loops: LoopControlApi
    nodes: DeviceNodes
    files: FilesApi
    #: Dirty-memory counters for writeback-aware marks; None: marks ignore writeback.
    memory: MemoryApi | None = None
