"""A running pool: its files, loop devices and active table, and what is done to it in place
(read its status, adopt a table someone else reloaded, reload it, make sure it is resumed).
bring_up.py brings a configured pool up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from thinwatchd.base.errors import (
    PoolMismatchError,
    PoolSetupError,
    RollbackError,
    ThinwatchError,
)
from thinwatchd.base.logs import MessageId, event
from thinwatchd.base.units import (
    Bytes,
    DataBlocks,
    Sectors,
    bytes_to_data_blocks,
    data_blocks_to_bytes,
    data_blocks_to_sectors,
)
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import (
    DeviceMapperApi,
    DmInfo,
    Kernel,
    LoopDevice,
    Target,
)
from thinwatchd.thin.status import ThinPoolStatus, ThinPoolWorkingStatus, parse_pool_status
from thinwatchd.thin.table import ThinPoolLine, ThinPoolTable, thin_pool_target

__all__ = ["Activation", "Pool", "ensure_resumed", "retrying"]

log = logging.getLogger("thinwatchd")


class Activation(enum.Enum):
    """How activate() found the pool."""

    CREATED = "created"  # new files, freshly formatted metadata
    RECREATED = "recreated"  # device rebuilt over existing metadata (after a reboot)
    ADOPTED = "adopted"  # device already running (daemon restart)


@dataclass
class Pool:
    """A configured pool bound to its loop devices and its active table."""

    settings: PoolSettings
    data_loop: LoopDevice
    meta_loop: LoopDevice
    table: ThinPoolTable  # the ACTIVE table's params, with loop devices as major:minor
    length: Sectors  # of the active table
    activation: Activation = Activation.ADOPTED
    recovered: list[str] = field(default_factory=list)  # interrupted work finished at startup
    # Found suspended at start-up and the kernel refused every resume yet: the daemon keeps
    # trying (PoolState.own_suspend) rather than give up the pool.
    left_suspended: bool = False

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def block_size(self) -> Sectors:
        return self.settings.data_block_size

    def data_bytes(self, blocks: DataBlocks) -> Bytes:
        """Return the bytes in this many of the pool's data blocks."""
        return data_blocks_to_bytes(blocks, self.settings.data_block_size)

    def target(self, length: Sectors, table: ThinPoolTable | None = None) -> Target:
        """Return the thin-pool target line for a table of length sectors."""
        return ThinPoolLine(length, table or self.table).to_target()

    def length_for(self, data_bytes: Bytes) -> Sectors:
        """Return the table length (whole blocks) for a data device of data_bytes."""
        block = self.settings.data_block_size
        return data_blocks_to_sectors(bytes_to_data_blocks(data_bytes, block), block)

    def read_status(self, dm: DeviceMapperApi) -> ThinPoolStatus:
        """Return the pool's parsed INFO status (in-core counts, without forcing a commit).

        Without NOFLUSH, pool_status() commits the metadata first, and a commit flushes the
        data device: an fsync of the data file with every dirty page a writer has in it.
        Measured under a full-speed writer: 170 ms per status read, and a stall for the writer.
        """
        target = thin_pool_target(dm.status(self.name, noflush=True))
        if target is None:
            raise PoolMismatchError(f"pool {self.name}: active table is no longer one thin-pool")
        return parse_pool_status(target.params)

    def recorded_length(self, dm: DeviceMapperApi) -> Sectors | None:
        """The pool's size as its metadata records it, as a table length; None if unknown.
        A suspended pool reports it too: an active table shorter than it is a refused resume."""
        try:
            status = self.read_status(dm)
        except ThinwatchError:
            return None
        if not isinstance(status, ThinPoolWorkingStatus) or status.data_total <= 0:
            return None
        return data_blocks_to_sectors(status.data_total, self.settings.data_block_size)

    def live_length(self, dm: DeviceMapperApi, at_least: Sectors = Sectors(0)) -> Sectors:
        """Return the active table's length as the kernel has it now, adopting outside changes.

        Someone else may have reloaded the pool since we last did (an operator's dmsetup, a
        second process): a table built from our cached length would then be refused at resume
        ("pool target too small") and leave the pool suspended. A table shorter than at_least
        (the pool's recorded size) is returned but not adopted: the kernel refused it. Raise
        PoolMismatchError if the table is no longer this pool's (other devices or block size):
        it is left untouched.
        """
        line = ThinPoolLine.from_targets(dm.table(self.name))
        if line is None:
            raise PoolMismatchError(
                f"pool {self.name}: its active table is no longer one thin-pool (someone reloaded "
                f"it); left untouched. Inspect it with dmsetup table {self.name}"
            )
        live = line.table
        ours = (self.table.metadata_dev, self.table.data_dev, self.table.data_block_size)
        if (live.metadata_dev, live.data_dev, live.data_block_size) != ours:
            raise PoolMismatchError(
                f"pool {self.name}: its table now uses metadata {live.metadata_dev}, data "
                f"{live.data_dev}, block size {live.data_block_size} instead of {ours[0]}, "
                f"{ours[1]}, {ours[2]} (someone reloaded it); left untouched. Restore it or "
                f"restart thinwatchd to adopt it"
            )
        length = line.length
        if length != self.length and length >= at_least:
            event(
                logging.WARNING,
                MessageId.CHANGED_OUTSIDE,
                f"pool {self.name}: table changed outside thinwatchd from {self.length} to "
                f"{length} sectors (dmsetup or another process); adopted",
                {"POOL": self.name, "OLD_SECTORS": self.length, "NEW_SECTORS": length},
            )
            self.length = length
        return length

    def reload(self, kernel: Kernel, table: ThinPoolTable | None = None) -> Sectors:
        """Load the longest valid table with table's params, resume, and return its length.

        The length comes from the kernel just before the load: never shorter than the active
        table (the kernel refuses to shrink a pool), and as long as the data loop device allows
        (a growth we or someone else started is finished). On failure the pool is left resumed
        (see ensure_resumed) and the error re-raised; the pool never stays suspended.
        """
        dm, table = kernel.dm, table or self.table
        live = self.live_length(dm)
        length = max(live, self.length_for(kernel.loops.size(self.data_loop)))
        try:
            dm.load_table(self.name, [self.target(length, table)])
            kernel.nodes.resume_nowait(dm, self.name)
        except ThinwatchError as cause:
            try:
                ensure_resumed(kernel, self)
            except ThinwatchError as rollback:
                raise RollbackError(cause, rollback) from cause
            raise
        self.length, self.table = length, table
        return length


