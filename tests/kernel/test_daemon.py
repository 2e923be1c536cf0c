"""The real daemon against the real kernel: build, adopt, recreate, fill, grow metadata, run dry.

These run inside the VM test bed (or natively on a host with dm-thin, as root).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.harness import (
    DaemonProcess,
    GiB,
    KernelLog,
    MiB,
    create_thin,
    dd_zero,
    scratch_dir,
    teardown,
    write_config,
)
from tests.kernel.harness import build_pool, kernel_lines, read_checksum, write_pattern
from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes, Sectors, bytes_to_sectors
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status
from thinwatchd.thin.table import parse_pool_table

pytestmark = pytest.mark.kernel

OUT_OF_SPACE = "switching pool to out-of-data-space"


@dataclass
class Env:
    """One test's pool, files, daemon and kernel log; everything is torn down afterwards."""

    dm: DeviceMapper
    directory: Path
    pool: str
    klog: KernelLog
    devices: list[str] = field(default_factory=list)
    daemons: list[DaemonProcess] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def metadata(self) -> Path:
        return self.directory / "metadata"

    def config(self, **pool: object) -> Path:
        keys: dict[str, object] = {
            "data_file": str(self.data),
            "metadata_file": str(self.metadata),
        }
        keys.update(pool)
        return write_config(self.directory / "config.yaml", {self.pool: keys})

    def daemon(self, config: Path) -> DaemonProcess:
        d = DaemonProcess(config, self.directory / f"daemon{len(self.daemons)}.log")
        self.daemons.append(d)
        d.start()
        return d

    def thin(self, size: int = 8 * GiB, thin_id: int = 0) -> str:
        name = f"{self.pool}-thin{thin_id}"
        self.devices.insert(0, name)
        return create_thin(self.dm, self.pool, name, thin_id, size)

    def status(self) -> ThinPoolWorkingStatus:
        status = parse_pool_status(self.dm.status(self.pool)[0].params)
        assert isinstance(status, ThinPoolWorkingStatus)
        return status

    def logs(self) -> str:
        return "\n".join(d.log() for d in self.daemons)


@pytest.fixture
def env() -> Iterator[Env]:
    pool = f"twtest-{uuid.uuid4().hex[:8]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    dm = DeviceMapper()
    klog = KernelLog()
    e = Env(dm, directory, pool, klog, devices=[pool])
    try:
        yield e
    finally:
        for d in e.daemons:
            d.close()
        teardown(dm, e.devices, [e.data, e.metadata])
        klog.close()
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_fresh_start_builds_the_configured_pool(env: Env) -> None:
    # A fixed mark: with the page cache's (the default), a 256 MiB pool grows at start-up.
    env.daemon(
        env.config(
            data_size="256MiB",
            metadata_size="16MiB",
            low_water_mark=100,
            data={"adaptive_low_water": False},
        )
    )
    assert os.path.exists(f"/dev/mapper/{env.pool}"), "node must exist when READY=1 is sent"
    (target,) = env.dm.table(env.pool)
    table = parse_pool_table(target.params)
    loops = LoopControl()
    meta_loop, data_loop = loops.find(str(env.metadata)), loops.find(str(env.data))
    assert meta_loop is not None and data_loop is not None
    assert table.metadata_dev == f"7:{meta_loop.index}" and table.data_dev == f"7:{data_loop.index}"
    assert table.data_block_size == 128 and table.features == ("skip_block_zeroing",)
    assert target.length == 256 * MiB // 512
    assert env.status().data_total == 256 * MiB // (128 * 512)
    # the daemon raised the table's mark to its 80 % threshold: 20 % of 4096 blocks
    assert table.low_water_mark >= 100


def test_restart_and_reboot_keep_data(env: Env) -> None:
    config = env.config(data_size="256MiB", metadata_size="16MiB")
    first = env.daemon(config)
    thin = env.thin(size=1 * GiB)
    checksum = write_pattern(thin, 64 * MiB, b"keep me")
    assert first.stop() == 0
    assert env.dm.info(env.pool) is not None, "SIGTERM must leave the pool up"

    second = env.daemon(config)  # restart: adopt
    assert "adopted after a restart" in second.log()
    assert read_checksum(thin, 64 * MiB) == checksum
    second.stop()

    # "reboot": the kernel forgets every device and loop; the files stay
    teardown(env.dm, env.devices, [env.data, env.metadata])
    assert env.dm.info(env.pool) is None
    subprocess.run(["sync"], check=True)
    third = env.daemon(config)
    assert "adopted over its existing metadata" in third.log()
    thin = _reactivate_thin(env, 1 * GiB)
    assert read_checksum(thin, 64 * MiB) == checksum


