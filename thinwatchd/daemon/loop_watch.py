"""The pools' loop devices as udev reports them: which pool a changed loop node belongs to (one
dict lookup, however many pools), and whether that loop still backs the pool's file."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable

from thinwatchd.base.errors import KernelError, ThinwatchError
from thinwatchd.growth.state import ManagedPool
from thinwatchd.kernel.api import Kernel, LoopDevice

__all__ = ["LoopOwners"]

log = logging.getLogger("thinwatchd")


class LoopOwners:
    """Every pool loop's node, with its pool and backing file; forget() when a pool is
    registered (the only time a pool's loops change)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self._owners: dict[str, tuple[ManagedPool, LoopDevice, str]] | None = None

    def forget(self) -> None:
        self._owners = None

    def owner(
        self, pools: Iterable[ManagedPool], node: str
    ) -> tuple[ManagedPool, LoopDevice, str] | None:
        """Return (pool, loop, file) for a loop device node, None if it is no pool's."""
        if self._owners is None:
            self._owners = {}
            for managed in pools:
                pool = managed.pool
                for loop, path in (
                    (pool.data_loop, pool.settings.data_file),
                    (pool.meta_loop, pool.settings.metadata_file),
                ):
                    self._owners[loop.path] = (managed, loop, str(path))
        return self._owners.get(node)

    def check(self, managed: ManagedPool, loop: LoopDevice, path: str) -> None:
        """A pool loop changed (our own growth's LOOP_SET_CAPACITY, most often): check that it
        still backs the pool file, and that the file at path is still that one. Two syscalls
        on that loop and file, not a scan of every loop."""
        name = managed.pool.name
        try:
            self.kernel.loops.size(loop)  # ENXIO if unbound or bound to another file
            info = self.kernel.files.inspect(path)
        except KernelError as exc:
            if exc.errno != errno.ENXIO:
                log.error("pool %s: cannot check %s: %s", name, loop.path, exc)
                return
            info = None
        except ThinwatchError as exc:
            log.error("pool %s: cannot check %s: %s", name, loop.path, exc)
            return
        else:
            if info is not None and info.identity == (loop.backing_dev, loop.backing_inode):
                return
        log.error(
            "pool %s: %s no longer backs %s (detached or replaced by someone else); the pool "
            "keeps its device open, but growth will fail until restart",
            name,
            loop.path,
            path,
        )
