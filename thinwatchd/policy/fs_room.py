"""The room a pool file has on its backing filesystem: what statvfs and stat say, less the
reserve and what sparse files have promised, the writes a full filesystem would fail, and when
the holes of the pool files must be claimed (allocated) before a neighbour takes that space.

Pure, like the policy that reads it; growth/backing.py fills it in from the kernel, and
growth/space_watch.py looks and claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from thinwatchd.base.units import Bytes, DataBlocks, data_blocks_to_bytes
from thinwatchd.config.settings import PoolSettings
from thinwatchd.thin.status import ThinPoolStatus, ThinPoolWorkingStatus

__all__ = [
    "CLAIM_REACTION_SECONDS",
    "CRASH_ROOM_SPARE_FACTOR",
    "NEIGHBOUR_BYTES_PER_SECOND",
    "BackingFs",
    "backing_shortfall",
    "claim_margin",
    "crash_room_fits",
    "must_claim",
    "next_look_seconds",
    "reserve_bytes",
]

#: The fastest a neighbour is taken to fill a filesystem once it has filled the page cache:
#: a fast NVMe disk's sustained writes. A faster one it has been seen to be counts instead.
NEIGHBOUR_BYTES_PER_SECOND = 2 * 1024**3
#: From a look at a filesystem that finds its headroom short to its holes claimed: the watch's
#: tick (0.2 s), the thread that takes the look, and fallocate over the files.
CLAIM_REACTION_SECONDS = 0.5


def reserve_bytes(settings: PoolSettings, fs_total: int) -> Bytes:
    """Return the bytes to keep free on a filesystem of fs_total bytes: max(reserve,
    reserve_percent of it)."""
    share = Bytes(math.ceil(fs_total * Fraction(settings.reserve_percent) / 100))
    return max(settings.reserve, share)


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
    pool_free = data_blocks_to_bytes(DataBlocks(max(0, status.data_free)), settings.data_block_size)
    holes = Bytes(max(0, backing.file_size - backing.file_allocated))
    return min(pool_free, holes)


def claim_margin(reserve: Bytes, dirty_limit: int, fill_rate: float) -> Bytes:
    """Return the headroom (free space beyond what the pool files' holes promise) under which
    the holes are claimed: what a neighbour can take before a claim lands.

    A buffered writer takes up to the page cache's dirty limit at memory speed (delayed
    allocation reserves the blocks at once, and statvfs counts them), then its disk's rate:
    NEIGHBOUR_BYTES_PER_SECOND, or the fastest fill_rate seen on the filesystem, for
    CLAIM_REACTION_SECONDS. Never less than the reserve, which no growth may take either.
    """
    rate = max(float(NEIGHBOUR_BYTES_PER_SECOND), fill_rate)
    return Bytes(max(reserve, dirty_limit + int(rate * CLAIM_REACTION_SECONDS)))


#: The room a filling pool keeps for a killed daemon's absence is taken only while its
#: filesystem has this many times that room to spare.
CRASH_ROOM_SPARE_FACTOR = 4


def crash_room_fits(
    fs: BackingFs, settings: PoolSettings, fill_rate: float | None, unwatched_seconds: float
) -> bool:
    """Return whether the pool may keep room for a killed daemon's absence (marks.base_mark's
    unwatched_seconds): only from room to spare, never from what the pools on the filesystem
    need now. In the guest, two pools on a filesystem a neighbour had filled: the first took
    the room that came back for its absence, and the second ran out of space into EIO."""
    wanted = (fill_rate or 0.0) * unwatched_seconds
    return fs.room(settings) >= CRASH_ROOM_SPARE_FACTOR * wanted


def must_claim(free: int, promised: int, margin: int) -> bool:
    """Return whether the data files' holes must be claimed now: the filesystem's free space
    beyond what they promise is under the margin (a tight filesystem, or a neighbour filling
    it). Otherwise the host keeps the space that discards gave back."""
    return promised > 0 and free - promised < margin


def next_look_seconds(
    free: int, promised: int, margin: int, fastest: float, slowest: float
) -> float:
    """Return when to look at a filesystem again: before a neighbour writing at
    NEIGHBOUR_BYTES_PER_SECOND could take the headroom above the margin, within
    [fastest, slowest]. A roomy filesystem is looked at rarely, a tight one every tick."""
    above = free - promised - margin
    return min(slowest, max(fastest, above / NEIGHBOUR_BYTES_PER_SECOND))
