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

__all__ = ["open_kernel", "udev_monitor"]

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
