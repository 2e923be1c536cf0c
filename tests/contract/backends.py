"""Two kernels behind one test interface: FakeKernel in memory, and the real one (in the VM).

The contract tests run the same scenarios against both, so every behaviour the fake claims is
checked against the real kernel too.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from testbed.fake_kernel import FakeKernel, FakeNodes
from thinwatchd.base.units import Sectors
from thinwatchd.kernel.api import DeviceMapperApi, Kernel, LoopControlApi, Target
from thinwatchd.kernel.fs import Files

BLOCK_BYTES = 64 * 1024


class Backend(Protocol):
    kernel: Kernel
    directory: Path

    def thin(self, pool: str) -> None:
        """Create thin volume 0 in pool (and a device for it)."""

    def write_blocks(self, pool: str, first: int, count: int) -> int:
        """Write count fresh blocks from block index first; return how many succeeded."""

    def write_blocks_async(self, pool: str, first: int, count: int) -> threading.Thread:
        """Start writing in a thread (a writer that may block while the pool is full)."""

    def control_readable(self, timeout: float) -> bool:
        """Return whether the dm control fd polls readable within timeout seconds."""

    def close(self) -> None: ...


class FakeBackend:
    def __init__(self, directory: Path) -> None:
        self.fake = FakeKernel()
        self.kernel = Kernel(self.fake, self.fake, FakeNodes(), Files())
        self.directory = directory
        self.results: dict[int, int] = {}

    def thin(self, pool: str) -> None:
        self.fake.message(pool, "create_thin 0")
        name = f"{pool}-thin"
        self.fake.create(name)
        self.fake.load_table(name, [Target(Sectors(0), Sectors(2**27), "thin", "253:0 0")])
        self.fake.resume(name)

    def write_blocks(self, pool: str, first: int, count: int) -> int:
        return self.fake.write_blocks(pool, count)

    def write_blocks_async(self, pool: str, first: int, count: int) -> threading.Thread:
        # The fake parks blocked writes in queued_blocks; nothing needs a thread.
        t = threading.Thread(target=self.fake.write_blocks, args=(pool, count))
        t.start()
        t.join()
        return t

    def control_readable(self, timeout: float) -> bool:
        return bool(select.select([self.fake.fileno()], [], [], timeout)[0])

    def close(self) -> None:
        self.fake.close()


class RealBackend:
    def __init__(self, directory: Path) -> None:
        from thinwatchd.kernel.dm import DeviceMapper
        from thinwatchd.kernel.loop import LoopControl
        from thinwatchd.kernel.nodes import UdevNodes

        self.dm: DeviceMapperApi = DeviceMapper()
        self.loops: LoopControlApi = LoopControl()
        self.kernel = Kernel(self.dm, self.loops, UdevNodes(), Files())
        self.directory = directory
        self.devices: list[str] = []
        self.thins: dict[str, str] = {}

    def thin(self, pool: str) -> None:
        from testbed.harness import create_thin

        name = f"{pool}-thin"
        self.devices.append(name)
        self.thins[pool] = create_thin(self.dm, pool, name, 0, 64 * 1024**3)  # type: ignore[arg-type]

    def write_blocks(self, pool: str, first: int, count: int) -> int:
        buf = mmap.mmap(-1, BLOCK_BYTES)
        buf[:] = b"\xa5" * BLOCK_BYTES
        fd = os.open(self.thins[pool], os.O_WRONLY | os.O_DIRECT)
        done = 0
        try:
            for i in range(first, first + count):
                try:
                    os.pwrite(fd, buf, i * BLOCK_BYTES)
                except OSError:
                    continue
                done += 1
        finally:
            os.close(fd)
            buf.close()
        return done

    def write_blocks_async(self, pool: str, first: int, count: int) -> threading.Thread:
        t = threading.Thread(target=self.write_blocks, args=(pool, first, count), daemon=True)
        t.start()
        return t

    def control_readable(self, timeout: float) -> bool:
        return bool(select.select([self.dm.fileno()], [], [], timeout)[0])

    def close(self) -> None:
        from testbed.harness import teardown

        names = self.devices[::-1]
        teardown(self.dm, names, [])  # type: ignore[arg-type]
        for path in self.directory.glob("*"):
            with contextlib.suppress(Exception):
                loop = self.loops.find(str(path))
                if loop is not None:
                    self.loops.detach(loop)
        self.dm.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    if kind == "fake":
        b: FakeBackend | RealBackend = FakeBackend(tmp_path)
    else:
        from testbed.harness import scratch_dir

        directory = scratch_dir() / f"contract-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        b = RealBackend(directory)
    try:
        yield b
    finally:
        b.close()
