"""An in-memory kernel for engine tests: dm thin-pools over loop devices over real files.

It models what thinwatchd relies on, as the real kernel does it (each claim is also checked on
the real kernel by tests/contract/):

- DM_DEV_CREATE makes a suspended device with no table; TABLE_LOAD fills the inactive slot;
  resume swaps it in. A thin-pool's data size is the table length in whole blocks; a table
  longer than the data loop is refused at load; a shorter one than the pool is refused at resume.
- The metadata survives the device (it lives "in the metadata file"): a pool recreated over the
  same metadata file keeps its sizes and usage; a zeroed header formats a new pool.
- The data low-water event fires on allocation, once per resume; the metadata one likewise;
  every mode change fires an event. Events bump the device's event_nr and a global counter;
  ``fileno()`` polls readable while the global counter is ahead of the last ``arm_poll()``.
- Out of data space: queue_if_no_space parks writes until the pool grows; error_if_no_space
  fails them. needs_check makes growth a silent no-op at resume, as the kernel does.
- Loop devices capture the backing file size at attach and at LOOP_SET_CAPACITY only.
- File syscalls are the real ones on real files (``FakeKernel.syscalls``), through the same hook:
  any dm, loop or file call can be made to fail with any errno (``fail``).
- Thread-safe: the daemon reconciles pools in threads side by side, so every call runs under
  one lock, except a pool's drain at resume (``draining``: the real suspend waits for that
  pool's in-flight I/O only) and a file syscall made to stall (``stall``), which wait outside
  it, so other pools' calls go on meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel.api import DeviceMapperApi, DmDevice, DmInfo, LoopDevice, Target
from thinwatchd.kernel.syscalls import Syscalls

SECTOR = 512
META_BLOCK = 4096


@dataclass
class Fault:
    """Fail calls of op with errno: skip `after` matching calls, then fail `times` (None: all)."""

    op: str
    errno: int
    after: int = 0
    times: int | None = 1
    target: str = ""  # only calls whose device or path contains this

    def matches(self, op: str, target: str) -> bool:
        return op == self.op and self.target in target


class FaultySyscalls(Syscalls):
    """The real file syscalls, recorded in the fake kernel's call list and failable like it."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def _enter(self, op: str, target: str) -> None:
        self.kernel._wait_if_stalled(op, target)
        self.kernel._inject(op, target, OSError)


@dataclass
class PoolMetadata:
    """What the kernel keeps in the metadata device's superblock and btrees."""

    data_total: int = 0  # blocks recorded in the superblock (0 = freshly formatted)
    # The data space map's size in memory, when a resize is not committed yet: a preresume
    # that failed after resizing it (the real kernel's sm_disk_extend grows it by the
    # difference from the *committed* size each time, so refused resumes add up).
    data_in_memory: int | None = None
    data_used: int = 0
    meta_used: int = 6  # a fresh pool's metadata already holds a few blocks
    meta_total: int = 0  # metadata blocks as of the last (pre)resume: the kernel reads it then
    transaction_id: int = 0
    needs_check: bool = False
    thins: set[int] = field(default_factory=set)

    def commit(self) -> None:
        """Record what is in memory, as a metadata commit does."""
        if self.data_in_memory is not None:
            self.data_total, self.data_in_memory = self.data_in_memory, None


@dataclass
class PoolRuntime:
    """Per-activation state of a thin-pool target."""

    metadata: PoolMetadata
    meta_key: tuple[int, int]
    data_loop: int
    meta_loop: int
    block_sectors: int
    low_water: int
    error_if_no_space: bool
    mode: str = "rw"
    data_lw_fired: bool = False
    meta_lw_fired: bool = False
    queued_blocks: int = 0  # writes parked by queue_if_no_space
    failed_writes: int = 0  # block writes failed with ENOSPC (error_if_no_space)


@dataclass
class FakeDevice:
    name: str
    minor: int
    event_nr: int = 0
    suspended: bool = True
    active: list[Target] | None = None
    inactive: list[Target] | None = None
    pool: PoolRuntime | None = None


@dataclass
class FakeLoop:
    index: int
    path: str
    st_dev: int
    st_ino: int
    capacity: Bytes  # as of attach / last set_capacity


