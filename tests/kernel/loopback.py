"""Helpers for kernel tests: sparse loop-backed files and suffixed dm devices that always go away.

Everything a test creates carries a per-run suffix, and teardown touches only those names, so a
failing test never removes somebody else's device and never leaves its own behind.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel import fs
from thinwatchd.kernel.api import LoopDevice
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.dm_abi import COOKIE_MAGIC
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.udev_sync import UdevSync

__all__ = ["Devices", "loop_devices", "open_dm", "scratch_dir", "unique"]

_counter = itertools.count()
SUFFIX = f"twtest{os.getpid()}"


def unique(stem: str) -> str:
    """Return a dm/file name that only this test run uses."""
    return f"{stem}-{SUFFIX}-{next(_counter)}"


def scratch_dir() -> Path:
    """Return THINWATCHD_SCRATCH (the VM's ext4 disk), or a temporary directory."""
    return Path(os.environ.get("THINWATCHD_SCRATCH") or tempfile.gettempdir())


def semaphores_left() -> list[int]:
    """Return the keys of libdm cookie semaphores that exist now (/proc/sysvipc/sem)."""
    keys = []
    with open("/proc/sysvipc/sem", encoding="ascii") as f:
        next(f, None)
        for line in f:
            key = int(line.split()[0]) & 0xFFFFFFFF
            if key >> 16 == COOKIE_MAGIC:
                keys.append(key)
    return keys


def open_dm() -> DeviceMapper:
    """Open /dev/mapper/control; skip outside CI when this kernel has no device-mapper."""
    try:
        return DeviceMapper()
    except KernelError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT, errno.ENXIO) and not os.environ.get("CI"):
            pytest.skip(
                f"no device-mapper here ({exc}); run: .venv/bin/python -m tests.vm run -- "
                ".venv/bin/python -m pytest tests/kernel"
            )
        raise


class Devices:
    """Tracks dm devices a test created; remove_all() removes them newest first."""

    def __init__(self, dm: DeviceMapper, udev: UdevSync | None = None) -> None:
        self.dm = dm
        self.udev = udev or UdevSync()
        self.names: list[str] = []

    def track(self, name: str) -> str:
        self.names.append(name)
        return name

    def remove(self, name: str) -> None:
        """Remove one tracked device, synced with udev, and its node without udev."""
        self.udev.synced(name, lambda cookie: self.dm.remove(name, cookie))
        self.udev.remove_node(name)
        self.names.remove(name)

    def remove_all(self) -> None:
        errors: list[BaseException] = []
        for name in reversed(list(self.names)):
            try:
                info = self.dm.info(name)
                if info is not None:
                    if info.suspended:
                        self.dm.resume(name)  # release queued I/O before removing
                    self.remove(name)
                else:
                    self.names.remove(name)
            except BaseException as exc:  # keep going: remove everything we can
                errors.append(exc)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def loop_devices(*sizes: int) -> Iterator[list[tuple[Path, LoopDevice]]]:
    """Create sparse files of these sizes on the scratch disk, attach loops; always tear down."""
    loops = LoopControl()
    made: list[tuple[Path, LoopDevice]] = []
    paths: list[Path] = []
    try:
        for size in sizes:
            path = scratch_dir() / unique("loop")
            fs.Files().create(str(path), Bytes(size), preallocate=False)
            paths.append(path)
            made.append((path, loops.attach(str(path))))
        yield made
    finally:
        for _path, loop in made:
            with contextlib.suppress(KernelError):
                loops.detach(loop)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
