"""Wire the real kernel interfaces together for the daemon."""

from __future__ import annotations

import logging
import os
from typing import Any

from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.fs import Files
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.memory import Memory
from thinwatchd.kernel.nodes import UdevNodes
from thinwatchd.kernel.udev_sync import UDEV_CONTROL

__all__ = ["open_kernel", "process_age", "udev_monitor"]

log = logging.getLogger("thinwatchd")


def open_kernel() -> Kernel:
    """Open /dev/mapper/control and the loop driver; raise KernelError if unavailable."""
    return Kernel(DeviceMapper(), LoopControl(), UdevNodes(), Files(), memory=Memory())


def udev_monitor() -> Any:
    """Return a started pyudev monitor of block devices, or None if netlink is unavailable.

    With udevd running we listen to its processed events; without it, to the kernel's.
    """
    import pyudev

    source = "udev" if os.path.exists(UDEV_CONTROL) else "kernel"
    try:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
        monitor.filter_by("block")
        monitor.start()
    except OSError as exc:
        log.warning("no udev monitor (%s); relying on dm events and the timer", exc)
        return None
    return monitor


def process_age() -> float:
    """Return the seconds since this process started (its interpreter and imports included),
    from /proc/self/stat's start time and /proc/uptime; 0.0 if they cannot be read."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # The command name (field 2) may hold spaces: fields count from after its ")".
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
