"""dm events for every pool through one fd: /dev/mapper/control, armed with DM_DEV_ARM_POLL,
becomes readable when any device's event_nr moves; one DM_LIST_DEVICES then says which.

If the kernel refuses either ioctl (ENOMEM, EINTR), it is said once and read again soon: an
unarmed fd would stay readable (a busy loop), and an unread event would be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from thinwatchd.base.errors import ThinwatchError
from thinwatchd.base.event_loop import EventLoop, Timer
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.growth.state import ManagedPool
from thinwatchd.kernel.api import DeviceMapperApi

__all__ = ["EVENT_RETRY_SECONDS", "DmEvents"]

log = logging.getLogger("thinwatchd")

#: After a failed dm event read (DM_LIST_DEVICES, ARM_POLL), try again this soon.
EVENT_RETRY_SECONDS = 1.0


class DmEvents:
    """Reads the control fd's events on the loop and hands on the pools they concern."""

    def __init__(
        self,
        loop: EventLoop,
        dm: DeviceMapperApi,
        pools: Mapping[str, ManagedPool],
        *,
        changed: Callable[[list[ManagedPool], float], None],
        gone: Callable[[list[ManagedPool]], None],
    ) -> None:
        self.loop = loop
        self.dm = dm
        self.pools = pools
        self.changed = changed  # the pools whose event_nr moved, and when the loop woke
        self.gone = gone  # the pools whose device is no longer listed
        self._said: SaidOnce[str] = SaidOnce()  # "error": the last read error logged
        self._retry: Timer | None = None

    def listen(self) -> None:
        """Serve the control fd on the loop (unless a retry timer will add it back)."""
        if self._retry is None:
            self.loop.add_reader(self.dm.fileno(), self.check)

    def check(self) -> None:
        """Re-arm the control fd, then hand on each pool whose event_nr moved."""
        woke = self.loop.time()
        try:
            self.dm.arm_poll()  # first: an event after this makes the fd readable again
            seen = {d.name: d.event_nr for d in self.dm.list_devices()}
        except ThinwatchError as exc:
            self._read_failed(exc)
            return
        if self._said.ends("error"):
            log.info("dm events are read again")
        changed, gone = [], []
        for name, managed in list(self.pools.items()):
            event_nr = seen.get(name)
            if event_nr is None:
                gone.append(managed)
            elif event_nr != managed.state.seen.event_nr:
                managed.state.seen.event_nr = event_nr
                changed.append(managed)
        if gone:
            self.gone(gone)
        self.changed(changed, woke)

    def _read_failed(self, exc: ThinwatchError) -> None:
        fd = self.dm.fileno()
        self.loop.remove_reader(fd)
        if self._said.says("error", str(exc)):
            log.error(
                "cannot read dm events: %s; retrying every %g s, the timer checks meanwhile",
                exc,
                EVENT_RETRY_SECONDS,
            )

        def again() -> None:
            self._retry = None
            self.loop.remove_reader(fd)
            self.loop.add_reader(fd, self.check)
            self.check()

        if self._retry is None:
            self._retry = self.loop.call_later(EVENT_RETRY_SECONDS, again)
