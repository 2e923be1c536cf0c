"""Helpers for kernel and systemd tests that run the real daemon against the real kernel.

Everything here uses thinwatchd's own kernel modules (no dmsetup/losetup), so the tests exercise
the same code paths the daemon does; what bench/ uses as well (the daemon's process, thin
volumes, the kernel log, teardown) is testbed/harness.py. The hostile-host helpers at the end
add the operator's view: run_tool and dm_diagnostics run dmsetup/losetup, as an admin beside
the daemon would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.child import ChildScript
from testbed.harness import (
    DaemonProcess,
    KernelLog,
    MiB,
    SpawnedDaemon,
    create_thin,
    rescue_pool,
    scratch_dir,
    teardown,
    write_config,
)
from thinwatchd.base.logs import MessageId
from thinwatchd.base.units import Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.nodes import UdevNodes


def write_pattern(device: str, size: int, seed: bytes) -> str:
    """Write a deterministic pattern of size bytes (O_DIRECT); return its sha256."""
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, MiB)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in range(0, size, MiB):
            block = hashlib.shake_256(seed + offset.to_bytes(8, "little")).digest(MiB)
            buf[:] = block
            os.pwrite(fd, buf, offset)
            digest.update(block)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest()


def read_checksum(device: str, size: int) -> str:
    """Return the sha256 of the first size bytes of device, read with O_DIRECT."""
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, MiB)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(0, size, MiB):
            n = os.preadv(fd, [buf], offset)
            digest.update(buf[:n])
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest()


@contextlib.contextmanager
def kernel_log() -> Iterator[KernelLog]:
    log = KernelLog()
    try:
        yield log
    finally:
        log.close()


def unit_journal(message_id: MessageId, since: str) -> list[dict[str, str]]:
    """The installed unit's journal entries with this MESSAGE_ID since then, as journalctl's
    JSON gives them (each field a string), oldest first."""
    args = ["journalctl", "-u", "thinwatchd.service", "-o", "json", "--since", since]
    args += [f"MESSAGE_ID={message_id.value}", "--no-pager"]
    out = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -- hostile-host helpers (tests/kernel/test_hostile.py, test_fault_campaign.py) ------------------
#
# Additions only: a writer in a child process (it can sit in D state on a suspended pool, so the
# test itself never does), a cheap verifiable pattern, a sampler of the pool's dm state, and a
# rescue that resumes a stuck pool so a failing test ends with diagnostics instead of a hung guest.

#: The stamp every 4 KiB page of a stamped block starts with: offset, seed tag.
_STAMP = struct.Struct("<QQ")
_PAGE = 4096


def _stamped_base(seed: bytes) -> bytes:
    return hashlib.shake_256(b"stamped:" + seed).digest(MiB)


def stamped_block(seed: bytes, offset: int, base: bytes | None = None) -> bytes:
    """Return the 1 MiB block a stamped pattern holds at byte offset (a multiple of 1 MiB).

    Random bytes from the seed, each 4 KiB page stamped with its own device offset and the
    seed's tag: a lost write reads as zeros, a misplaced one carries the wrong offset. About
    ten times cheaper than write_pattern's shake per MiB under TCG.
    """
    block = bytearray(base if base is not None else _stamped_base(seed))
    tag = int.from_bytes(hashlib.sha256(seed).digest()[:8], "little")
    for page in range(0, MiB, _PAGE):
        _STAMP.pack_into(block, page, offset + page, tag)
    return bytes(block)


def verify_stamped(device: str, size: int, seed: bytes, offset: int = 0) -> list[int]:
    """Read [offset, offset+size) with O_DIRECT; return the offsets of the MiBs that differ."""
    base = _stamped_base(seed)
    buf = mmap.mmap(-1, MiB)
    bad = []
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for at in range(offset, offset + size, MiB):
            n = os.preadv(fd, [buf], at)
            if n != MiB or buf[:] != stamped_block(seed, at, base):
                bad.append(at)
    finally:
        os.close(fd)
        buf.close()
    return bad


_WRITER = r"""
import mmap, os, signal, sys, time
from testbed.harness import MiB
from tests.kernel.harness import _stamped_base, stamped_block
device, size, seed = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
offset, rate = int(sys.argv[4]), float(sys.argv[5])
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))  # finish this MiB, fsync, report
base = _stamped_base(seed)
buf = mmap.mmap(-1, MiB)
fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
start = time.monotonic()
for n, at in enumerate(range(offset, offset + size, MiB)):
    if stop:
        break
    if rate > 0:
        ahead = start + n / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    buf[:] = stamped_block(seed, at, base)
    if os.pwrite(fd, buf, at) != MiB:
        sys.exit(f"short write at {at}")
    print(f"written {n + 1}", flush=True)
