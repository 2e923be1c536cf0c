"""Which loop device backs which file: one scan of the loops, shared by every lookup of a pass.

``LoopControl.find`` scans every bound loop (a LOOP_GET_STATUS64 each) to answer for one file;
N pools looking up their two files each made start-up O(N²) in ioctls. A LoopIndex scans once,
on its first lookup, and answers every later one from that scan. The daemon makes one per pass
(start-up, a reload's new pools, the pools a check or an event rebuilds), shared by the pass's
activations, which may run in worker threads.

A scan is a snapshot: a loop attached after it is not in it unless it is added here. Within one
pass each file is looked up by its own pool only (check_distinct_files refuses one file under two
pools), so the loops a pass attaches itself are all it could miss, and those are added.
"""

from __future__ import annotations

import errno
import stat
import threading

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel.api import FilesApi, LoopControlApi, LoopDevice

__all__ = ["LoopIndex"]


class LoopIndex:
    """The bound loop devices by backing file (st_dev, st_ino), scanned at most once."""

    def __init__(self, loops: LoopControlApi, files: FilesApi) -> None:
        self.loops = loops
        self.files = files
        self._lock = threading.Lock()  # activations share an index across worker threads
        self._by_file: dict[tuple[int, int], LoopDevice] | None = None

    def find(self, path: str) -> LoopDevice | None:
        """Return the lowest-numbered loop backed by the regular file path, if any (None for
        a missing file: no loop backs it). As LoopControl.find: KernelError ELOOP for a
        symlink, EINVAL for any other file that is not regular.
        """
        info = self.files.inspect(path)
        if info is None:
            return None
        if not info.is_regular:
            code = errno.ELOOP if stat.S_ISLNK(info.mode) else errno.EINVAL
            raise KernelError("find loop", path, code, "not a regular file")
        with self._lock:
            if self._by_file is None:
                self._by_file = {}
                for loop in self.loops.list_loops():  # lowest index first
                    self._by_file.setdefault((loop.backing_dev, loop.backing_inode), loop)
            return self._by_file.get(info.identity)

    def add(self, loop: LoopDevice) -> None:
        """Record a loop this pass attached, so a lookup of its file finds it."""
        with self._lock:
            if self._by_file is not None:
                self._by_file.setdefault((loop.backing_dev, loop.backing_inode), loop)
