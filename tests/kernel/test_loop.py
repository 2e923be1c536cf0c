"""LoopControl against the real kernel: attach, find, set_capacity, size, detach."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

import pytest

from tests.kernel.loopback import scratch_dir, unique
from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel import fs
from thinwatchd.kernel.loop import LoopControl

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def test_attach_find_grow_detach() -> None:
    path = scratch_dir() / unique("loopfile")
    fs.Files().create(str(path), Bytes(8 * MiB), preallocate=False)
    loops = LoopControl()
    loop = None
    try:
        assert loops.find(str(path)) is None
        loop = loops.attach(str(path))
        st = path.stat()
        assert (loop.backing_dev, loop.backing_inode) == (st.st_dev, st.st_ino)
        assert os.major(loop.dev) == 7 and os.minor(loop.dev) == loop.index
        assert loops.find(str(path)) == loop
        assert loops.size(loop) == 8 * MiB
        sysfs = Path(f"/sys/block/loop{loop.index}/loop")
        assert (sysfs / "autoclear").read_text().strip() == "0"  # must outlive the daemon
        assert (sysfs / "backing_file").read_text().strip() == str(path)

        fs.Files().grow(str(path), Bytes(24 * MiB), preallocate=False)
        assert loops.size(loop) == 8 * MiB  # the loop only learns on LOOP_SET_CAPACITY
        loops.set_capacity(loop)
        assert loops.size(loop) == 24 * MiB

        loops.detach(loop)
        loop_index, loop = loop.index, None
        # under udev, blkid may still hold the loop open: the kernel then detaches at its close
        deadline = time.monotonic() + 10
        while loops.find(str(path)) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loops.find(str(path)) is None
        assert not Path(f"/sys/block/loop{loop_index}/loop").exists()
    finally:
        if loop is not None:
            with contextlib.suppress(KernelError):
                loops.detach(loop)
        path.unlink()


def test_direct_io_and_a_stale_loop_is_refused() -> None:
    path = scratch_dir() / unique("loopfile")
    fs.Files().create(str(path), Bytes(4 * MiB), preallocate=False)
    loops = LoopControl()
    loop = loops.attach(str(path), direct_io=True)
    try:
        assert Path(f"/sys/block/loop{loop.index}/loop/dio").read_text().strip() == "1"
    finally:
        loops.detach(loop)
        path.unlink()
    deadline = time.monotonic() + 10  # detach is deferred while udev's blkid holds the loop
    while Path(f"/sys/block/loop{loop.index}/loop").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(KernelError) as err:
        loops.size(loop)  # detached: the LoopDevice no longer names that file's loop
    assert err.value.errno == errno.ENXIO


def test_attach_refuses_symlinks() -> None:
    path = scratch_dir() / unique("loopfile")
    link = scratch_dir() / unique("looplink")
    fs.Files().create(str(path), Bytes(MiB), preallocate=False)
    link.symlink_to(path)
    try:
        with pytest.raises(KernelError) as err:
            LoopControl().attach(str(link))
        assert err.value.errno == errno.ELOOP
        with pytest.raises(KernelError):
            LoopControl().find(str(link))
    finally:
        link.unlink()
        path.unlink()