os.fsync(fd)
os.close(fd)
print(f"done {time.monotonic() - start:.2f}", flush=True)
"""


class PatternWriter(ChildScript):
    """A child process writing a stamped pattern with O_DIRECT, reporting each MiB written.

    A writer on a suspended pool sits in D state; the test only watches it (progress, poll)
    and can never hang itself. rate (MiB/s, 0 = as fast as it can) paces a fill so that it
    lasts through a campaign.
    """

    def __init__(
        self, device: str, size: int, seed: bytes, *, offset: int = 0, rate: float = 0
    ) -> None:
        self.device, self.size, self.seed, self.offset = device, size, seed, offset
        self.written = 0  # MiB
        self.stop_requested = False
        self.seconds: float | None = None
        self.lines: list[str] = []
        super().__init__(_WRITER, device, str(size), seed.hex(), str(offset), str(rate))

    def heard(self, line: str) -> None:
        if line.startswith("written "):
            self.written = int(line.split()[1])
            self.last_progress = time.monotonic()
        elif line.startswith("done "):
            self.seconds = float(line.split()[1])
        else:
            self.lines.append(line.rstrip())

    def poll(self) -> int | None:
        return self.proc.poll()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the writer for the block (it stops after the write in flight), then SIGCONT."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)
            self.last_progress = time.monotonic()

    def stop_early(self) -> None:
        """Ask the writer to stop after the MiB it is writing (fsync, then exit 0)."""
        self.stop_requested = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def succeeded(self) -> bool:
        """Exited 0 having written (and fsynced) everything it was asked to."""
        if self.proc.poll() != 0:
            return False
        self._reader.join(10)
        complete = self.stop_requested or self.written * MiB >= self.size
        return self.seconds is not None and complete

    def kill(self, timeout: float = 30.0) -> int | None:
        """SIGKILL the writer; return its exit status, or None if it stays in D state."""
        return self.sigkill(timeout)


@dataclass(frozen=True)
class PoolSample:
    at: float  # monotonic
    present: bool
    suspended: bool
    inactive: bool
    length: int | None  # sectors of the active table


class PoolWatch:
    """Samples a pool's dm state (info + active table length) every interval, in a thread.

    DM_DEV_STATUS and DM_TABLE_STATUS (table) do not block on a suspended device, so the
    sampler keeps running while writers hang.
    """

    def __init__(self, name: str, interval: float = 0.25) -> None:
        self.name = name
        self.interval = interval
        self.samples: list[PoolSample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._dm = DeviceMapper()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> PoolSample | None:
        try:
            info = self._dm.info(self.name)
            if info is None:
                s = PoolSample(time.monotonic(), False, False, False, None)
            else:
                table = self._dm.table(self.name) if info.active_present else []
                length = table[0].length if len(table) == 1 else None
                s = PoolSample(
                    time.monotonic(), True, info.suspended, info.inactive_present, length
                )
        except Exception as exc:  # a sampler must not kill the test
            self.errors.append(repr(exc))
            return None
        self.samples.append(s)
        return s

    def suspended_for(self) -> float:
        """Seconds the pool has been suspended without a break, as of the newest sample."""
        since = None
        for s in reversed(self.samples):
            if not s.suspended:
                break
            since = s.at
        return 0.0 if since is None else self.samples[-1].at - since

    def suspended_episodes(self, longer_than: float) -> list[tuple[float, float]]:
        """Return (start, seconds) of every suspension seen for longer than longer_than."""
        out, start, last = [], None, None
        for s in self.samples:
            if s.suspended and start is None:
                start = s.at
            elif not s.suspended and start is not None:
                if s.at - start > longer_than:
                    out.append((start, s.at - start))
                start = None
            last = s.at
        if start is not None and last is not None and last - start > longer_than:
            out.append((start, last - start))
        return out

    def lengths(self) -> list[int]:
        """The distinct active-table lengths seen, in order."""
        out: list[int] = []
        for s in self.samples:
            if s.length is not None and (not out or out[-1] != s.length):
                out.append(s.length)
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self._dm.close()


def run_tool(args: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run an operator's tool (dmsetup, losetup, truncate) with a deadline; never raise."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(args, 124, str(exc.stdout or ""), f"timed out: {exc}")


def dm_diagnostics(name: str) -> str:
    """Return dmsetup's view of a pool (info, status, tables) for a failure message."""
    parts = []
    for args in (
        ["dmsetup", "info", name],
        ["dmsetup", "status", "--noflush", name],
        ["dmsetup", "table", name],
        ["dmsetup", "table", "--inactive", name],
        ["losetup", "-l"],
    ):
        done = run_tool(args, timeout=15)
        parts.append(f"$ {' '.join(args)}  (exit {done.returncode})\n{done.stdout}{done.stderr}")
    return "\n".join(parts)


