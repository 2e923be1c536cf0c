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

import enum
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from thinwatchd.errors import KernelError, PoolMismatchError, RollbackError, ThinwatchError
from thinwatchd.kernel.api import DeviceMapperApi, LoopControlApi, LoopDevice, Target
from thinwatchd.kernel.fs import (
    allocated_bytes,
    create_regular_file,
    grow_file,
    header_is_zero,
    regular_file_size,
    zero_header,
)
from thinwatchd.policy import low_water_mark
from thinwatchd.settings import METADATA_MAX_BYTES, PoolSettings
from thinwatchd.status import (
    ThinPoolStatus,
    ThinPoolTable,
    ThinPoolWorkingStatus,
    device_number,
    parse_pool_status,
    parse_pool_table,
    table_differences,
)
from thinwatchd.units import META_BLOCK_BYTES, SECTOR_BYTES

__all__ = ["Activation", "Kernel", "Pool", "PoolSetupError", "activate"]

log = logging.getLogger("thinwatchd")


class PoolSetupError(ThinwatchError):
    """A pool cannot be built or adopted safely; nothing was changed that could lose data."""


class DeviceNodes(Protocol):
    """Keeps /dev/mapper/<name> in step with the kernel (udev sync, or mknod without udev)."""

    def resume_synced(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name and return once /dev/mapper/<name> exists."""

    def resume_nowait(self, dm: DeviceMapperApi, name: str) -> None:
        """Resume name without waiting for udev (the node already exists)."""


class MetadataChecker(Protocol):
    """Runs thin_check on a metadata device before a pool is activated over it."""

    def __call__(self, metadata_path: str) -> str | None:
        """Return None if the metadata is sound (or no checker is installed), else the report."""


@dataclass
class Kernel:
    """The kernel interfaces a pool needs."""

    dm: DeviceMapperApi
    loops: LoopControlApi
    nodes: DeviceNodes


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
        return Target(0, length, "thin-pool", (table or self.table).params())

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
        targets = dm.status(self.name, noflush=True)
        if len(targets) != 1 or targets[0].target_type != "thin-pool":
            raise PoolMismatchError(f"pool {self.name}: active table is no longer one thin-pool")
        return parse_pool_status(targets[0].params)

    def reload(
        self, dm: DeviceMapperApi, nodes: DeviceNodes, length: int, table: ThinPoolTable
    ) -> None:
        """Load (length, table) into the inactive slot and resume; the pool never stays suspended.

        On failure the old active table is restored (see ensure_resumed) and the error re-raised.
        """
        try:
            dm.load_table(self.name, [self.target(length, table)])
            nodes.resume_nowait(dm, self.name)
        except ThinwatchError as cause:
            try:
                ensure_resumed(dm, nodes, self)
            except ThinwatchError as rollback:
                raise RollbackError(cause, rollback) from cause
            raise
        self.length, self.table = length, table


def ensure_resumed(dm: DeviceMapperApi, nodes: DeviceNodes, pool: Pool) -> None:
    """Leave the pool resumed on its last good table, whatever a failed reload left behind.

    A resume whose preresume fails (e.g. the kernel refusing to shrink) leaves the device
    suspended with the new table already swapped in: put the old one back and resume.
    """
    info = dm.info(pool.name)
    if info is None:
        raise PoolSetupError(f"pool {pool.name}: device disappeared")
    if info.inactive_present:
        dm.clear_table(pool.name)
    if info.suspended:
        active = dm.table(pool.name)
        if not _is_table(active, pool.length, pool.table):
            dm.load_table(pool.name, [pool.target(pool.length)])
        nodes.resume_nowait(dm, pool.name)


def _is_table(active: list[Target], length: int, table: ThinPoolTable) -> bool:
    """Return whether the active table is exactly (length, table), however the kernel prints it."""
    if len(active) != 1 or active[0].target_type != "thin-pool" or active[0].length != length:
        return False
    try:
        return not table_differences(parse_pool_table(active[0].params), table)
    except ThinwatchError:
        return False


# -- building ------------------------------------------------------------------------------


def _prepare_files(settings: PoolSettings) -> bool:
    """Create whatever files a new pool lacks; return True if the pool is new (never activated).

    Raise PoolSetupError when the files on disk could hold a used pool that is incomplete: we
    never format metadata next to data that may be reachable, nor attach used metadata to a
    data file we would have to invent.
    """
    data, meta = str(settings.data_file), str(settings.metadata_file)
    data_exists = _exists_regular(data, f"pools.{settings.name}.data_file")
    meta_exists = _exists_regular(meta, f"pools.{settings.name}.metadata_file")
    if meta_exists and not header_is_zero(meta):
        if not data_exists:
            raise PoolSetupError(
                f"pool {settings.name}: metadata file {meta} holds a used pool but data file "
                f"{data} is missing; refusing to create an empty one (the thin volumes would read "
                f"zeros). Restore the data file or fix pools.{settings.name}.data_file"
            )
        return False
    # Data written but no used metadata: a lost or mistyped metadata file, never our own
    # interrupted creation (it makes the metadata first, and writes no data) unless the data
    # file was preallocated. Formatting would make that data unrecoverable.
    if data_exists and allocated_bytes(data) > 0 and not (meta_exists and settings.preallocate):
        state = "is missing" if not meta_exists else "has never been used (all-zero header)"
        raise PoolSetupError(
            f"pool {settings.name}: data file {data} holds data but metadata file {meta} "
            f"{state}; refusing to format new metadata over it. Restore the metadata file or fix "
            f"pools.{settings.name}.metadata_file"
        )
    # A new pool (or a creation interrupted part-way): metadata first, its zero header is the mark.
    if not meta_exists:
        create_regular_file(meta, settings.metadata_size, preallocate=settings.preallocate)
        zero_header(meta)  # a new file reads as zeros already; make the format explicit
    elif regular_file_size(meta) < settings.metadata_size:
        grow_file(meta, settings.metadata_size, preallocate=settings.preallocate)
    if not data_exists:
        create_regular_file(data, settings.data_size, preallocate=settings.preallocate)
    elif regular_file_size(data) < settings.data_size:
        grow_file(data, settings.data_size, preallocate=settings.preallocate)
    return True


def _exists_regular(path: str, key: str) -> bool:
    """Return whether path exists; raise PoolSetupError if it is anything but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise PoolSetupError(
            f"{key}: {path} is {kind}; thinwatchd only backs pools with regular files it can "
            f"open without following links. Point {key} at the real file"
        )
    return True


def _loop_for(
    loops: LoopControlApi, path: str, *, attach: bool, direct_io: bool = True
) -> LoopDevice | None:
    """Return the loop device backing path, attaching one if allowed; finish a capacity change."""
    loop = loops.find(path)
    if loop is None:
        return loops.attach(path, direct_io=direct_io) if attach else None
    file_size, loop_size = regular_file_size(path), loops.size(loop)
    if file_size > loop_size:
        loops.set_capacity(loop)  # a growth stopped between the file and the loop
        log.info("finished an interrupted growth of %s: loop capacity refreshed", path)
    elif file_size < loop_size:
        # Someone shrank the file under the loop: blocks past its end now fail with EIO. We
        # never shrink, and must not "fix" the loop to match: say so, loudly, and go on.
        log.error("%s is %d bytes but its loop device %s is %d: the file was truncated behind "
                  "thinwatchd's back; data past its end is gone and writes there will fail",
                  path, file_size, loop.path, loop_size)  # fmt: skip
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
    settings: PoolSettings, kernel: Kernel, check_metadata: MetadataChecker | None = None
) -> Pool:
    """Bring the configured pool up: create, adopt or recreate it, finishing interrupted growth.

    Raise PoolMismatchError if a device of that name exists but is not this pool (it is left
    untouched), PoolSetupError if the files are inconsistent, KernelError on a kernel failure.
    """
    dm, loops = kernel.dm, kernel.loops
    info = dm.info(settings.name)
    if info is not None and info.active_present:
        return _adopt(settings, kernel)
    if info is not None:
        raise PoolMismatchError(
            f"pool {settings.name}: a device of that name exists with no active table; it was "
            f"not made by thinwatchd or its creation failed. Inspect it (dmsetup info "
            f"{settings.name}) and remove it if it is stale"
        )
    new = _prepare_files(settings)
    meta_loop = _loop_for(
        loops, str(settings.metadata_file), attach=True, direct_io=settings.direct_io
    )
    data_loop = _loop_for(loops, str(settings.data_file), attach=True, direct_io=settings.direct_io)
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
    length = pool.length_for(loops.size(data_loop))
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


