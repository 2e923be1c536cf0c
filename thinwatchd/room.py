"""The room a pool file has on its backing filesystem: what statvfs and stat say, less the
reserve and what sparse files have promised, and the writes a full filesystem would fail.

Pure, like the policy that reads it; backing.py fills it in from the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from thinwatchd.forecast import reserve_bytes
from thinwatchd.settings import PoolSettings
from thinwatchd.status import ThinPoolStatus, ThinPoolWorkingStatus
from thinwatchd.units import Bytes, data_blocks_to_bytes

__all__ = ["BackingFs", "backing_shortfall"]


@dataclass(frozen=True)
class BackingFs:
    """The filesystem under one pool file, and that file (from statvfs and stat)."""

    free_bytes: Bytes  # f_bavail * f_frsize: what an unprivileged write could still get
    total_bytes: Bytes  # f_blocks * f_frsize
    file_size: Bytes  # st_size (apparent)
    file_allocated: Bytes  # st_blocks
    promised_elsewhere: Bytes = Bytes(0)  # unwritten part of our other sparse files on this fs
    path: str = ""  # mount point or directory, for messages

    def reserve(self, settings: PoolSettings) -> Bytes:
        """Return the bytes to keep free: max(reserve, reserve_percent of the filesystem)."""
        return reserve_bytes(settings, self.total_bytes)

    def promised(self) -> Bytes:
        """Return what sparse files may still claim: apparent minus allocated sizes."""
        return Bytes(max(0, self.file_size - self.file_allocated) + self.promised_elsewhere)

    def room(self, settings: PoolSettings) -> Bytes:
        """Return how many bytes the file may still grow by (negative: over-promised already)."""
        return Bytes(self.free_bytes - self.reserve(settings) - self.promised())


def backing_shortfall(status: ThinPoolStatus, settings: PoolSettings, backing: BackingFs) -> Bytes:
    """Return how many bytes the pool may still write into holes of its sparse data file that
    the backing filesystem cannot give above the reserve; 0 when it can hold them all.

    The pool's free blocks may land in holes of the data file; once the filesystem refuses
    them, the loop device fails those writes with EIO, long before the pool looks full. Only
    the filesystem being at its reserve counts (a thin pool is meant to promise more than the
    disk holds): then every block the pool still promises is a write that will fail.
    """
    if not isinstance(status, ThinPoolWorkingStatus):
        return Bytes(0)
    available = backing.free_bytes - backing.reserve(settings)
    if available > 0:
        return Bytes(0)
    pool_free = data_blocks_to_bytes(max(0, status.data_free), settings.data_block_size)
    holes = Bytes(max(0, backing.file_size - backing.file_allocated))
    return min(pool_free, holes)
