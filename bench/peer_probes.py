"""What bench/peers.py watches while a writer runs: its progress, the pool and the room its files
take on their filesystem (a sampler thread), the CPU time of the processes that grow the pool,
and commands that must not hang it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

from bench.workloads import pool_usage
from thinwatchd.kernel.dm import DeviceMapper

PROGRESS_EVERY = 0.05  # s between writer-progress samples; every second one also reads the pool

Sample = tuple[float, int, int, int]  # (t, pool data bytes, used bytes, room taken bytes)


def room_taken(files: list[Path]) -> int:
    """Bytes the files take on their filesystem (st_blocks * 512, holes not counted); a file
    that is not there (yet, or any more) takes none."""
    total = 0
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_blocks * 512
    return total


def file_room(path: Path) -> tuple[int, int] | None:
    """A file's size and the bytes it takes (st_blocks * 512), or None if it is not there."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_blocks * 512


def block_bytes(dm: DeviceMapper, pool: str) -> int:
    """The pool's data block size in bytes, from its table."""
    (target,) = dm.table(pool)
    return int(target.params.split()[2]) * 512


def sample(dm: DeviceMapper, pool: str, block: int, files: list[Path], t: float = 0.0) -> Sample:
    """The pool's data size and use (status read with NOFLUSH: no commit) and the room its files
    take, at time t."""
    usage = pool_usage(dm, pool)
    return t, usage["total_blocks"] * block, usage["used_blocks"] * block, room_taken(files)


class Sampler:
    """The writer's progress (wchar) every PROGRESS_EVERY s; every 2nd, the pool's size and use
    and the room its backing files take (data and metadata files; lvm2: the PV's file)."""

    def __init__(self, pool: str, files: list[Path]) -> None:
        self.pool = pool
        self.files = files
        self.pid: int | None = None
        self.t0 = time.monotonic()
        self.progress: list[tuple[float, int]] = []
        self.series: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, pid: int) -> None:
        self.pid, self.t0 = pid, time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        with DeviceMapper() as dm:
            block = block_bytes(dm, self.pool)
            tick = 0
            while not self._stop.is_set():
                t = time.monotonic() - self.t0
                chars = wchar(self.pid)
                if chars is not None:
                    self.progress.append((t, chars))
                if tick % 2 == 0:
                    with contextlib.suppress(Exception):  # a sampler must not end the cell
                        self.series.append(sample(dm, self.pool, block, self.files, t))
                tick += 1
                self._stop.wait(PROGRESS_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wchar(pid: int | None) -> int | None:
    """Bytes the process has passed to write() so far (a direct write counts once done)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pids: list[int]) -> float | None:
    """User+system CPU of the processes and of their waited-for children, or None if none."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total if pids else None


def bounded(args: list[str], timeout: float) -> int | None:
    """Run a command; its exit code, or None if it was still running at timeout (then killed,
    not waited for: a process in D state must not hang the run)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
