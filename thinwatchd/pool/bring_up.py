"""Bring a configured pool up: build it, or adopt it after a restart or reboot.

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

import errno
import logging

from thinwatchd.base.errors import (
    KernelError,
    PoolMismatchError,
    PoolSetupError,
    RollbackError,
    ThinwatchError,
)
from thinwatchd.base.units import DataBlocks, Sectors, bytes_to_meta_blocks, sectors_to_data_blocks
from thinwatchd.config.settings import METADATA_MAX_BYTES, PoolSettings
from thinwatchd.kernel.api import Kernel, LoopDevice, MetadataChecker
from thinwatchd.policy.low_water import low_water_mark
from thinwatchd.pool.files import prepare_files
from thinwatchd.pool.loop_index import LoopIndex
from thinwatchd.pool.running import Activation, Pool, ensure_resumed
from thinwatchd.thin.status import ThinPoolWorkingStatus
from thinwatchd.thin.table import ThinPoolLine, ThinPoolTable, device_number

__all__ = ["activate"]

log = logging.getLogger("thinwatchd")


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


def _refuse_loops_in_use(
    kernel: Kernel, settings: PoolSettings, attached: dict[str, LoopDevice]
) -> None:
    """Refuse to build a pool on a loop that a live table maps (another pool's, thinwatchd's or
    not: a reload that handed a running pool's file to a new one). The kernel refuses a
    metadata device in use, but maps one data device into two pools, and the new pool's
    metadata would then give away the other's blocks. Only when a loop already backed the
    file: one table per device, read only then (a reboot's rebuild attaches new loops)."""
    ours = {device_number(loop.dev): (key, loop) for key, loop in attached.items()}
    for device in kernel.dm.list_devices():
        for target in kernel.dm.table(device.name):
            for token in target.params.split():
                if token in ours:
                    key, loop = ours[token]
                    raise PoolSetupError(
                        f"pools.{settings.name}.{key}: {getattr(settings, key)} is mapped by "
                        f"the live device {device.name} (through {loop.path}); a pool of its "
                        f"own would hand out that pool's blocks. Point pools.{settings.name}."
                        f"{key} at another file, or remove {device.name} first"
                    )


def _wanted_table(
    settings: PoolSettings, meta: LoopDevice, data: LoopDevice, low_water: DataBlocks
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
    own_suspend: bool = False,
) -> Pool:
    """Bring the configured pool up: create, adopt or recreate it, finishing interrupted growth.

    loops is the pass's index of loop devices, shared by the pools activated together (one
    scan for all of them); without it, this activation scans for itself. own_suspend: our
    last instance left this pool suspended (its resume refused), so a suspend found is ours
    to undo; any other is left to whoever made it (see _finish_interrupted). Raise
    PoolMismatchError if a device of that name exists but is not this pool (it is left
    untouched), PoolSetupError if the files are inconsistent, KernelError on a kernel failure.
    """
    dm = kernel.dm
    index = loops if loops is not None else LoopIndex(kernel.loops, kernel.files)
    info = dm.info(settings.name)
    if info is not None and info.active_present:
        return _adopt(settings, kernel, index, own_suspend)
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

    def refuse_loops_in_use() -> None:  # before anything is made: a refusal leaves nothing
        attached = {
            key: loop
            for key in ("metadata_file", "data_file")
            if (loop := index.find(str(getattr(settings, key)))) is not None
        }
        if attached:
            _refuse_loops_in_use(kernel, settings, attached)

    new = prepare_files(settings, kernel.files, before_making=refuse_loops_in_use)
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
    pool = Pool(settings, data_loop, meta_loop, placeholder, Sectors(0), how)
    length = pool.length_for(kernel.loops.size(data_loop))
    if length == 0:
        raise PoolSetupError(
            f"pool {settings.name}: data file {settings.data_file} is smaller than one block"
        )
    # The policy's mark (threshold included), so the first event comes when the policy wants it.
    mark = low_water_mark(settings, sectors_to_data_blocks(length, settings.data_block_size))
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


def _adopt(settings: PoolSettings, kernel: Kernel, index: LoopIndex, own_suspend: bool) -> Pool:
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
    _finish_interrupted(pool, kernel, own_suspend)
    return pool


def _finish_interrupted(pool: Pool, kernel: Kernel, own_suspend: bool) -> None:
    """Complete a growth a crash interrupted after the loop stage; resume a suspended pool
    that is ours to resume.

    A pool suspended on a valid table with no table loaded behind it is what `dmsetup
    suspend` leaves, and what our own refused resume leaves (own_suspend says which, from the
    record our last instance kept). Someone else's is left as it is: the running daemon says
    so and grows it once it is resumed. Any other suspended state is an interrupted reload
    (an inactive table loaded) or a refused one (an active table shorter than the pool):
    nobody's resume would ever complete it, so it is resumed on the longest valid table.
    """
    dm = kernel.dm
    info = dm.info(pool.name)
    assert info is not None
    someone_elses = info.suspended and not info.inactive_present and not own_suspend
    recorded = pool.recorded_length(dm) if someone_elses else None
    if someone_elses and (recorded is None or recorded <= pool.length):  # not a refused resume
        return  # the first check says so, once, as for a suspend while the daemon runs
    if info.suspended or info.inactive_present:
        # A crash (ours, or another process's) between load, suspend and resume, or a resume
        # the kernel refused (our last instance's growth).
        before = pool.length
        try:
            ensure_resumed(kernel, pool)
        except PoolSetupError as exc:
            # Adopted all the same: its writers wait either way, and the daemon keeps trying
            # to resume it with backoff; failing the start would leave nobody trying.
            pool.left_suspended = True
            pool.recovered.append(f"found suspended and cannot resume it yet: {exc}")
            return
        pool.recovered.append(
            ("resumed a suspended pool" if info.suspended else "dropped a stale inactive table")
            + (f" (table {before} -> {pool.length} sectors)" if pool.length != before else "")
        )
    length = pool.length_for(kernel.loops.size(pool.data_loop))
    # The kernel uses at most METADATA_MAX_BYTES of the metadata device, however large.
    meta_bytes = min(kernel.loops.size(pool.meta_loop), METADATA_MAX_BYTES)
    status = pool.read_status(dm)
    meta_stale = isinstance(
        status, ThinPoolWorkingStatus
    ) and status.meta_total < bytes_to_meta_blocks(meta_bytes)
    if length > pool.length or meta_stale:
        old = pool.length
        pool.reload(kernel)
        pool.recovered.append(
            f"finished an interrupted growth: table {old} -> {pool.length} sectors"
            + (", metadata device re-read" if meta_stale else "")
        )