class FakeKernel:
    """Implements DeviceMapperApi and LoopControlApi in memory (files stay real)."""

    DM_MAJOR = 253
    LOOP_MAJOR = 7

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.loops: dict[int, FakeLoop] = {}
        self.metadata: dict[tuple[int, int], PoolMetadata] = {}
        self.global_events = 0
        self._armed_at = 0
        self._next_minor = 0
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe_full = False
        self.calls: list[str] = []  # every op, in order, for assertions
        self.fail_next: dict[str, int] = {}  # op name -> errno to raise once
        self.faults: list[Fault] = []
        self.kernel_log: list[str] = []
        self.syscalls = FaultySyscalls(self)
        self.lock = threading.RLock()
        # Pool name -> what its resume waits for first, outside the lock (a slow drain).
        self.draining: dict[str, Callable[[], object]] = {}
        self._stalls: list[tuple[str, str, Callable[[], object]]] = []
        self._preresume_faults: dict[str, tuple[int, int]] = {}  # name -> (errno, times)

    def stall(self, op: str, target: str, wait: Callable[[], object]) -> None:
        """Make file syscalls op on paths containing target call wait() first, outside the lock
        (a backing filesystem that stalls)."""
        self._stalls.append((op, target, wait))

    def _wait_if_stalled(self, op: str, target: str) -> None:
        for stalled_op, stalled_target, wait in list(self._stalls):
            if op == stalled_op and stalled_target in target:
                wait()

    def close(self) -> None:
        os.close(self._pipe_r)
        os.close(self._pipe_w)

    # -- fault injection -------------------------------------------------------------------

    def fail(
        self, op: str, err: int, *, after: int = 0, times: int | None = 1, target: str = ""
    ) -> Fault:
        """Make calls of op (a dm/loop ioctl name or a file syscall name) fail with err."""
        fault = Fault(op, err, after, times, target)
        self.faults.append(fault)
        return fault

    def _inject(self, op: str, target: str, kind: type[Exception]) -> None:
        self.calls.append(f"{op} {target}")
        err = self.fail_next.pop(op, None)
        for fault in self.faults:
            if err is None and fault.matches(op, target):
                if fault.after > 0:
                    fault.after -= 1
                elif fault.times is None or fault.times > 0:
                    err = fault.errno
                    if fault.times is not None:
                        fault.times -= 1
        if err is not None:
            if kind is OSError:
                raise OSError(err, f"{os.strerror(err)} (injected)")
            raise KernelError(op, target, err, "injected")

    def _enter(self, op: str, device: str) -> None:
        self._inject(op, device, KernelError)

    # -- events ----------------------------------------------------------------------------

    def _event(self, dev: FakeDevice) -> None:
        dev.event_nr += 1
        self.global_events += 1
        if not self._pipe_full:
            os.write(self._pipe_w, b"!")
            self._pipe_full = True

    def fileno(self) -> int:
        return self._pipe_r

    def arm_poll(self) -> None:
        self._enter("DM_DEV_ARM_POLL", "")
        self._armed_at = self.global_events
        with contextlib.suppress(BlockingIOError):
            os.read(self._pipe_r, 64)
        self._pipe_full = False

    # -- device-mapper ---------------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        return (4, 47, 0)

    def _get(self, op: str, name: str) -> FakeDevice:
        self._enter(op, name)
        dev = self.devices.get(name)
        if dev is None:
            raise KernelError(op, name, errno.ENXIO)
        return dev

    def list_devices(self) -> list[DmDevice]:
        self._enter("DM_LIST_DEVICES", "")
        return [
            DmDevice(d.name, os.makedev(self.DM_MAJOR, d.minor), d.event_nr)
            for d in self.devices.values()
        ]

    def info(self, name: str) -> DmInfo | None:
        self._enter("DM_DEV_STATUS", name)
        dev = self.devices.get(name)
        if dev is None:
            return None
        return DmInfo(
            name=name,
            uuid="",
            dev=os.makedev(self.DM_MAJOR, dev.minor),
            event_nr=dev.event_nr,
            open_count=0,
            target_count=len(dev.active or []),
            suspended=dev.suspended,
            read_only=False,
            active_present=dev.active is not None,
            inactive_present=dev.inactive is not None,
        )

    def create(self, name: str, uuid: str = "") -> DmInfo:
        self._enter("DM_DEV_CREATE", name)
        if name in self.devices:
            raise KernelError("DM_DEV_CREATE", name, errno.EBUSY)
        # A new device has no table and reports itself NOT suspended (seen on 6.1).
        self.devices[name] = FakeDevice(name, self._next_minor, suspended=False)
        self._next_minor += 1
        self.global_events += 1  # create bumps the global counter (dm_issue_global_event)
        info = self.info(name)
        assert info is not None
        return info

    def remove(self, name: str, cookie: int = 0) -> bool:
        self._get("DM_DEV_REMOVE", name)
        del self.devices[name]
        self.global_events += 1
        return True  # the kernel always emits a 'remove' uevent

    def load_table(self, name: str, targets: Sequence[Target]) -> None:
        dev = self._get("DM_TABLE_LOAD", name)
        for target in targets:
            if target.target_type == "thin-pool":
                self._check_pool_table(name, target)
        dev.inactive = list(targets)

    def clear_table(self, name: str) -> None:
        self._get("DM_TABLE_CLEAR", name).inactive = None

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        self._get("DM_DEV_SUSPEND", name).suspended = True

    def resume(self, name: str, cookie: int = 0) -> bool:
        drain = self.draining.get(name)
        if drain is not None:
            drain()
        return self._resume(name, cookie)

    def _resume(self, name: str, cookie: int) -> bool:
        dev = self._get("DM_DEV_RESUME", name)
        if dev.inactive is None:
            if dev.active is None:
                raise KernelError("DM_DEV_RESUME", name, errno.EINVAL, "no table")
            pool_target = next((t for t in dev.active if t.target_type == "thin-pool"), None)
            if dev.suspended and pool_target is not None:
                # dm_resume() of a suspended device runs the active table's preresume again.
                dev.pool = self._preresume(dev, pool_target)
            dev.suspended = False
            return False
        new = dev.inactive
        dev.suspended = True  # the kernel suspends, swaps and (pre)resumes by itself
        pool_target = next((t for t in new if t.target_type == "thin-pool"), None)
        old_size = sum(t.length for t in dev.active or [])
        if pool_target is not None:
            # dm_swap_table() checks the device areas (dm_calculate_queue_limits): a table longer
            # than its data device fails there, leaving the device suspended on the old table.
            _m, data, *_ = self._parse_pool_params(name, pool_target.params)
            if pool_target.start + pool_target.length > data.capacity // SECTOR:
                dev.inactive = None
                raise KernelError("DM_DEV_RESUME", name, errno.EINVAL, "device too small")
            # pool_preresume failing leaves the device suspended with the new table swapped in.
            dev.active, dev.inactive = new, None
            dev.pool = self._preresume(dev, pool_target)
        else:
            dev.active, dev.inactive = new, None
        dev.suspended = False
        if dev.pool is not None:
            dev.pool.data_lw_fired = False
            dev.pool.meta_lw_fired = False
            self._update_mode(dev)
            self._drain_queue(dev)
        return sum(t.length for t in new) != old_size

    def table(self, name: str) -> list[Target]:
        dev = self._get("DM_TABLE_STATUS", name)
        return list(dev.active or [])

    def status(self, name: str, *, noflush: bool = False) -> list[Target]:
        dev = self._get("DM_TABLE_STATUS", name)
        if not noflush and not dev.suspended and dev.pool is not None:
            dev.pool.metadata.commit()  # pool_status() commits first, unless NOFLUSH
        out = []
        for t in dev.active or []:
            text = self._pool_status(dev) if t.target_type == "thin-pool" else ""
            out.append(Target(t.start, t.length, t.target_type, text))
        return out

    def wait(self, name: str, event_nr: int) -> int:
        return self._get("DM_DEV_WAIT", name).event_nr

    def message(self, name: str, message: str, sector: int = 0) -> str:
        dev = self._get("DM_TARGET_MSG", name)
        if dev.pool is None:
            raise KernelError("DM_TARGET_MSG", name, errno.EINVAL)
        words = message.split()
        if words[:1] == ["create_thin"]:
            dev.pool.metadata.thins.add(int(words[1]))
            return ""
        raise KernelError("DM_TARGET_MSG", name, errno.EINVAL, f"unsupported {message!r}")

    # -- loop ------------------------------------------------------------------------------

    def list_loops(self) -> list[LoopDevice]:
        """Every bound loop, lowest index first, as the real scan finds them: one
        LOOP_GET_STATUS64 per loop (kernel/loop.py opens each loop and asks it)."""
        found = []
        for index in sorted(self.loops):
            self._enter("LOOP_GET_STATUS64", f"/dev/loop{index}")
            found.append(self._loop_record(self.loops[index]))
        return found

    def find(self, path: str) -> LoopDevice | None:
        # As the real LoopControl.find: a scan of every loop per call, so the calls recorded
        # grow with the loops attached (what a lookup per pool costs the real kernel).
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        for loop in self.list_loops():
            if (loop.backing_dev, loop.backing_inode) == (st.st_dev, st.st_ino):
                return loop
        return None

    def attach(self, path: str, *, direct_io: bool = False) -> LoopDevice:
        self._enter("LOOP_CONFIGURE", path)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        index = max(self.loops, default=-1) + 1
        self.loops[index] = FakeLoop(index, path, st.st_dev, st.st_ino, Bytes(st.st_size))
        return self._loop_record(self.loops[index])

    def _verified(self, op: str, loop: LoopDevice) -> FakeLoop:
        """The loop, if it still backs the file it was attached to: ENXIO otherwise, as the
        real LoopControl's LOOP_GET_STATUS64 check before each ioctl on a loop."""
        self._enter(op, loop.path)
        lo = self.loops.get(loop.index)
        if lo is None or (lo.st_dev, lo.st_ino) != (loop.backing_dev, loop.backing_inode):
            what = "is not bound" if lo is None else "now backs another file"
            raise KernelError(op, loop.path, errno.ENXIO, what)
        return lo

    def set_capacity(self, loop: LoopDevice) -> None:
        lo = self._verified("LOOP_SET_CAPACITY", loop)
        lo.capacity = Bytes(os.stat(lo.path).st_size)

    def size(self, loop: LoopDevice) -> Bytes:
        return self._verified("BLKGETSIZE64", loop).capacity

    def detach(self, loop: LoopDevice) -> None:
        del self.loops[loop.index]

    def _loop_record(self, lo: FakeLoop) -> LoopDevice:
        return LoopDevice(lo.index, lo.st_dev, lo.st_ino, os.makedev(self.LOOP_MAJOR, lo.index))

    # -- what a writer does ----------------------------------------------------------------

    def write_blocks(self, name: str, blocks: int) -> int:
        """Allocate data blocks in pool `name` as a writer would; return blocks written now."""
        dev = self.devices[name]
        pool = dev.pool
        assert pool is not None and not dev.suspended
        written = 0
        # A write commits what is in memory within a second (COMMIT_PERIOD): at once here.
        pool.metadata.commit()
        device_blocks = self.loops[pool.data_loop].capacity // (pool.block_sectors * 512)
        for _ in range(blocks):
            if pool.mode in ("ro", "fail"):
                pool.failed_writes += 1
                continue
            if pool.metadata.data_used >= pool.metadata.data_total:
                if pool.mode != "out_of_data_space":
                    pool.mode = "out_of_data_space"
                    self.kernel_log.append(f"{name}: switching pool to out-of-data-space")
                    self._event(dev)
                if pool.error_if_no_space:
                    pool.failed_writes += 1
                else:
                    pool.queued_blocks += 1
                continue
            if pool.metadata.data_used >= device_blocks:  # recorded, but not on the device
                pool.failed_writes += 1
                self.kernel_log.append(f"{name}: I/O error past the end of the data device")
                continue
            self._allocate(dev)
            written += 1
        return written

    def _allocate(self, dev: FakeDevice) -> None:
        pool = dev.pool
        assert pool is not None
        md = pool.metadata
        md.data_used += 1
        if md.data_used % 64 == 0:
            md.meta_used += 1  # mappings cost metadata too
        free = md.data_total - md.data_used
        if free <= pool.low_water and not pool.data_lw_fired:
            pool.data_lw_fired = True
            self.kernel_log.append(f"{dev.name}: reached low water mark for data device")
            self._event(dev)
        meta_total = self._meta_total(pool)
        if meta_total - md.meta_used <= self._meta_threshold(pool) and not pool.meta_lw_fired:
            pool.meta_lw_fired = True
            self.kernel_log.append(f"{dev.name}: reached low water mark for metadata device")
            self._event(dev)

    def _drain_queue(self, dev: FakeDevice) -> None:
        pool = dev.pool
        assert pool is not None
        while pool.queued_blocks and pool.metadata.data_used < pool.metadata.data_total:
            pool.queued_blocks -= 1
            self._allocate(dev)

    # -- thin-pool internals ---------------------------------------------------------------

    def _loop_by_dev(self, spec: str, device: str) -> FakeLoop:
        major, _, minor = spec.partition(":")
        if not minor.isdigit() or int(major) != self.LOOP_MAJOR or int(minor) not in self.loops:
            raise KernelError("DM_TABLE_LOAD", device, errno.ENXIO, f"no device {spec}")
        return self.loops[int(minor)]

    def _parse_pool_params(
        self, name: str, params: str
    ) -> tuple[FakeLoop, FakeLoop, int, int, list[str]]:
        words = params.split()
        if len(words) < 4:
            raise KernelError("DM_TABLE_LOAD", name, errno.EINVAL, "thin-pool: too few args")
        meta = self._loop_by_dev(words[0], name)
        data = self._loop_by_dev(words[1], name)
        block, low_water = int(words[2]), int(words[3])
        features = words[5 : 5 + int(words[4])] if len(words) > 4 else []
        return meta, data, block, low_water, features

    def _check_pool_table(self, name: str, target: Target) -> None:
        meta, _data, block, _lw, _features = self._parse_pool_params(name, target.params)
        if block < 128 or block % 128:
            raise KernelError("DM_TABLE_LOAD", name, errno.EINVAL, "invalid block size")
        for other in self.devices.values():
            if other.name != name and other.pool is not None and other.pool.meta_loop == meta.index:
                raise KernelError("DM_TABLE_LOAD", name, errno.EBUSY, "metadata device in use")

    def fail_preresume(self, name: str, code: int, times: int) -> None:
        """Make pool_preresume of name fail the next `times` resumes with errno code (a
        metadata commit that fails): the device stays suspended, the new table swapped in."""
        self._preresume_faults[name] = (code, times)

    def _preresume(self, dev: FakeDevice, target: Target) -> PoolRuntime:
        meta, data, block, low_water, features = self._parse_pool_params(dev.name, target.params)
        key = (meta.st_dev, meta.st_ino)
        md = self.metadata.get(key)
        if md is None or self._header_is_zero(meta.path):
            md = self.metadata[key] = PoolMetadata()
            with open(meta.path, "r+b") as f:  # the kernel formats: writes its superblock
                f.write(b"fake thin-pool superblock")
        prior = dev.pool
        if prior is not None and prior.meta_key == key:
            pool = prior
            pool.low_water = low_water
            pool.error_if_no_space = "error_if_no_space" in features
            pool.data_loop = data.index
        else:
            pool = PoolRuntime(
                md, key, data.index, meta.index, block, low_water, "error_if_no_space" in features
            )
            if md.needs_check:
                pool.mode = "ro"
        # maybe_resize_data_dev(), against the committed size; the resize stays in memory
        # until the commit at the end of a preresume that succeeds.
        wanted = target.length // block
        if wanted < md.data_total:
            raise KernelError(
                "DM_DEV_RESUME",
                dev.name,
                errno.EINVAL,
                f"pool target ({wanted} blocks) too small: expected {md.data_total}",
            )
        if wanted > md.data_total:
            if md.needs_check and md.data_total:
                self.kernel_log.append(
                    f"{dev.name}: unable to grow the data device until repaired."
                )
            else:
                if md.data_total:
                    self.kernel_log.append(
                        f"{dev.name}: growing the data device from {md.data_total} to "
                        f"{wanted} blocks"
                    )
                in_memory = md.data_total if md.data_in_memory is None else md.data_in_memory
                md.data_in_memory = in_memory + wanted - md.data_total
        # maybe_resize_metadata_dev(): the metadata device's size is read at preresume only,
        # and may not be less than the superblock records.
        meta_blocks = meta.capacity // META_BLOCK
        if meta_blocks < md.meta_total:
            raise KernelError(
                "DM_DEV_RESUME",
                dev.name,
                errno.EINVAL,
                f"metadata device ({meta_blocks} blocks) too small: expected {md.meta_total}",
            )
        code, times = self._preresume_faults.get(dev.name, (0, 0))
        if times > 0:  # the commit fails: what was resized stays in memory
            self._preresume_faults[dev.name] = (code, times - 1)
            raise KernelError("DM_DEV_RESUME", dev.name, code, "pool_preresume failed")
        md.meta_total = max(md.meta_total, meta_blocks)
        md.commit()
        return pool

    @staticmethod
    def _header_is_zero(path: str) -> bool:
        with open(path, "rb") as f:
            return not any(f.read(META_BLOCK))

    def _meta_total(self, pool: PoolRuntime) -> int:
        return pool.metadata.meta_total

    def _meta_threshold(self, pool: PoolRuntime) -> int:
        # calc_metadata_threshold() looks at the live device size, not the recorded one
        return min(1024, self.loops[pool.meta_loop].capacity // META_BLOCK // 4)

    def _update_mode(self, dev: FakeDevice) -> None:
        pool = dev.pool
        assert pool is not None
        if pool.mode == "out_of_data_space" and pool.metadata.data_used < pool.metadata.data_total:
            pool.mode = "rw"
            self._event(dev)

    def _pool_status(self, dev: FakeDevice) -> str:
        pool = dev.pool
        assert pool is not None
        if pool.mode == "fail":
            return "Fail"
        md = pool.metadata
        policy = "error_if_no_space" if pool.error_if_no_space else "queue_if_no_space"
        check = "needs_check" if md.needs_check else "-"
        return (
            f"{md.transaction_id} {md.meta_used}/{self._meta_total(pool)} "
            f"{md.data_used}/{md.data_total} - {pool.mode} discard_passdown {policy} "
            f"{check} {self._meta_threshold(pool)} "
        )

    # -- test helpers ----------------------------------------------------------------------

    def set_mode(self, name: str, mode: str) -> None:
        """Force a pool mode (what a metadata error would do), firing the event."""
        dev = self.devices[name]
        assert dev.pool is not None
        dev.pool.mode = mode
        self._event(dev)

    def events_pending(self) -> bool:
        return self.global_events > self._armed_at


def _serialized(method: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(method)
    def locked(self: FakeKernel | FakePageCache, *args: object, **kwargs: object) -> object:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


def _serialize(cls: type, unlocked: tuple[str, ...] = ()) -> None:
    """Run every method of cls under its instance's lock, but those named (they wait first)."""
    for name, member in list(vars(cls).items()):
        if isinstance(member, staticmethod | classmethod | property):
            continue
        if callable(member) and not name.startswith("__") and name not in unlocked:
            setattr(cls, name, _serialized(member))


_serialize(FakeKernel, unlocked=("resume", "stall", "_wait_if_stalled"))


class FakePageCache:
    """The page cache as MemoryApi sees it: /proc/meminfo and /proc/vmstat texts, from counters
    the tests move the way a filesystem on a thin volume does.

    ``dirty()`` is a buffered write (the pool sees nothing), ``start_writeback()`` hands dirty
    pages to the device (Writeback), ``write_back()`` lands them in a pool (blocks allocated,
    nr_written advanced). Reads go through the kernel's fault injection as ``open`` of the file.
    """

    PAGE = 4096

    def __init__(self, kernel: FakeKernel, dirty_limit: int = 256 * 1024**2) -> None:
        self.kernel = kernel
        self.lock = kernel.lock
        self.dirty_bytes = 0
        self.writeback_bytes = 0
        self.dirty_limit = dirty_limit
        self.written_pages = 0
        self.reads = 0

    def writeback_texts(self) -> tuple[str, str]:
        self.reads += 1
        for path in ("/proc/meminfo", "/proc/vmstat"):
            self.kernel._inject("open", path, KernelError)
        meminfo = (
            "MemTotal:        3042736 kB\n"
            f"Dirty:          {self.dirty_bytes // 1024} kB\n"
            f"Writeback:      {self.writeback_bytes // 1024} kB\n"
        )
        vmstat = (
            f"nr_dirty {self.dirty_bytes // self.PAGE}\n"
            f"nr_written {self.written_pages}\n"
            f"nr_dirty_threshold {self.dirty_limit // self.PAGE}\n"
        )
        return meminfo, vmstat

    def dirty(self, nbytes: int) -> None:
        self.dirty_bytes += nbytes

    def start_writeback(self, nbytes: int | None = None) -> None:
        moved = self.dirty_bytes if nbytes is None else min(nbytes, self.dirty_bytes)
        self.dirty_bytes -= moved
        self.writeback_bytes += moved

    def write_back(self, pool: str, nbytes: int | None = None, block_bytes: int = 64 * 1024) -> int:
        """Land nbytes of what is in flight in pool (default: all dirty and in-flight data, a
        sync); return blocks written."""
        if nbytes is None:
            self.start_writeback()
        moved = self.writeback_bytes if nbytes is None else min(nbytes, self.writeback_bytes)
        self.writeback_bytes -= moved
        self.written_pages += moved // self.PAGE
        return self.kernel.write_blocks(pool, moved // block_bytes)


_serialize(FakePageCache)


class FakeNodes:
    """DeviceNodes for the fake: resume, and count how often we waited for udev."""

    def __init__(self) -> None:
        self.synced: list[str] = []

    def resume_synced(self, dm: DeviceMapperApi, name: str) -> None:
        dm.resume(name)
        self.synced.append(name)

    def resume_nowait(self, dm: DeviceMapperApi, name: str) -> None:
        dm.resume(name)
