"""The device-mapper ioctl ABI as data: struct formats, ioctl numbers, flags, version table.

Every number here comes from include/uapi/linux/dm-ioctl.h (checked against Debian 12's
linux-libc-dev 6.1 headers with a C program printing sizeof/offsetof/the _IOWR values) and
drivers/md/dm-ioctl.c (lookup_ioctl, validate_params, list_devices, retrieve_status). The udev
cookie values come from lvm2's libdm/libdevmapper.h. No logic lives here.
"""

from __future__ import annotations

import enum as _enum
import struct as _struct

__all__ = [
    "COOKIE_MAGIC",
    "DATA_START",
    "DM_IOCTL_TYPE",
    "DM_MAX_TYPE_NAME",
    "DM_NAME_LEN",
    "DM_UUID_LEN",
    "EVENT_NR_INPUT",
    "HEADER",
    "HEADER_ONLY",
    "MIN_DATA_SIZE",
    "MIN_VERSION",
    "NAME_LIST_FLAG_DOESNT_HAVE_UUID",
    "NAME_LIST_FLAG_HAS_UUID",
    "NAME_LIST_HEAD",
    "NAME_LIST_TAIL",
    "TARGET_DEPS_DEV",
    "TARGET_DEPS_HEAD",
    "TARGET_MSG",
    "TARGET_SPEC",
    "TARGET_VERSIONS",
    "UDEV_FLAGS_SHIFT",
    "VALID_FLAGS",
    "Command",
    "DmFlag",
    "UdevFlag",
    "iowr",
]

#: DM_IOCTL, the ioctl "type" byte of every device-mapper command.
DM_IOCTL_TYPE = 0xFD
#: DM_NAME_LEN / DM_UUID_LEN / DM_MAX_TYPE_NAME, each including the terminating NUL.
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16

#: struct dm_ioctl, 312 bytes: version[3], data_size, data_start, target_count, open_count (s32),
#: flags, event_nr, padding, dev (u64), name[128], uuid[129], data[7].
HEADER = _struct.Struct("=3IIIIiIIIQ128s129s7s")
#: Where we put the payload: sizeof(struct dm_ioctl), already 8-byte aligned (the kernel's
#: get_result_buffer() writes output at the same aligned offset).
DATA_START = HEADER.size
#: offsetof(struct dm_ioctl, data): copy_params() refuses a smaller data_size with EINVAL.
MIN_DATA_SIZE = 305

#: struct dm_target_spec, 40 bytes: sector_start, length, status (s32), next, target_type[16].
#: The NUL-terminated parameter string follows; the next spec starts 8-byte aligned.
TARGET_SPEC = _struct.Struct("=QQiI16s")
#: struct dm_name_list up to its name: dev (u64), next (u32); the name starts at offset 12.
NAME_LIST_HEAD = _struct.Struct("=QI")
#: After the name's NUL, aligned to 8: u32 event_nr, u32 flags (since 4.37 / 4.45).
NAME_LIST_TAIL = _struct.Struct("=II")
NAME_LIST_FLAG_HAS_UUID = 1
NAME_LIST_FLAG_DOESNT_HAVE_UUID = 2
#: struct dm_target_msg: sector (u64), then the NUL-terminated message.
TARGET_MSG = _struct.Struct("=Q")
#: struct dm_target_deps: count, padding, then count u64 dev_t (huge_encode_dev).
TARGET_DEPS_HEAD = _struct.Struct("=II")
TARGET_DEPS_DEV = _struct.Struct("=Q")
#: struct dm_target_versions: next, version[3], then the NUL-terminated name.
TARGET_VERSIONS = _struct.Struct("=I3I")


def iowr(type_: int, nr: int, size: int) -> int:
    """Return _IOWR(type_, nr, size) as include/uapi/asm-generic/ioctl.h computes it."""
    return (3 << 30) | (size << 16) | (type_ << 8) | nr