def _reactivate_thin(env: Env, size: int) -> str:
    """Activate existing thin volume 0 (no create_thin message: it exists in the metadata)."""
    from thinwatchd.kernel.api import Target
    from thinwatchd.kernel.nodes import UdevNodes

    name = f"{env.pool}-thin0"
    info = env.dm.info(env.pool)
    assert info is not None
    env.dm.create(name)
    dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
    length = bytes_to_sectors(Bytes(size))
    env.dm.load_table(name, [Target(Sectors(0), length, "thin", f"{dev} 0")])
    UdevNodes().resume_synced(env.dm, name)
    return f"/dev/mapper/{name}"


@pytest.mark.parametrize("mib", [600, 4096])
def test_fill_never_runs_out_of_space(env: Env, mib: int) -> None:
    env.daemon(env.config(data_size="64MiB", metadata_size="64MiB"))
    thin = env.thin(size=(mib + 512) * MiB)
    seconds, code, err = dd_zero(thin, mib)
    kernel = env.klog.text()
    assert code == 0, f"dd failed: {err}\n{kernel}"
    assert OUT_OF_SPACE not in kernel, kernel
    assert env.data.stat().st_size >= mib * MiB
    status = env.status()
    assert status.data_used * 64 * 1024 >= mib * MiB
    print(
        f"{mib} MiB in {seconds:.2f} s; data file {env.data.stat().st_size / MiB:.0f} MiB; "
        f"growths: {env.logs().count('growing data')}"
    )


def test_metadata_grows_under_many_small_writes(env: Env) -> None:
    # 2 MiB of metadata (512 blocks); grow at 50 % so that ~60k mappings are enough here
    env.daemon(
        env.config(
            data_size="8GiB",
            metadata_size="2MiB",
            metadata={"threshold": "50%"},
        )
    )
    thin = env.thin(size=16 * GiB)
    before = env.metadata.stat().st_size
    blocks = 16 * GiB // (64 * 1024)

    def writer(part: int) -> None:
        # one 4 KiB write into each of many 64 KiB blocks: each costs a mapping, little data
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"x" * 4096
        fd = os.open(thin, os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(part, 70000, 2):
                os.pwrite(fd, buf, ((i * 7919) % blocks) * 64 * 1024)
            os.fsync(fd)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=writer, args=(part,)) for part in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(2)
    status = env.status()
    why = f"{status}\n{env.logs()}"
    assert env.metadata.stat().st_size > before, why
    assert status.meta_total * 4096 == env.metadata.stat().st_size, why
    assert status.mode.value == "rw", why
    assert "growing metadata" in env.logs(), why


@contextlib.contextmanager
def small_filesystem(env: Env, name: str, size: int) -> Iterator[Path]:
    """Mount a fresh ext4 of size bytes (an image on the scratch disk) for the test's files."""
    image = env.directory / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt = env.directory / name
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_backing_filesystem_too_small(env: Env) -> None:
    # a small ext4 of its own: 400 MiB, keep 64 MiB free; the writer wants 600 MiB
    with small_filesystem(env, "small", 400 * MiB) as mnt:
        _fill_small_fs(env, mnt)


def _fill_small_fs(env: Env, mnt: Path) -> None:
    config = write_config(
        env.directory / "config.yaml",
        {
            env.pool: {
                "data_file": str(mnt / "data"),
                "metadata_file": str(mnt / "metadata"),
                "data_size": "64MiB",
                "metadata_size": "8MiB",
                "low_water_mark": 512,
                "reserve": "64MiB",
                "data": {"step": "64MiB", "step_percent": "0%"},
                "when_full": {"error_after": "2s"},
            }
        },
        check_interval="1s",
    )
    daemon = env.daemon(config)
    env.devices.insert(0, f"{env.pool}-thin0")
    thin = create_thin(env.dm, env.pool, f"{env.pool}-thin0", 0, 1 * GiB)
    _seconds, code, err = dd_zero(thin, 600)
    assert code != 0, "the writer must get an error, not hang, once the pool cannot grow"
    assert "No space left" in err or "Input/output error" in err, err
    free = os.statvfs(mnt)
    assert free.f_bavail * free.f_frsize >= 60 * MiB, "growth must stop at the reserve"
    log = daemon.log()
    assert "cannot grow data" in log and "backing filesystem" in log, log
    assert "error_if_no_space" in log
    daemon.stop()
    teardown(env.dm, env.devices, [])
    env.devices.clear()
    meta = mnt / "metadata"
    loops = LoopControl()
    check = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr + check.stdout
    teardown(env.dm, [], [mnt / "data", meta])
    assert loops.find(str(meta)) is None