_T = TypeVar("_T")
#: Attempts of a call in a rollback: a transient error (EINTR, EAGAIN, ENOMEM) must not be
#: what leaves a pool suspended.
_ROLLBACK_ATTEMPTS = 3


def retrying(call: Callable[[], _T]) -> _T:
    for attempt in range(_ROLLBACK_ATTEMPTS):
        try:
            return call()
        except ThinwatchError:
            if attempt == _ROLLBACK_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def ensure_resumed(kernel: Kernel, pool: Pool) -> None:
    """Leave the pool resumed, on the table of its recorded size, whatever interrupted a reload.

    A resume whose preresume fails (a table shorter than the pool's recorded size, a metadata
    device smaller than its superblock says) leaves the device suspended with that table
    active; a crash or another process between suspend and resume leaves it suspended too.
    Every writer of a suspended pool hangs, so: drop any inactive table, load the table the
    kernel accepts without growing the pool, and resume.

    That table is the pool's size as its metadata records it (the status's data total, which
    a suspended pool reports too): never shorter ("pool target too small"), and never longer,
    because a longer one is a growth, and a growth whose preresume fails after the data device
    was resized keeps that resize in memory, uncommitted, and the next one adds it again
    (measured on Linux 6.1: eight refused resumes of 1024 -> 2048 blocks, then an accepted
    one, and the pool recorded 9216 blocks on a 2048-block device). Only when the status
    cannot be read are the other candidates tried, longest first (the data loop's whole size,
    our last good length, the active one). Once resumed, the metadata is committed (a status
    read without NOFLUSH), so that what a refused preresume left in memory is recorded before
    the next growth could add to it.
    """
    dm, name = kernel.dm, pool.name
    try:
        info = retrying(lambda: dm.info(name))
    except ThinwatchError:
        # Blind: assume the worst (an inactive table, suspended). Clearing an empty slot and
        # reloading a running pool are harmless; leaving it suspended is not.
        info = DmInfo(
            name,
            uuid="",
            dev=0,
            event_nr=0,
            open_count=0,
            target_count=0,
            suspended=True,
            read_only=False,
            active_present=True,
            inactive_present=True,
        )
    if info is None:
        raise PoolSetupError(f"pool {name}: device disappeared")
    if info.inactive_present:
        try:
            retrying(lambda: dm.clear_table(name))
        except ThinwatchError:
            # A stale inactive table would be swapped in by the next resume, anyone's: replace
            # it with a valid one below and resume now.
            info = dataclasses.replace(info, suspended=True)
    if not info.suspended:
        return
    failure: ThinwatchError | None = None
    recorded = pool.recorded_length(dm)
    if recorded is not None:
        candidates = [recorded]
    else:
        lengths = {pool.length}
        # Each figure is one more candidate; one that cannot be read is no reason to stop here.
        try:
            lengths.add(pool.length_for(retrying(lambda: kernel.loops.size(pool.data_loop))))
            active = thin_pool_target(retrying(lambda: dm.table(name)))
            if active is not None:
                lengths.add(active.length)
        except ThinwatchError as exc:
            failure = exc
        candidates = sorted(lengths - {0}, reverse=True)
    for length in candidates:
        try:
            dm.load_table(name, [pool.target(length)])
            kernel.nodes.resume_nowait(dm, name)
        except ThinwatchError as exc:
            failure = exc
            with contextlib.suppress(ThinwatchError):
                dm.clear_table(name)
            continue
        log.warning("pool %s: found suspended; resumed on a table of %d sectors", name, length)
        pool.length = length
        _commit(kernel, pool)
        return
    try:
        if recorded is not None:  # the active table may be a refused growth: not resumed as is
            raise failure or PoolSetupError(f"pool {name}: no table to resume")
        kernel.nodes.resume_nowait(dm, name)  # as it is, if no table of ours is accepted
    except ThinwatchError as exc:
        raise PoolSetupError(
            f"pool {name} is SUSPENDED and the kernel refuses every table thinwatchd can build "
            f"({failure or exc}): its writers are blocked. See the kernel log (dmesg) and "
            f"dmsetup table {name}; dmsetup resume {name} once its data device is back"
        ) from exc
    _commit(kernel, pool)


