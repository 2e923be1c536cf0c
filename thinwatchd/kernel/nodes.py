"""/dev/mapper nodes in step with the kernel: resume with udev sync, or mknod without udev."""

from __future__ import annotations

import errno
import logging

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel.api import DeviceMapperApi
from thinwatchd.kernel.dm_abi import UDEV_FLAGS_SHIFT
from thinwatchd.kernel.udev_sync import POOL_UDEV_FLAGS, UdevSync

__all__ = ["UdevNodes"]

log = logging.getLogger("thinwatchd")


class UdevNodes:
    """Implements api.DeviceNodes over UdevSync."""

    def __init__(self, udev: UdevSync | None = None) -> None:
        self.udev = udev or UdevSync()
        # Base 0: udev applies the flags (rules as for a pool) and nobody waits for it.
        self._nowait_cookie = int(POOL_UDEV_FLAGS) << UDEV_FLAGS_SHIFT

    def resume_synced(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name; return once /dev/mapper/<name> exists (udev's link, or our node).

        A udev that does not answer in time is not a failed resume: the device is up, so we
        warn and go on (its link follows when udev catches up).
        """
        try:
            self.udev.synced(name, lambda cookie: dm.resume(name, cookie=cookie))
        except KernelError as exc:
            if exc.errno != errno.ETIMEDOUT or not exc.op.startswith("udev"):
                raise
            log.warning("%s: resumed, but udev did not finish in time: %s", name, exc)
        info = dm.info(name)
        if info is not None:
            self.udev.ensure_node(name, info.dev)

    def resume_nowait(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name without waiting for udev: for a resize, the node is already there."""
        dm.resume(name, cookie=self._nowait_cookie)