def test_a_filesystem_reaching_its_reserve_is_said_before_the_loop_fails(env: Env) -> None:
    """A 1 GiB sparse pool on a 128 MiB filesystem: said once, at err, while the filesystem still
    has room; when_full switches the pool; the writer ends with an error, never hangs."""
    with small_filesystem(env, "tiny", 128 * MiB) as mnt:
        config = write_config(
            env.directory / "config.yaml",
            {
                env.pool: {
                    "data_file": str(mnt / "data"),
                    "metadata_file": str(mnt / "metadata"),
                    "data_size": "1GiB",
                    "metadata_size": "4MiB",
                    "low_water_mark": 16,
                    "reserve": "40MiB",
                    "preallocate": False,  # the sparse promise this test is about
                    "when_full": {"error_after": "1s"},
                }
            },
            check_interval="1s",
        )
        daemon = env.daemon(config)
        thin = env.thin(size=1 * GiB)
        warned_with_free: int | None = None
        chunk = mmap.mmap(-1, MiB)
        chunk.write(b"\xa5" * MiB)
        fd = os.open(thin, os.O_WRONLY | os.O_DIRECT)
        error = None
        try:
            for offset in range(0, 200 * MiB, MiB):  # ~10 MiB/s: the 1 s check sees the reserve
                try:
                    os.pwritev(fd, [chunk], offset)
                except OSError as exc:
                    error = exc
                    break
                if warned_with_free is None and "is at its reserve" in daemon.log():
                    st = os.statvfs(mnt)
                    warned_with_free = st.f_bavail * st.f_frsize
                time.sleep(0.1)
        finally:
            os.close(fd)
        log = daemon.log()
        assert warned_with_free is not None and warned_with_free > 0, (
            f"not said while the filesystem had room (free then: {warned_with_free}):\n{log}"
        )
        assert log.count("is at its reserve") == 1, log
        assert "switched to error_if_no_space" in log, log
        assert error is not None, "the filesystem filled, yet every write succeeded?"
        info = env.dm.info(env.pool)
        assert info is not None and not info.suspended
        assert daemon.proc is not None and daemon.proc.poll() is None, log
        daemon.stop()
        teardown(env.dm, env.devices, [])
        env.devices.clear()
        teardown(env.dm, [], [mnt / "data", mnt / "metadata"])


def event_nr(dm: DeviceMapper, name: str) -> int:
    info = dm.info(name)
    assert info is not None, name
    return info.event_nr


