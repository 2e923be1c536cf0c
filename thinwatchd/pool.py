"""Pool lifecycle: build a configured pool, or adopt it after a restart or reboot.

A pool is two regular files (data, metadata), a loop device on each and a thin-pool dm device
named as configured. ``activate()`` reaches that state from any state a crash can leave behind,
without ever zeroing the metadata of a pool that has been used or shrinking anything:

- The metadata file is created first and its header zeroed; a metadata file whose header is
  still all zero has never been activated, so files around it may be (re)created freely.
- A growth is finished where it stopped: file larger than its loop -> LOOP_SET_CAPACITY;
  loop larger than the table -> reload and resume.
- A pool device that does not use this pool's files is a mismatch: it is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from thinwatchd.errors import (
    KernelError,
    PoolMismatchError,
    PoolSetupError,
    RollbackError,
    ThinwatchError,
)
from thinwatchd.kernel.api import (
    DeviceMapperApi,
    DmInfo,
    Kernel,
    LoopDevice,
    MetadataChecker,
    Target,
)
from thinwatchd.logs import MessageId, event
from thinwatchd.loop_index import LoopIndex
from thinwatchd.marks import low_water_mark
from thinwatchd.pool_files import check_distinct_files, prepare_files
from thinwatchd.settings import METADATA_MAX_BYTES, PoolSettings
from thinwatchd.status import ThinPoolStatus, ThinPoolWorkingStatus, parse_pool_status
from thinwatchd.table import ThinPoolLine, ThinPoolTable, device_number, thin_pool_target
from thinwatchd.units import META_BLOCK_BYTES, SECTOR_BYTES

__all__ = [
    "Activation",
    "Pool",
    "PoolSetupError",
    "activate",
    "check_distinct_files",
    "ensure_resumed",
]

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
    length: int  # sectors of the active table
    activation: Activation = Activation.ADOPTED
    recovered: list[str] = field(default_factory=list)  # interrupted work finished at startup

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def block_bytes(self) -> int:
        return self.settings.data_block_size * SECTOR_BYTES

    def target(self, length: int, table: ThinPoolTable | None = None) -> Target:
        """Return the thin-pool target line for a table of length sectors."""
        return ThinPoolLine(length, table or self.table).to_target()

    def length_for(self, data_bytes: int) -> int:
        """Return the table length (sectors, whole blocks) for a data device of data_bytes."""
        block = self.settings.data_block_size
        return data_bytes // SECTOR_BYTES // block * block

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

    def live_length(self, dm: DeviceMapperApi, at_least: int = 0) -> int:
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

    def reload(self, kernel: Kernel, table: ThinPoolTable | None = None) -> int:
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


def _retrying(call: Callable[[], _T]) -> _T:
    for attempt in range(_ROLLBACK_ATTEMPTS):
        try:
            return call()
        except ThinwatchError:
            if attempt == _ROLLBACK_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def ensure_resumed(kernel: Kernel, pool: Pool) -> None:
    """Leave the pool resumed, on the longest valid table, whatever interrupted a reload.

    A resume whose preresume fails (a table shorter than the pool's recorded size) leaves the
    device suspended with that table active; a crash or another process between suspend and
    resume leaves it suspended too. Every writer of a suspended pool hangs, so: drop any
    inactive table, then try the tables the kernel could accept, longest first (the data loop's
    whole size, our last good length, the active one), and resume.
    """
    dm, name = kernel.dm, pool.name
    try:
        info = _retrying(lambda: dm.info(name))
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
            _retrying(lambda: dm.clear_table(name))
        except ThinwatchError:
            # A stale inactive table would be swapped in by the next resume, anyone's: replace
            # it with a valid one below and resume now.
            info = dataclasses.replace(info, suspended=True)
    if not info.suspended:
        return
    lengths = {pool.length}
    failure: ThinwatchError | None = None
    # Each figure is one more candidate; one that cannot be read is no reason to stop here.
    try:
        lengths.add(pool.length_for(_retrying(lambda: kernel.loops.size(pool.data_loop))))
        active = thin_pool_target(_retrying(lambda: dm.table(name)))
        if active is not None:
            lengths.add(active.length)
    except ThinwatchError as exc:
        failure = exc
    for length in sorted(lengths - {0}, reverse=True):
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
        return
    try:
        kernel.nodes.resume_nowait(dm, name)  # as it is, if no table of ours is accepted
    except ThinwatchError as exc:
        raise PoolSetupError(
            f"pool {name} is SUSPENDED and the kernel refuses every table thinwatchd can build "
            f"({failure or exc}): its writers are blocked. See the kernel log (dmesg) and "
            f"dmsetup table {name}; dmsetup resume {name} once its data device is back"
        ) from exc


# -- building ------------------------------------------------------------------------------


def _loop_for(
    kernel: Kernel, index: LoopIndex, path: str, *, attach: bool, direct_io: bool = True
) -> LoopDevice | None:
    """Return the loop device backing path, attaching one if allowed; finish a capacity change."""
    loops = kernel.loops
    loop = index.find(path)
    if loop is None:
        if not attach:
            return None
        loop = loops.attach(path, direct_io=direct_io)
        index.add(loop)
        return loop
    info = kernel.files.inspect(path)
    file_size, loop_size = (info.size if info else 0), loops.size(loop)
    if file_size > loop_size:
        loops.set_capacity(loop)  # a growth stopped between the file and the loop
        log.info("finished an interrupted growth of %s: loop capacity refreshed", path)
    elif file_size < loop_size:
        # Someone shrank the file under the loop: blocks past its end now fail with EIO. We
        # never shrink, and must not "fix" the loop to match: say so, loudly, and go on.
        log.error(
            "%s is %d bytes but its loop device %s is %d: the file was truncated behind "
            "thinwatchd's back; data past its end is gone and writes there will fail",
            path,
            file_size,
            loop.path,
            loop_size,
        )
    return loop


def _wanted_table(
    settings: PoolSettings, meta: LoopDevice, data: LoopDevice, low_water: int
) -> ThinPoolTable:
    return ThinPoolTable(
        device_number(meta.dev),
        device_number(data.dev),
        settings.data_block_size,
        low_water,
        tuple(settings.features),
    ).canonical()


def activate(
    settings: PoolSettings,
    kernel: Kernel,
    check_metadata: MetadataChecker | None = None,
    loops: LoopIndex | None = None,
) -> Pool:
    """Bring the configured pool up: create, adopt or recreate it, finishing interrupted growth.

    loops is the pass's index of loop devices, shared by the pools activated together (one
    scan for all of them); without it, this activation scans for itself. Raise
    PoolMismatchError if a device of that name exists but is not this pool (it is left
    untouched), PoolSetupError if the files are inconsistent, KernelError on a kernel failure.
    """
    dm = kernel.dm
    index = loops if loops is not None else LoopIndex(kernel.loops, kernel.files)
    info = dm.info(settings.name)
    if info is not None and info.active_present:
        return _adopt(settings, kernel, index)
    if info is not None and (info.open_count or info.uuid):
        raise PoolMismatchError(
            f"pool {settings.name}: a device of that name exists with no active table and is "
            f"open or has a uuid ({info.uuid or 'none'}); thinwatchd did not leave it. Inspect it "
            f"(dmsetup info {settings.name}) and remove it if it is stale"
        )
    if info is not None:
        # What a crash between our DM_DEV_CREATE and the first resume leaves: unused, no uuid,
        # no active table. Nothing can depend on it; build the pool afresh.
        dm.remove(settings.name)
        log.warning(
            "pool %s: removed a table-less device left by an interrupted creation", settings.name
        )
    new = prepare_files(settings, kernel.files)
    meta_loop = _loop_for(
        kernel, index, str(settings.metadata_file), attach=True, direct_io=settings.direct_io
    )
    data_loop = _loop_for(
        kernel, index, str(settings.data_file), attach=True, direct_io=settings.direct_io
    )
    assert meta_loop is not None and data_loop is not None
    if not new and check_metadata is not None:
        report = check_metadata(meta_loop.path)
        if report is not None:
            raise PoolSetupError(
                f"pool {settings.name}: thin_check found damaged metadata in "
                f"{settings.metadata_file}; not activating it. Repair it with thin_repair. {report}"
            )
    how = Activation.CREATED if new else Activation.RECREATED
    placeholder = _wanted_table(settings, meta_loop, data_loop, settings.low_water_mark)
    pool = Pool(settings, data_loop, meta_loop, placeholder, 0, how)
    length = pool.length_for(kernel.loops.size(data_loop))
    if length == 0:
        raise PoolSetupError(
            f"pool {settings.name}: data file {settings.data_file} is smaller than one block"
        )
    # The policy's mark (threshold included), so the first event comes when the policy wants it.
    mark = low_water_mark(settings, length // settings.data_block_size)
    pool.table = placeholder.with_low_water_mark(mark)
    dm.create(settings.name)
    try:
        dm.load_table(settings.name, [pool.target(length)])
        kernel.nodes.resume_synced(dm, settings.name)
    except ThinwatchError as cause:
        try:
            dm.remove(settings.name)
        except ThinwatchError as rollback:
            raise RollbackError(cause, rollback) from cause
        if isinstance(cause, KernelError) and cause.errno == errno.EINVAL and not new:
            raise PoolSetupError(
                f"pool {settings.name}: the kernel refused the pool over existing metadata "
                f"({cause}); the data file may be shorter than the pool it held. See the kernel "
                f"log (dmesg) for the reason"
            ) from cause
        raise
    pool.length = length
    return pool


def _adopt(settings: PoolSettings, kernel: Kernel, index: LoopIndex) -> Pool:
    """Adopt a running pool device after checking it is this pool; finish interrupted work."""
    dm, name = kernel.dm, settings.name
    active = dm.table(name)
    line = ThinPoolLine.from_targets(active)
    if line is None:
        kinds = ", ".join(t.target_type for t in active) or "none"
        raise PoolMismatchError(
            f"pool {name}: device {name} exists but is not a thin-pool (targets: {kinds}); "
            f"left untouched. Rename the pool in the config or remove that device"
        )
    current = line.table
    meta_loop = _loop_for(kernel, index, str(settings.metadata_file), attach=False)
    data_loop = _loop_for(kernel, index, str(settings.data_file), attach=False)
    wanted = {
        "metadata_dev": (meta_loop, settings.metadata_file),
        "data_dev": (data_loop, settings.data_file),
    }
    for key, (loop, path) in wanted.items():
        have = getattr(current, key)
        if loop is None or device_number(loop.dev) != have:
            backing = (
                "no loop device" if loop is None else f"{loop.path} ({device_number(loop.dev)})"
            )
            raise PoolMismatchError(
                f"pool {name}: running device {name} uses {key.replace('_', ' ')} {have}, but "
                f"{path} is on {backing}; left untouched. Fix pools.{name}."
                f"{'metadata_file' if key == 'metadata_dev' else 'data_file'} or remove the device"
            )
    if current.data_block_size != settings.data_block_size:
        raise PoolMismatchError(
            f"pool {name}: running device has data_block_size {current.data_block_size} but "
            f"pools.{name}.data_block_size is {settings.data_block_size}; the block size of an "
            f"existing pool cannot change. Set it back to {current.data_block_size}"
        )
    assert meta_loop is not None and data_loop is not None
    pool = Pool(settings, data_loop, meta_loop, current, active[0].length, Activation.ADOPTED)
    _finish_interrupted(pool, kernel)
    return pool


def _finish_interrupted(pool: Pool, kernel: Kernel) -> None:
    """Complete a growth a crash interrupted after the loop stage; resume a suspended pool."""
    dm = kernel.dm
    info = dm.info(pool.name)
    assert info is not None
    if info.suspended or info.inactive_present:
        # A crash (ours, or another process's) between load, suspend and resume.
        before = pool.length
        ensure_resumed(kernel, pool)
        pool.recovered.append(
            ("resumed a suspended pool" if info.suspended else "dropped a stale inactive table")
            + (f" (table {before} -> {pool.length} sectors)" if pool.length != before else "")
        )
    length = pool.length_for(kernel.loops.size(pool.data_loop))
    # The kernel uses at most METADATA_MAX_BYTES of the metadata device, however large.
    meta_bytes = min(kernel.loops.size(pool.meta_loop), METADATA_MAX_BYTES)
    status = pool.read_status(dm)
    meta_stale = (
        isinstance(status, ThinPoolWorkingStatus)
        and status.meta_total < meta_bytes // META_BLOCK_BYTES
    )
    if length > pool.length or meta_stale:
        old = pool.length
        pool.reload(kernel)
        pool.recovered.append(
            f"finished an interrupted growth: table {old} -> {pool.length} sectors"
            + (", metadata device re-read" if meta_stale else "")
        )