class Command(_enum.IntEnum):
    """The DM_*_CMD numbers; the ioctl request is ``iowr(DM_IOCTL_TYPE, cmd, HEADER.size)``."""

    VERSION = 0
    REMOVE_ALL = 1
    LIST_DEVICES = 2
    DEV_CREATE = 3
    DEV_REMOVE = 4
    DEV_RENAME = 5
    DEV_SUSPEND = 6  # suspend with DmFlag.SUSPEND, resume without
    DEV_STATUS = 7
    DEV_WAIT = 8
    TABLE_LOAD = 9
    TABLE_CLEAR = 10
    TABLE_DEPS = 11
    TABLE_STATUS = 12
    LIST_VERSIONS = 13
    TARGET_MSG = 14
    DEV_SET_GEOMETRY = 15
    DEV_ARM_POLL = 16
    GET_TARGET_VERSION = 17

    @property
    def request(self) -> int:
        """Return the ioctl request number, e.g. 0xc138fd02 for LIST_DEVICES."""
        return iowr(DM_IOCTL_TYPE, int(self), HEADER.size)


class DmFlag(_enum.IntFlag):
    """The dm_ioctl ``flags`` bits."""

    #: In: load the table read-only / create read-only. Out: the device is read-only.
    READONLY = 1 << 0
    #: In (DEV_SUSPEND): suspend rather than resume. Out: the device is suspended.
    SUSPEND = 1 << 1
    #: In (DEV_CREATE): use the minor number in ``dev``.
    PERSISTENT_DEV = 1 << 3
    #: In (TABLE_STATUS, DEV_WAIT): return the table lines instead of the status lines.
    STATUS_TABLE = 1 << 4
    #: Out: the device has an active table.
    ACTIVE_PRESENT = 1 << 5
    #: Out: the device has an inactive (loaded, not yet resumed) table.
    INACTIVE_PRESENT = 1 << 6
    #: Out: the buffer was too small for the answer; retry with a bigger one.
    BUFFER_FULL = 1 << 8
    #: In: ignored since 2.6.x.
    SKIP_BDGET = 1 << 9
    #: In (DEV_SUSPEND): do not freeze a filesystem on the device.
    SKIP_LOCKFS = 1 << 10
    #: In: suspend without flushing queued I/O; for TABLE_STATUS/DEV_WAIT, a thin-pool does not
    #: commit its metadata before reporting.
    NOFLUSH = 1 << 11
    #: In: answer about the inactive table instead of the active one.
    QUERY_INACTIVE_TABLE = 1 << 12
    #: Out: the ioctl emitted a uevent carrying the cookie (udev will run udevcomplete).
    UEVENT_GENERATED = 1 << 13
    #: In (DEV_RENAME): set the uuid instead of the name; (LIST_DEVICES): also return uuids.
    UUID = 1 << 14
    #: In: the kernel wipes its copy of the buffer after use.
    SECURE_DATA = 1 << 15
    #: Out (TARGET_MSG): the target wrote a reply into the data area.
    DATA_OUT = 1 << 16
    #: In (DEV_REMOVE): remove when last closed. Out: removal is scheduled.
    DEFERRED_REMOVE = 1 << 17
    #: Out: the device is suspended internally (by the kernel, not by a user).
    INTERNAL_SUSPEND = 1 << 18
    #: In: return the IMA measurement text (TABLE_STATUS).
    IMA_MEASUREMENT = 1 << 19


#: The lowest interface version each command needs; the header carries it (the kernel rejects a
#: minor newer than its own and writes back its own). Based on lvm2 libdm-iface.c _cmd_data_v4.
#: LIST_DEVICES asks for 4.37 because we depend on the per-device event_nr it added; ARM_POLL was
#: added after 4.36.0 (devicemapper-rs uses 4.37 for it for that reason).
MIN_VERSION: dict[Command, tuple[int, int, int]] = {
    Command.VERSION: (4, 0, 0),
    Command.REMOVE_ALL: (4, 0, 0),
    Command.LIST_DEVICES: (4, 37, 0),
    Command.DEV_CREATE: (4, 0, 0),
    Command.DEV_REMOVE: (4, 0, 0),
    Command.DEV_RENAME: (4, 0, 0),
    Command.DEV_SUSPEND: (4, 0, 0),
    Command.DEV_STATUS: (4, 0, 0),
    Command.DEV_WAIT: (4, 0, 0),
    Command.TABLE_LOAD: (4, 0, 0),
    Command.TABLE_CLEAR: (4, 0, 0),
    Command.TABLE_DEPS: (4, 0, 0),
    Command.TABLE_STATUS: (4, 0, 0),
    Command.LIST_VERSIONS: (4, 1, 0),
    Command.TARGET_MSG: (4, 2, 0),
    Command.DEV_SET_GEOMETRY: (4, 6, 0),
    Command.DEV_ARM_POLL: (4, 37, 0),
    Command.GET_TARGET_VERSION: (4, 41, 0),
}