def test_a_frozen_backing_filesystem_holds_up_no_other_pool(env: Env) -> None:
    """Pool b's filesystem is frozen (fsfreeze) when b reaches its mark: b's growth waits for
    the thaw in a thread of its own, while pool a, filled meanwhile by a direct writer, grows as
    usual. Grown one after the other, a would wait for the thaw and its writer find it full."""
    other = f"{env.pool}-b"
    fixed = {"adaptive_low_water": False, "step": "64MiB", "step_percent": "0%"}

    def pool(directory: Path) -> dict[str, object]:
        return {
            "data_file": str(directory / "data"),
            "metadata_file": str(directory / "metadata"),
            "data_size": "64MiB",
            "metadata_size": "8MiB",
            "low_water_mark": 256,
            "data": fixed,
            "reserve": "32MiB",
        }

    with small_filesystem(env, "frozen", 512 * MiB) as mnt:
        env.devices.append(other)
        config = write_config(
            env.directory / "config.yaml",
            {env.pool: pool(env.directory), other: pool(mnt)},
            check_interval="60s",
        )
        daemon = env.daemon(config)
        thin_a = env.thin(size=1 * GiB)
        env.devices.insert(0, f"{other}-thin0")
        thin_b = create_thin(env.dm, other, f"{other}-thin0", 0, 1 * GiB)
        try:
            _s, code, err = dd_zero(thin_b, 40)  # 8 MiB short of b's 16 MiB mark
            assert code == 0, err
            subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
            thawed = False
            try:
                before = event_nr(env.dm, other)
                writer_b = subprocess.Popen(  # crosses b's mark, then waits for the thaw
                    [
                        "dd",
                        "if=/dev/zero",
                        f"of={thin_b}",
                        "bs=1M",
                        "count=16",
                        "seek=40",
                        "oflag=direct",
                    ],
                    stderr=subprocess.PIPE,
                )
                deadline = time.monotonic() + 10
                while event_nr(env.dm, other) == before and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert event_nr(env.dm, other) != before, "b's low-water event never came"
                time.sleep(0.5)  # b's growth is under way, stalled on the frozen filesystem
                result: list[tuple[float, int, str]] = []
                writer_a = threading.Thread(target=lambda: result.append(dd_zero(thin_a, 256)))
                writer_a.start()
                writer_a.join(60)
                finished_while_frozen = bool(result)
            finally:
                subprocess.run(["fsfreeze", "-u", str(mnt)], check=False)
                thawed = True
            writer_a.join(60)
            assert writer_b.wait(60) == 0, writer_b.stderr.read() if writer_b.stderr else ""
            assert thawed and finished_while_frozen, (
                "a's writer waited for b's filesystem to thaw:\n" + daemon.log()
            )
            _seconds, code, err = result[0]
            assert code == 0, err
            assert not kernel_lines(env.klog, OUT_OF_SPACE), daemon.log()
            deadline = time.monotonic() + 20  # b's growth goes on from where it stalled
            while time.monotonic() < deadline:
                status_b = parse_pool_status(env.dm.status(other)[0].params)
                assert isinstance(status_b, ThinPoolWorkingStatus)
                if status_b.data_total * 64 * 1024 > 64 * MiB:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("b never grew after the thaw:\n" + daemon.log())
            assert env.status().data_total * 64 * 1024 >= 256 * MiB
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        finally:
            daemon.stop()
            teardown(env.dm, env.devices, [])
            env.devices.clear()
            teardown(env.dm, [], [mnt / "data", mnt / "metadata", env.data, env.metadata])


@pytest.mark.parametrize("stopped_after", ["file", "loop", "table"])
def test_interrupted_growth_is_finished_at_start(env: Env, stopped_after: str) -> None:
    """A daemon killed after any step of a growth: the next start completes it, losing nothing."""
    from thinwatchd.kernel.api import Target

    config = env.config(data_size="256MiB", metadata_size="16MiB")
    first = env.daemon(config)
    thin = env.thin(size=1 * GiB)
    checksum = write_pattern(thin, 16 * MiB, b"mid-growth")
    first.stop()
    # the growth steps, done by hand up to the crash point (what kill -9 would leave)
    target = Bytes(env.data.stat().st_size + 512 * MiB)
    os.truncate(env.data, target)
    if stopped_after in ("loop", "table"):
        loop = LoopControl().find(str(env.data))
        assert loop is not None
        LoopControl().set_capacity(loop)
    if stopped_after == "table":
        (active,) = env.dm.table(env.pool)
        env.dm.load_table(
            env.pool, [Target(Sectors(0), bytes_to_sectors(target), "thin-pool", active.params)]
        )
    second = env.daemon(config)
    assert "finished an interrupted growth" in second.log(), second.log()
    info = env.dm.info(env.pool)
    assert info is not None and not info.suspended and not info.inactive_present
    assert env.status().data_total * 64 * 1024 >= target
    assert read_checksum(thin, 16 * MiB) == checksum


def test_damaged_metadata_is_refused_and_left_alone(env: Env) -> None:
    """After a reboot over metadata thin_check rejects: no pool, exit 65, the file untouched."""
    config = env.config(data_size="256MiB", metadata_size="16MiB")
    first = env.daemon(config)
    env.thin(size=1 * GiB)
    first.stop()
    teardown(env.dm, env.devices, [env.data, env.metadata])  # the reboot
    with open(env.metadata, "r+b") as f:  # damage the superblock's checksummed body
        f.seek(64)
        f.write(b"\xff" * 64)
    damaged = env.metadata.read_bytes()
    second = DaemonProcess(config, env.directory / "damaged.log")
    env.daemons.append(second)
    with pytest.raises(AssertionError, match="exit 65"):
        second.start(timeout=120)
    log = second.log()
    assert "thin_check found damaged metadata" in log and "thin_repair" in log, log
    assert "Traceback" not in log
    assert env.dm.info(env.pool) is None
    assert env.metadata.read_bytes() == damaged, "a damaged pool must be left exactly as found"


