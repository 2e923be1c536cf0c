"""A filesystem on a thin volume, written through the page cache, on the real kernel.

The kernel's dirty limit is set with vm.dirty_bytes (restored afterwards) so that a workload
of a few hundred MiB is several bursts; the pool starts at 64 MiB with a 16 MiB mark and
128 MiB steps. The daemon must size its mark from the kernel's nr_dirty_threshold, grow the
pool while the burst is still dirty, and never let the pool run out of space (the kernel log's
"switching pool to out-of-data-space"). Every byte written reads back after the caches drop.
Then small files each fsynced, a tar extraction, deletes and fstrim: the space goes back to the
pool and to the host's file (its st_blocks).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.harness import (
    DaemonProcess,
    GiB,
    KernelLog,
    MiB,
    create_thin,
    scratch_dir,
    teardown,
    write_config,
)
from tests.kernel.harness import dirty_bytes
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.memory import Memory
from thinwatchd.policy.writeback import PAGE_BYTES, parse_writeback
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

pytestmark = pytest.mark.kernel

OUT_OF_SPACE = "switching pool to out-of-data-space"
DIRTY_BYTES = 96 * MiB  # vm.dirty_bytes for these tests
FILE_BYTES = 24 * MiB
FILES = 24  # 576 MiB: the pool grows several times past its start-up size
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-K", "-f"],
}


@pytest.fixture
def dirty_limit() -> Iterator[int]:
    """vm.dirty_bytes = 96 MiB, background at half of it; the old values come back after."""
    with dirty_bytes(DIRTY_BYTES):
        yield DIRTY_BYTES


def test_the_kernel_reports_the_dirty_limit_it_enforces(dirty_limit: int) -> None:
    """nr_dirty_threshold follows vm.dirty_bytes to the page (global_dirty_limits)."""
    sample = parse_writeback(*Memory().writeback_texts())
    assert abs(sample.dirty_limit - dirty_limit) <= PAGE_BYTES
    assert sample.dirty >= 0 and sample.writeback >= 0 and sample.written > 0


def _write_files(directory: Path, count: int, size: int) -> dict[str, str]:
    """Buffered writes (no fsync), each file a distinct pattern; return name -> sha256."""
    sums = {}
    chunk = 1 * MiB
    for index in range(count):
        digest = hashlib.sha256()
        name = f"f{index:03d}"
        with open(directory / name, "wb") as out:
            for offset in range(0, size, chunk):
                block = hashlib.sha256(f"{name}:{offset}".encode()).digest() * (chunk // 32)
                out.write(block)
                digest.update(block)
        sums[name] = digest.hexdigest()
    return sums


def _pool_used(dm: DeviceMapper, pool: str) -> int:
    status = parse_pool_status(dm.status(pool, noflush=False)[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    return status.data_used


def _read_sums(directory: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while block := f.read(4 * MiB):
                digest.update(block)
        out[name] = digest.hexdigest()
    return out


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_a_filesystem_writing_through_the_page_cache_never_finds_the_pool_full(
    fs: str, dirty_limit: int
) -> None:
    if shutil.which(MKFS[fs][0]) is None:
        pytest.fail(f"{MKFS[fs][0]} is missing: scripts/bootstrap installs it (e2fsprogs/xfsprogs)")
    pool = f"twwb-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    data, metadata = directory / "data", directory / "metadata"
    mount = directory / "mnt"
    mount.mkdir()
    dm, klog = DeviceMapper(), KernelLog()
    devices = [pool]
    config = write_config(
        directory / "config.yaml",
        {
            pool: {
                "data_file": str(data),
                "metadata_file": str(metadata),
                "data_size": "64MiB",
                "metadata_size": "16MiB",
                "low_water_mark": 256,
                # No crash room: in the emulated guest (start-up 5-10 s) it would raise the mark
                # past the dirty limit, and the page cache's early growth, the subject here,
                # would never be needed.
                "data": {"step": "128MiB", "step_percent": "0%", "crash_room": False},
            }
        },
        check_interval="2s",
    )
    daemon = DaemonProcess(config, directory / "daemon.log")
    mounted = False
    try:
        daemon.start()
        # From start-up on, the mark holds the kernel's dirty limit (16 MiB was configured).
        table = dm.table(pool)[0].params.split()
        assert int(table[3]) * 64 * 1024 >= dirty_limit, table
        thin = create_thin(dm, pool, f"{pool}-thin", 0, 8 * GiB)
        devices.insert(0, f"{pool}-thin")
        subprocess.run([*MKFS[fs], thin], check=True, timeout=300)
        subprocess.run(["modprobe", fs], check=False, timeout=60)  # xfs is a module
        done = subprocess.run(
            ["mount", thin, str(mount)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr + klog.text()
        mounted = True
        sums = _write_files(mount, FILES, FILE_BYTES)
        os.sync()
        log = klog.text()
        assert OUT_OF_SPACE not in log, log + daemon.log()
        text = daemon.log()
        early = re.findall(r"dirty or under writeback", text)
        grown = re.findall(r"growing data of \S+ .*done in (\d+) ms", text)
        assert len(grown) >= 2, text  # start-up, then at least one growth under the workload
        assert early, "no growth came from the page cache's counters:\n" + text
        subprocess.run(["umount", str(mount)], check=True, timeout=120)
        mounted = False
        Path("/proc/sys/vm/drop_caches").write_text("3")
        subprocess.run(["mount", thin, str(mount)], check=True, timeout=60)
        mounted = True
        assert _read_sums(mount, sorted(sums)) == sums
        # Many small files, each fsynced (a pool commit each), and a tar extraction.
        small = mount / "small"
        small.mkdir()
        for index in range(200):
            with open(small / f"s{index}", "wb") as out:
                out.write(os.urandom(4096 * (1 + index % 16)))
                out.flush()
                os.fsync(out.fileno())
        tarball = directory / "include.tar"
        subprocess.run(
            ["tar", "-cf", str(tarball), "-C", "/usr/include", "linux"], check=True, timeout=300
        )
        (mount / "tree").mkdir()
        subprocess.run(
            ["tar", "-xf", str(tarball), "-C", str(mount / "tree")], check=True, timeout=300
        )
        os.sync()
        # Deletes, then fstrim: the space goes back to the pool and to the host's file.
        used_before, allocated_before = _pool_used(dm, pool), os.stat(data).st_blocks * 512
        for name in sorted(sums)[: FILES * 3 // 4]:
            (mount / name).unlink()
        os.sync()
        subprocess.run(["fstrim", str(mount)], check=True, timeout=300)
        freed = (used_before - _pool_used(dm, pool)) * 64 * 1024
        released = allocated_before - os.stat(data).st_blocks * 512
        assert freed >= FILES * 3 // 4 * FILE_BYTES * 9 // 10, (used_before, freed)
        assert released >= FILES * 3 // 4 * FILE_BYTES * 9 // 10, (allocated_before, released)
        assert OUT_OF_SPACE not in klog.text()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], check=False, timeout=120)
        daemon.close()
        teardown(dm, devices, [data, metadata])
        klog.close()
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)