#: The input flags each command honours (read from the handlers in dm-ioctl.c; the same sets as
#: the per-command supported_flags of the proposed strict-mode patch). DeviceMapper masks
#: everything else out before the call.
VALID_FLAGS: dict[Command, DmFlag] = {
    Command.VERSION: DmFlag(0),
    Command.REMOVE_ALL: DmFlag.DEFERRED_REMOVE,
    Command.LIST_DEVICES: DmFlag.UUID,
    Command.DEV_CREATE: DmFlag.PERSISTENT_DEV,
    Command.DEV_REMOVE: DmFlag.DEFERRED_REMOVE,
    Command.DEV_RENAME: DmFlag.UUID,
    Command.DEV_SUSPEND: DmFlag.SUSPEND | DmFlag.SKIP_LOCKFS | DmFlag.NOFLUSH,
    Command.DEV_STATUS: DmFlag.QUERY_INACTIVE_TABLE,
    Command.DEV_WAIT: DmFlag.QUERY_INACTIVE_TABLE | DmFlag.STATUS_TABLE | DmFlag.NOFLUSH,
    Command.TABLE_LOAD: DmFlag.READONLY | DmFlag.SECURE_DATA,
    Command.TABLE_CLEAR: DmFlag(0),
    Command.TABLE_DEPS: DmFlag.QUERY_INACTIVE_TABLE,
    Command.TABLE_STATUS: DmFlag.QUERY_INACTIVE_TABLE | DmFlag.STATUS_TABLE | DmFlag.NOFLUSH,
    Command.LIST_VERSIONS: DmFlag(0),
    Command.TARGET_MSG: DmFlag(0),
    Command.DEV_SET_GEOMETRY: DmFlag(0),
    Command.DEV_ARM_POLL: DmFlag(0),
    Command.GET_TARGET_VERSION: DmFlag(0),
}

#: Commands that read ``event_nr`` as input: a udev cookie (REMOVE, RENAME, SUSPEND/resume) or
#: the event number to wait past (WAIT). Everyone else gets 0 there.
EVENT_NR_INPUT = frozenset(
    {Command.DEV_REMOVE, Command.DEV_RENAME, Command.DEV_SUSPEND, Command.DEV_WAIT}
)

#: Commands whose answer is the header alone (IOCTL_FLAGS_NO_PARAMS in dm-ioctl.c): the kernel
#: reads no payload and copies back 305 bytes, so a 312-byte buffer is always enough.
HEADER_ONLY = frozenset(
    {
        Command.VERSION,
        Command.REMOVE_ALL,
        Command.DEV_CREATE,
        Command.DEV_REMOVE,
        Command.DEV_SUSPEND,
        Command.DEV_STATUS,
        Command.TABLE_CLEAR,
        Command.DEV_ARM_POLL,
    }
)

#: libdm's cookie prefix: the SysV semaphore key of cookie base B is (COOKIE_MAGIC << 16) | B.
COOKIE_MAGIC = 0x0D4D
#: The high 16 bits of a cookie carry UdevFlag bits to the udev rules (DM_UDEV_FLAGS_SHIFT).
UDEV_FLAGS_SHIFT = 16


class UdevFlag(_enum.IntFlag):
    """libdm's DM_UDEV_* cookie flags, decoded by ``dmsetup udevflags`` in the dm udev rules."""

    #: Skip the basic dm rules, including the /dev/mapper/<name> symlink.
    DISABLE_DM_RULES = 0x0001
    #: Skip subsystem (lvm, multipath, ...) rules.
    DISABLE_SUBSYSTEM_RULES = 0x0002
    #: Skip /dev/disk/by-* rules.
    DISABLE_DISK_RULES = 0x0004
    #: Tell foreign rules (blkid probing and the like) to leave the device alone.
    DISABLE_OTHER_RULES = 0x0008
    #: Lower symlink priority.
    LOW_PRIORITY = 0x0010
    #: libdm must not create nodes itself: udev owns /dev.
    DISABLE_LIBRARY_FALLBACK = 0x0020
    #: A genuine event from the program that changed the device; 10-dm.rules needs it to tell
    #: genuine events from spurious ones and to recreate links on ``udevadm trigger``.
    PRIMARY_SOURCE = 0x0040
