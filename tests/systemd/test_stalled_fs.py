"""Issue 19, items 2 and 4, under real systemd: a filesystem that stops answering never reaches
the event loop.

A disk that stops answering is modelled with the kernel's own means: an ext4 on a dm-linear
device that the test suspends (`dmsetup suspend --nolockfs`: bios queue, nothing fails), after
dropping the caches, so a lookup there waits on the device like one on a dead NFS server. The
running service (the shipped unit, its watchdog at 6 s here) grows pool b on a healthy
filesystem under a paced writer. While the disk is stalled, `systemctl reload` brings a config
with a new pool c on it: checking c's files (their first lstat) waits on the disk.

What must hold for the 14 s of the stall: the service stays active with the same main process
(no watchdog kill, no restart), b goes on growing under its writer with no out-of-space
episode, and once the disk answers again, c is built. Before 1e0ea1d the reload's lstat of
every pool file ran on the loop thread (and a never-seen file held one global lock): the loop
stopped, b's growths with it, and systemd killed the daemon after WatchdogSec.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.harness import MiB, create_thin, installed_unit, scratch_dir, teardown
from tests.kernel.harness import PatternWriter, kernel_log, verify_stamped
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
CONFIG = Path("/etc/thinwatchd/config.yaml")
OUT_OF_SPACE = "switching pool to out-of-data-space"
STALL_SECONDS = 14.0  # over twice the watchdog (6 s here)
#: b: small, a fixed small mark and steps, so the paced writer needs growths during the stall.
SMALL_POOL: dict[str, object] = {
    "data_size": "64MiB",
    "metadata_size": "16MiB",
    "low_water_mark": 256,
    "reserve": 0,
    "data": {"adaptive_low_water": False, "step": "32MiB", "step_percent": "0%"},
}
FILL, RATE = 160 * MiB, 6.0  # MiB/s: about 27 s, across the stall
SEED = b"items 2 and 4"


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def show(prop: str) -> str:
    return run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


def table_length(dm: DeviceMapper, pool: str) -> int:
    (target,) = dm.table(pool)
    return int(target.length)


@dataclass
class StallingDisk:
    """An ext4 on a dm-linear device over a loop file, mounted at mountpoint."""

    name: str
    mountpoint: Path
    backing: Path

    def stall(self) -> None:
        run("sync")
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        run("dmsetup", "suspend", "--nolockfs", self.name)

    def answer(self) -> None:
        run("dmsetup", "resume", self.name, check=False)


@contextlib.contextmanager
def stalling_disk(directory: Path) -> Iterator[StallingDisk]:
    name = f"twstall-{uuid.uuid4().hex[:6]}"
    backing = directory / "disk.img"
    mountpoint = directory / "stalling"
    mountpoint.mkdir()
    with backing.open("wb") as f:
        f.truncate(256 * MiB)
    loop = LoopControl().attach(str(backing))
    disk = StallingDisk(name, mountpoint, backing)
    try:
        sectors = 256 * MiB // 512
        run("dmsetup", "create", name, "--table", f"0 {sectors} linear /dev/loop{loop.index} 0")
        run("udevadm", "settle")
        run("mkfs.ext4", "-q", "-m", "0", f"/dev/mapper/{name}")
        run("mount", f"/dev/mapper/{name}", str(mountpoint))
        (mountpoint / "pools").mkdir()
        yield disk
    finally:
        disk.answer()
        run("umount", "-l", str(mountpoint), check=False)
        run("dmsetup", "remove", "--retry", name, check=False)
        with contextlib.suppress(Exception):
            LoopControl().detach(loop)


def test_a_stalled_filesystem_never_stops_the_loop() -> None:
    b, c = f"twstb-{uuid.uuid4().hex[:6]}", f"twstc-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / b
    directory.mkdir()
    dm = DeviceMapper()
    b_files = [directory / "data", directory / "metadata"]
    thin = f"{b}-thin"
    c_files: list[Path] = []
    pools: dict[str, dict[str, object]] = {
        b: {"data_file": str(b_files[0]), "metadata_file": str(b_files[1]), **SMALL_POOL}
    }
    daemon: dict[str, object] = {"check_interval": "1s"}
    writer: PatternWriter | None = None
    try:
        with (
            kernel_log() as klog,
            stalling_disk(directory) as disk,
            installed_unit(directory, {"daemon": daemon, "pools": pools}),
        ):
            c_files = [disk.mountpoint / "pools" / "c.data", disk.mountpoint / "pools" / "c.meta"]
            dropin = Path(f"/etc/systemd/system/{UNIT}.d/watchdog.conf")
            dropin.write_text("[Service]\nWatchdogSec=6s\n")
            run("systemctl", "daemon-reload")
            run("systemctl", "start", UNIT)
            pid, since = show("MainPID"), time.strftime("%Y-%m-%d %H:%M:%S")
            device = create_thin(dm, b, thin, 0, 512 * MiB)
            writer = PatternWriter(device, FILL, SEED, rate=RATE)
            time.sleep(2)

            pools[c] = {"data_file": str(c_files[0]), "metadata_file": str(c_files[1])}
            pools[c].update(SMALL_POOL)
            CONFIG.write_text(yaml.safe_dump({"daemon": daemon, "pools": pools}))
            disk.stall()
            stalled_at, length_at_stall = time.monotonic(), table_length(dm, b)
            run("systemctl", "reload", UNIT)
            while time.monotonic() - stalled_at < STALL_SECONDS:
                state = (show("ActiveState"), show("MainPID"), show("NRestarts"))
                assert state == ("active", pid, "0"), (
                    f"{state} {time.monotonic() - stalled_at:.1f} s into the stall\n"
                    + run("journalctl", "-u", UNIT, "--since", since, check=False).stdout
                )
                assert writer.poll() in (None, 0), writer.stderr()
                time.sleep(0.5)
            grown = table_length(dm, b)
            written = writer.written
            assert dm.info(c) is None, "c was built on a disk that does not answer?"
            disk.answer()
            answered = time.monotonic()
            print(
                f"during the {STALL_SECONDS:.0f} s stall: same process, b grew "
                f"{length_at_stall // 2048} -> {grown // 2048} MiB, {written} MiB written"
            )
            assert grown > length_at_stall, "b did not grow while the other disk stalled"

            while dm.info(c) is None:
                assert time.monotonic() - answered < 60, run(
                    "journalctl", "-u", UNIT, "--since", since, check=False
                ).stdout
                time.sleep(0.5)
            print(f"c built {time.monotonic() - answered:.1f} s after the disk answered")
            deadline = time.monotonic() + 120
            while writer.poll() is None:
                assert time.monotonic() < deadline, "the writer did not finish"
                time.sleep(0.5)
            assert writer.succeeded(), writer.stderr()
            bad = verify_stamped(device, FILL, SEED)
            assert not bad, f"{len(bad)} MiB differ, first at {bad[:8]}"
            kernel = klog.text()
            assert OUT_OF_SPACE not in kernel, kernel
            log = run("journalctl", "-u", UNIT, "--since", since, check=False).stdout
            assert "Traceback" not in log and "atchdog" not in log, log
            run("systemctl", "stop", UNIT)
            teardown(dm, [c], c_files)
    finally:
        if writer is not None:
            writer.kill()
        teardown(dm, [thin, b, c], b_files + c_files)
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)
