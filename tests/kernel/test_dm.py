"""DeviceMapper against the real kernel: a thin-pool on two loops, its events, growth, errors.

Run in the VM: .venv/bin/python -m tests.vm run -- .venv/bin/python -m pytest tests/kernel
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from tests.kernel.loopback import Devices, loop_devices, open_dm, unique
from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes, Sectors, bytes_to_sectors
from thinwatchd.kernel import fs
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper, IoctlFn, _fcntl_ioctl
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.udev_sync import UdevSync

pytestmark = pytest.mark.kernel

MiB = 1 << 20
BLOCK = 128  # sectors: 64 KiB data blocks
DATA, META = Bytes(64 * MiB), Bytes(16 * MiB)
DATA_BLOCKS = DATA // (BLOCK * 512)  # 1024
WRITTEN = 16 * MiB  # 256 blocks
LOW_WATER = DATA_BLOCKS - 224  # crossed after 224 blocks (14 MiB): inside the write
THIN_LENGTH = bytes_to_sectors(Bytes(256 * MiB))


@pytest.fixture
def dm() -> Iterator[DeviceMapper]:
    with open_dm() as dm:
        yield dm


@pytest.fixture
def devices(dm: DeviceMapper) -> Iterator[Devices]:
    devs = Devices(dm)
    try:
        yield devs
    finally:
        devs.remove_all()


def majmin(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def activate(devices: Devices, name: str, targets: list[Target]) -> int:
    """create -> load -> resume (udev-synced), make the node; return the dev_t."""
    dm = devices.dm
    info = dm.create(devices.track(name))
    dm.load_table(name, targets)
    devices.udev.synced(name, lambda cookie: dm.resume(name, cookie))
    devices.udev.ensure_node(name, info.dev)
    return info.dev


def pool_usage(dm: DeviceMapper, pool: str) -> tuple[int, int]:
    """Return (used, total) data blocks from the pool's status line."""
    (target,) = dm.status(pool)
    fields = target.params.split()
    assert target.target_type == "thin-pool" and fields[4] == "rw", target.params
    used, total = (int(x) for x in fields[2].split("/"))
    return used, total