@dataclass
class HostileEnv:
    """One test's pool: files, daemons, writers, a kernel log; always torn down, never hung."""

    dm: DeviceMapper
    directory: Path
    pool: str
    klog: KernelLog
    devices: list[str]
    daemons: list[DaemonProcess]
    writers: list[PatternWriter]

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def metadata(self) -> Path:
        return self.directory / "metadata"

    def config(self, daemon: dict[str, object] | None = None, **pool: object) -> Path:
        keys: dict[str, object] = {
            "data_file": str(self.data),
            "metadata_file": str(self.metadata),
        }
        keys.update(pool)
        return write_config(self.directory / "config.yaml", {self.pool: keys}, **(daemon or {}))

    def daemon(self, config: Path, *, start: bool = True, timeout: float = 120.0) -> DaemonProcess:
        d = DaemonProcess(config, self.directory / f"daemon{len(self.daemons)}.log")
        self.daemons.append(d)
        if start:
            d.start(timeout)
        return d

    def thin(self, size: int, thin_id: int = 0) -> str:
        name = f"{self.pool}-thin{thin_id}"
        self.devices.insert(0, name)
        return create_thin(self.dm, self.pool, name, thin_id, size)

    def writer(self, device: str, size: int, seed: bytes, **kw: float) -> PatternWriter:
        w = PatternWriter(device, size, seed, **kw)  # type: ignore[arg-type]
        self.writers.append(w)
        return w

    def logs(self) -> str:
        return "\n".join(f"--- {d.log_path.name}\n{d.log()}" for d in self.daemons)

    def table_length(self) -> int:
        (target,) = self.dm.table(self.pool)
        return target.length

    def loop_length(self) -> int:
        """The longest valid table length: the data loop's size in whole 64 KiB blocks."""
        loop = LoopControl().find(str(self.data))
        assert loop is not None
        return LoopControl().size(loop) // 512 // 128 * 128

    def diagnostics(self) -> str:
        return (
            f"{dm_diagnostics(self.pool)}\n--- daemon logs\n{self.logs()[-6000:]}\n"
            f"--- kernel log\n{self.klog.text()[-4000:]}"
        )

    def kill_daemons(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(30)

    def unstick(self) -> str:
        """Stop everything that could hang the guest: daemons, a suspended pool, writers."""
        self.kill_daemons()
        notes = rescue_pool(self.dm, self.pool, self.data)
        for w in self.writers:
            if w.kill() is None:
                notes.append(f"writer {w.proc.pid} stays in D state")
        return "; ".join(notes)


@contextlib.contextmanager
def hostile_env(stem: str = "twhostile") -> Iterator[HostileEnv]:
    """A HostileEnv in a fresh directory on the scratch disk; tears everything down."""
    pool = f"{stem}-{os.getpid()}-{random.randrange(1 << 24):06x}"
    directory = scratch_dir() / pool
    directory.mkdir()
    dm = DeviceMapper()
    klog = KernelLog()
    env = HostileEnv(dm, directory, pool, klog, [pool], [], [])
    try:
        yield env
    except BaseException:
        _keep_logs(env)
        raise
    finally:
        env.unstick()
        for d in env.daemons:
            d.close()
        teardown(dm, env.devices, [env.data, env.metadata])
        klog.close()
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)


def _keep_logs(env: HostileEnv) -> None:
    """A failed test's daemon logs and kernel log go to THINWATCHD_VM_OUT (back to the host)."""
    out = os.environ.get("THINWATCHD_VM_OUT")
    if not out:
        return
    with contextlib.suppress(OSError):
        keep = Path(out) / env.pool
        keep.mkdir(parents=True, exist_ok=True)
        for log in env.directory.glob("*.log"):
            shutil.copy(log, keep / log.name)
        (keep / "kernel.log").write_text(env.klog.text())