def test_pool_removed_behind_our_back_is_rebuilt(env: Env) -> None:
    config = env.config(data_size="256MiB", metadata_size="16MiB")
    daemon = env.daemon(config)
    thin = env.thin(size=1 * GiB)
    checksum = write_pattern(thin, 8 * MiB, b"removed")
    env.dm.remove(f"{env.pool}-thin0")
    env.dm.remove(env.pool)  # someone else's dmsetup remove
    deadline = time.monotonic() + 30
    # The device exists a moment before its table is resumed: wait for the whole rebuild.
    while (info := env.dm.info(env.pool)) is None or info.suspended or not info.active_present:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.2)
    assert "removed by someone else; rebuilding it" in daemon.log()
    from thinwatchd.kernel.api import Target
    from thinwatchd.kernel.nodes import UdevNodes

    name = f"{env.pool}-thin0"
    env.dm.create(name)
    pool_dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
    length = bytes_to_sectors(Bytes(GiB))
    # The rebuilt pool's first check may grow it: while that reload has the pool suspended,
    # the kernel refuses to activate a thin (EINVAL, "while pool is suspended"); a consumer
    # retries (README, "A create during a growth can fail").
    deadline = time.monotonic() + 30
    while True:
        try:
            env.dm.load_table(name, [Target(Sectors(0), length, "thin", f"{pool_dev} 0")])
            break
        except KernelError as exc:
            assert exc.errno == errno.EINVAL and time.monotonic() < deadline, daemon.log()
            time.sleep(0.2)
    UdevNodes().resume_synced(env.dm, name)
    assert read_checksum(thin, 8 * MiB) == checksum


def test_metadata_write_errors_are_reported_not_fought(env: Env) -> None:
    """Sparse metadata on a full filesystem: the kernel fails metadata writes and takes the pool
    out of write mode (needs_check). thinwatchd makes and grows metadata allocated, so this is a
    pool built by hand on a sparse metadata file (Docker's), whose filesystem is full when the
    daemon adopts it: its holes cannot be claimed, and it says so. Then the daemon must say
    needs_check once, at err or worse, never grow the pool, never leave it suspended, and keep
    running."""
    with small_filesystem(env, "metafs", 64 * MiB) as mnt:
        by_hand = SimpleNamespace(
            metadata=mnt / "metadata", data=env.data, pool=env.pool, dm=env.dm
        )
        build_pool(by_hand, 1 * GiB, 16 * MiB)  # type: ignore[arg-type]
        env.devices.insert(0, f"{env.pool}-thin0")
        thin = create_thin(env.dm, env.pool, f"{env.pool}-thin0", 0, 1 * GiB)
        subprocess.run(  # then fill its filesystem, to the last block
            ["dd", "if=/dev/zero", f"of={mnt / 'filler'}", "bs=1M"],
            capture_output=True,
            check=False,
        )
        config = write_config(
            env.directory / "config.yaml",
            {
                env.pool: {
                    "data_file": str(env.data),
                    "metadata_file": str(mnt / "metadata"),
                    "data_size": "1GiB",
                    "metadata_size": "16MiB",
                    "reserve": 0,
                }
            },
            check_interval="1s",
        )
        daemon = env.daemon(config)
        dd_zero(thin, 256)  # may fail: the pool stops accepting writes
        deadline = time.monotonic() + 30
        while True:
            raw = env.dm.status(env.pool, noflush=True)[0].params
            status = parse_pool_status(raw)
            if (
                not isinstance(status, ThinPoolWorkingStatus)
                or status.needs_check
                or (status.mode.value != "rw")
            ):
                break
            assert time.monotonic() < deadline, f"pool still writable: {raw}\n{env.klog.text()}"
            time.sleep(0.5)
        time.sleep(3)  # a few safety checks
        log = daemon.log()
        assert "needs_check" in raw, raw  # what the kernel does with failed metadata writes
        assert "needs checking (needs_check)" in log and "thin_repair" in log, log
        assert log.count("cannot allocate the") == 1, "the unclaimable holes, said once"
        assert log.count("needs checking") == 1, "said once per state change"
        assert log.count("cannot grow data") <= 1, "said once per state change"
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon keeps running"
        info = env.dm.info(env.pool)
        assert info is not None and not info.suspended
        assert "Traceback" not in log
        daemon.stop()
        teardown(env.dm, env.devices, [env.data, mnt / "metadata"])
        env.devices.clear()