def _commit(kernel: Kernel, pool: Pool) -> None:
    """Commit the pool's metadata (a status read without NOFLUSH does) and say if the size it
    records is more than its data device holds: writes to those blocks would fail."""
    try:
        target = thin_pool_target(kernel.dm.status(pool.name))
        status = None if target is None else parse_pool_status(target.params)
        device = pool.length_for(kernel.loops.size(pool.data_loop))
    except ThinwatchError as exc:
        log.warning("pool %s: resumed, but committing its metadata failed: %s", pool.name, exc)
        return
    if not isinstance(status, ThinPoolWorkingStatus):
        return
    recorded = data_blocks_to_sectors(status.data_total, pool.settings.data_block_size)
    if recorded > device:
        event(
            logging.ERROR,
            MessageId.CHANGED_OUTSIDE,
            f"pool {pool.name} records {recorded} sectors of data but its data device holds "
            f"{device}: the kernel kept the growth of a refused resume (someone resumed a "
            f"longer table more than once). Writes past the device will fail: grow "
            f"{pool.settings.data_file} to at least {recorded * 512} bytes (truncate -s, then "
            f"losetup -c) and thinwatchd reloads the pool on it",
            {"POOL": pool.name, "OLD_SECTORS": device, "NEW_SECTORS": recorded},
        )


# -- building ------------------------------------------------------------------------------