def _adopt(settings: PoolSettings, kernel: Kernel) -> Pool:
    """Adopt a running pool device after checking it is this pool; finish interrupted work."""
    dm, loops, name = kernel.dm, kernel.loops, settings.name
    active = dm.table(name)
    if len(active) != 1 or active[0].target_type != "thin-pool" or active[0].start != 0:
        kinds = ", ".join(t.target_type for t in active) or "none"
        raise PoolMismatchError(
            f"pool {name}: device {name} exists but is not a thin-pool (targets: {kinds}); "
            f"left untouched. Rename the pool in the config or remove that device"
        )
    current = parse_pool_table(active[0].params)
    meta_loop = _loop_for(loops, str(settings.metadata_file), attach=False)
    data_loop = _loop_for(loops, str(settings.data_file), attach=False)
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
    if info.inactive_present:
        dm.clear_table(pool.name)  # a half-done reload: we recompute it from the files
        pool.recovered.append("dropped a stale inactive table")
    length = max(pool.length, pool.length_for(kernel.loops.size(pool.data_loop)))
    # The kernel uses at most METADATA_MAX_BYTES of the metadata device, however large.
    meta_bytes = min(kernel.loops.size(pool.meta_loop), METADATA_MAX_BYTES)
    status = pool.read_status(dm) if not info.suspended else None
    meta_stale = (
        isinstance(status, ThinPoolWorkingStatus)
        and status.meta_total < meta_bytes // META_BLOCK_BYTES
    )
    if length > pool.length or meta_stale:
        old = pool.length
        pool.reload(dm, kernel.nodes, length, pool.table)
        pool.recovered.append(
            f"finished an interrupted growth: table {old} -> {length} sectors"
            + (", metadata device re-read" if meta_stale else "")
        )
    elif info.suspended:
        kernel.nodes.resume_nowait(dm, pool.name)
        pool.recovered.append("resumed a suspended pool")