def write_direct(path: str, nbytes: int) -> None:
    buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT needs
    buf.write(b"\xa5" * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for _ in range(nbytes // MiB):
            assert os.write(fd, buf) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def test_version_and_thin_pool_target(dm: DeviceMapper) -> None:
    major, minor, _patch = dm.version()
    assert major == 4 and minor >= 37


def test_thin_pool_low_water_event_wakes_the_control_fd(dm: DeviceMapper, devices: Devices) -> None:
    with loop_devices(META, DATA) as [(_m, meta), (data_path, data)]:
        pool = unique("pool")
        pool_params = f"{meta.path} {data.path} {BLOCK} {LOW_WATER}"
        pool_dev = activate(
            devices, pool, [Target(Sectors(0), bytes_to_sectors(DATA), "thin-pool", pool_params)]
        )

        # table() round-trips, with the devices canonicalised to major:minor
        (table,) = dm.table(pool)
        assert (table.start, table.length, table.target_type) == (0, DATA // 512, "thin-pool")
        canonical = [majmin(meta.dev), majmin(data.dev), str(BLOCK), str(LOW_WATER), "0"]
        assert table.params.split() == canonical
        assert pool_usage(dm, pool) == (0, DATA_BLOCKS)

        dm.message(pool, "create_thin 0")
        thin = unique("thin")
        activate(
            devices,
            thin,
            [Target(Sectors(0), THIN_LENGTH, "thin", f"{majmin(pool_dev)} 0")],
        )
        (thin_table,) = dm.table(thin)
        assert thin_table.params.split() == [majmin(pool_dev), "0"]

        before = {d.name: d.event_nr for d in dm.list_devices()}[pool]
        dm.arm_poll()
        readable, _, _ = select.select([dm], [], [], 0)
        assert readable == []

        write_direct(devices.udev.node_path(thin), WRITTEN)

        readable, _, _ = select.select([dm], [], [], 10)
        assert readable == [dm], "control fd did not become readable after the low-water event"
        after = {d.name: d.event_nr for d in dm.list_devices()}[pool]
        assert after > before
        used, total = pool_usage(dm, pool)
        assert used >= WRITTEN // (BLOCK * 512) and total == DATA_BLOCKS
        dm.arm_poll()
        assert select.select([dm], [], [], 0)[0] == []

        # grow: file -> LOOP_SET_CAPACITY -> longer table into the inactive slot -> resume
        fs.Files().grow(str(data_path), Bytes(2 * DATA), preallocate=False)
        loops = LoopControl()
        loops.set_capacity(data)
        assert loops.size(data) == 2 * DATA
        dm.load_table(
            pool, [Target(Sectors(0), bytes_to_sectors(Bytes(2 * DATA)), "thin-pool", table.params)]
        )
        info = dm.info(pool)
        assert info is not None and info.inactive_present and not info.suspended
        dm.resume(pool)
        assert pool_usage(dm, pool)[1] == 2 * DATA_BLOCKS
        info = dm.info(pool)
        assert info is not None and not info.inactive_present and info.active_present

        devices.remove(thin)
        dm.message(pool, "delete 0")
        devices.remove(pool)


def test_wait_returns_at_once_for_an_old_event_nr(dm: DeviceMapper, devices: Devices) -> None:
    name = unique("wait")
    activate(devices, name, [Target(Sectors(0), Sectors(8), "error", "")])
    info = dm.info(name)
    assert info is not None
    assert dm.wait(name, info.event_nr + 1) == info.event_nr


def test_wait_blocks_without_holding_the_gil(dm: DeviceMapper, devices: Devices) -> None:
    name = unique("waitgil")
    activate(devices, name, [Target(Sectors(0), Sectors(8), "error", "")])
    info = dm.info(name)
    assert info is not None
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: woke.append(dm.wait(name, info.event_nr)))
    waiter.start()
    time.sleep(0.5)  # runs only if the waiting ioctl released the GIL
    assert waiter.is_alive() and woke == []
    devices.remove(name)  # removal fires a table event: the waiter wakes
    waiter.join(10)
    assert not waiter.is_alive() and len(woke) == 1


def test_buffer_full_on_a_real_list_devices(dm: DeviceMapper, devices: Devices) -> None:
    sizes: list[int] = []

    def counting(fd: int, request: int, buf: bytearray) -> int:
        sizes.append(len(buf))
        return _fcntl_ioctl(fd, request, buf)

    names = [devices.track(unique("x" * 90)) for _ in range(40)]
    for name in names:
        dm.create(name)  # 40 records of ~120 bytes: far over the first 1024-byte buffer
    ioctl: IoctlFn = counting
    with DeviceMapper(ioctl=ioctl) as counted:
        listed = {d.name for d in counted.list_devices()}
    assert set(names) <= listed
    assert sizes[0] == 1024 and len(sizes) >= 4 and sizes == sorted(sizes)


def test_info_is_none_for_a_missing_device(dm: DeviceMapper) -> None:
    assert dm.info(unique("missing")) is None
    with pytest.raises(KernelError) as err:
        dm.remove(unique("missing"))
    assert err.value.errno == errno.ENXIO


def test_bad_table_error_names_the_operation_and_device(dm: DeviceMapper, devices: Devices) -> None:
    with loop_devices(META, DATA) as [(_m, meta), (_d, data)]:
        name = devices.track(unique("badpool"))
        dm.create(name)
        bad = f"{meta.path} {data.path} 100 10"  # block size not a multiple of 128 sectors
        with pytest.raises(KernelError) as err:
            dm.load_table(name, [Target(Sectors(0), bytes_to_sectors(DATA), "thin-pool", bad)])
        assert err.value.errno == errno.EINVAL
        text = str(err.value)
        assert "load_table" in text and name in text and "thin-pool" in text
        info = dm.info(name)
        assert info is not None and not info.inactive_present and not info.active_present


def test_suspend_resume_and_clear_table(dm: DeviceMapper, devices: Devices) -> None:
    name = unique("susp")
    activate(devices, name, [Target(Sectors(0), Sectors(8), "error", "")])
    dm.suspend(name)
    info = dm.info(name)
    assert info is not None and info.suspended
    dm.load_table(name, [Target(Sectors(0), Sectors(16), "error", "")])
    dm.clear_table(name)
    info = dm.info(name)
    assert info is not None and not info.inactive_present
    dm.resume(name)
    (target,) = dm.table(name)
    assert target.length == 8  # the cleared table never became active


def test_udev_node_without_udev(dm: DeviceMapper, devices: Devices) -> None:
    udev = UdevSync()
    if udev.udev_running():
        pytest.skip("udev is running: it owns /dev/mapper (see tests/systemd)")
    name = unique("node")
    dev = activate(devices, name, [Target(Sectors(0), Sectors(8), "error", "")])
    st = os.lstat(udev.node_path(name))
    assert os.major(st.st_rdev) == os.major(dev) and st.st_rdev == dev
    devices.remove(name)
    assert not os.path.exists(udev.node_path(name))