def kernel_lines(klog: KernelLog, pattern: str) -> list[str]:
    """Return the kernel log messages so far that match the regex pattern."""
    rx = re.compile(pattern)
    return [m for _, m in klog.read() if rx.search(m)]


def await_writer(
    env: HostileEnv,
    writer: PatternWriter,
    *,
    until_mib: int | None = None,
    until: Callable[[], bool] | None = None,
    deadline: float = 180.0,
    suspended_limit: float = 10.0,
    stall_limit: float = 60.0,
    watch: PoolWatch | None = None,
) -> None:
    """Wait for the writer to finish (or reach until_mib, or until()); fail cleanly, never hang.

    A pool suspended for suspended_limit seconds without a break, a writer without progress
    for stall_limit seconds, or the overall deadline: collect dmsetup's view, the daemon logs
    and the kernel log, unstick everything (kill the daemons, resume the pool, kill the writer)
    and fail with all of it.
    """
    import pytest

    end = time.monotonic() + deadline
    own = watch is None
    watch = watch or PoolWatch(env.pool)
    why = ""
    try:
        while True:
            if until_mib is not None and writer.written >= until_mib:
                return
            if until is not None and until():
                return
            if writer.poll() is not None:
                if not writer.succeeded():
                    why = f"writer failed (exit {writer.poll()}): {writer.stderr()[-2000:]}"
                    break
                return
            if watch.suspended_for() >= suspended_limit:
                why = f"pool suspended for {watch.suspended_for():.1f} s without a break"
                break
            if writer.stalled_for() >= stall_limit:
                why = f"writer made no progress for {writer.stalled_for():.1f} s"
                break
            if time.monotonic() > end:
                why = f"writer not done after {deadline:.0f} s"
                break
            time.sleep(0.2)
    finally:
        if own:
            watch.stop()
    written = f"writer at {writer.written} of {writer.size // MiB} MiB"
    diagnostics = env.diagnostics()
    notes = env.unstick()
    pytest.fail(f"{why} ({written}); unstuck: {notes}\n{diagnostics}", pytrace=False)


def spawn_daemon(env: HostileEnv, config: Path) -> SpawnedDaemon:
    """Start `thinwatchd run` as the unit would and return at once (no wait for READY=1)."""
    d = SpawnedDaemon(config, env.directory / f"daemon{len(env.daemons)}.log")
    env.daemons.append(d)
    d.spawn()
    return d


def build_pool(
    env: HostileEnv, data_size: int, metadata_size: int, low_water_mark: int = 128
) -> None:
    """Build env.pool by hand (sparse files, direct-I/O loops, thin-pool table, resume) as
    thinwatchd would, without starting it: the daemon's next start adopts it."""
    for path, size in ((env.metadata, metadata_size), (env.data, data_size)):
        with open(path, "wb") as f:
            f.truncate(size)
    loops = LoopControl()
    meta = loops.attach(str(env.metadata), direct_io=True)
    data = loops.attach(str(env.data), direct_io=True)
    length = data_size // 512 // 128 * 128
    params = (
        f"{os.major(meta.dev)}:{os.minor(meta.dev)} {os.major(data.dev)}:{os.minor(data.dev)} "
        f"128 {low_water_mark} 1 skip_block_zeroing"
    )
    env.dm.create(env.pool)
    env.dm.load_table(env.pool, [Target(Sectors(0), Sectors(length), "thin-pool", params)])
    UdevNodes().resume_synced(env.dm, env.pool)


@contextlib.contextmanager
def dirty_bytes(limit: int) -> Iterator[None]:
    """vm.dirty_bytes = limit, background at half of it; the old values come back after."""
    vm = Path("/proc/sys/vm")
    keys = ("dirty_bytes", "dirty_background_bytes", "dirty_ratio", "dirty_background_ratio")
    saved = {key: (vm / key).read_text() for key in keys}
    (vm / "dirty_bytes").write_text(str(limit))
    (vm / "dirty_background_bytes").write_text(str(limit // 2))
    try:
        yield
    finally:
        # Writing a *_ratio zeroes its *_bytes and back: restore whichever was in use.
        for kind in ("", "background_"):
            if int(saved[f"dirty_{kind}bytes"]):
                (vm / f"dirty_{kind}bytes").write_text(saved[f"dirty_{kind}bytes"])
            else:
                (vm / f"dirty_{kind}ratio").write_text(saved[f"dirty_{kind}ratio"])
