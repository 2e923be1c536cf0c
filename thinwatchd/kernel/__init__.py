"""The kernel-ABI layer: device-mapper, loop devices, udev sync and file operations by syscall.

Only this package imports fcntl, struct or ctypes. Everything above it sees the Protocols in
``thinwatchd.kernel.api``; these are their real implementations.
"""

from thinwatchd.kernel.api import (
    DeviceMapperApi,
    DmDevice,
    DmInfo,
    LoopControlApi,
    LoopDevice,
    Target,
)
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.dm_abi import UdevFlag
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.udev_sync import POOL_UDEV_FLAGS, PUBLIC_UDEV_FLAGS, Cookie, UdevSync

__all__ = [
    "POOL_UDEV_FLAGS",
    "PUBLIC_UDEV_FLAGS",
    "Cookie",
    "DeviceMapper",
    "DeviceMapperApi",
    "DmDevice",
    "DmInfo",
    "LoopControl",
    "LoopControlApi",
    "LoopDevice",
    "Target",
    "UdevFlag",
    "UdevSync",
]
