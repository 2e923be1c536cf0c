"""The shipped unit's sandbox in the systemd guest: what it must allow, and what it denies.

systemd/thinwatchd.service runs as shipped (tests.kernel.harness.installed_unit adds only the
drop-in that points it at this checkout and allows the scratch directory):

- loop devices past minor 255 carry and grow a pool: ``block-loop`` is major 7 for every minor,
  so the unit needs no ``block-blkext`` (major 259, also NVMe disks and their partitions);
- a process in the service's own cgroup (the device policy systemd attached to it) cannot open
  a disk or a blkext device: EPERM, where the same open outside the cgroup gets further;
- ``daemon.metrics_file`` in node_exporter's Debian textfile directory is written by the unit,
  despite ProtectSystem=strict;
- /run/thinwatchd exists for the instance lock and outlives a stop;
- the device allow-list works on the first start even when the loop module is not loaded yet
  (systemd resolves ``block-loop`` from /proc/devices before the service runs);
- ``systemd-analyze security`` scores the unit 2.0 or better.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.harness import REPO, MiB, installed_unit, scratch_dir, teardown
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop_abi import LOOP_CLR_FD, LOOP_MAJOR, LOOP_SET_FD

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
SHIPPED = REPO / "systemd" / UNIT
METRICS_DIR = Path("/var/lib/prometheus/node-exporter")  # node_exporter's Debian default
RUNTIME_DIR = Path("/run/thinwatchd")
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
HIGH_LOOPS = (256, 257)  # the pool's metadata and data loops
BLKEXT_MAJOR = 259

PROBE = """\
import errno, os, sys
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        print(path, "ok")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=300)


def show(prop: str) -> str:
    return run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


def journal(since: str, message_id: MessageId | None = None) -> list[dict[str, str]]:
    match = [f"MESSAGE_ID={message_id.value}"] if message_id else []
    out = run(
        "journalctl", "-u", UNIT, "-o", "json", "--since", since, "--no-pager", *match, check=False
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def log_text(since: str) -> str:
    return "\n".join(str(e.get("MESSAGE", "")) for e in journal(since))


def pool_config(pool: str, directory: Path, **daemon: object) -> dict[str, object]:
    """A small pool: 64 MiB of data under the default 2 GiB mark, so it grows at start-up."""
    keys = {
        "data_file": str(directory / "data"),
        "metadata_file": str(directory / "metadata"),
        "data_size": "64MiB",
        "metadata_size": "16MiB",
    }
    return {"daemon": {"check_interval": "2s", **daemon}, "pools": {pool: keys}}


def loop_bound(index: int) -> bool:
    return Path(f"/sys/block/loop{index}/loop").is_dir()  # only while bound


@contextlib.contextmanager
def high_minor_loops(filler: Path) -> Iterator[list[int]]:
    """Make LOOP_CTL_GET_FREE (what the daemon asks) hand out loop256 and then loop257.

    GET_FREE returns the lowest unbound existing loop, so every existing loop below 256 is bound
    to filler, and loop256 and loop257 are added unbound. Yields the occupied indexes; undoes
    it all afterwards (the pool's own loops must be detached first).
    """
    occupied: list[int] = []
    added: list[int] = []
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    file_fd = os.open(filler, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/sys/block"):
            found = re.fullmatch(r"loop(\d+)", name)
            if found and int(found[1]) < HIGH_LOOPS[0] and not loop_bound(int(found[1])):
                fd = os.open(f"/dev/{name}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, LOOP_SET_FD, file_fd)
                finally:
                    os.close(fd)
                occupied.append(int(found[1]))
        for index in HIGH_LOOPS:
            try:
                fcntl.ioctl(ctl, LOOP_CTL_ADD, index)
                added.append(index)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            assert not loop_bound(index), f"loop{index} is already in use"
        yield occupied
    finally:
        for index in occupied:
            with contextlib.suppress(OSError):
                fd = os.open(f"/dev/loop{index}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, LOOP_CLR_FD, 0)
                finally:
                    os.close(fd)
        for index in added:
            for _ in range(50):  # EBUSY while udev still probes it
                try:
                    fcntl.ioctl(ctl, LOOP_CTL_REMOVE, index)
                    break
                except OSError:
                    time.sleep(0.1)
        os.close(file_fd)
        os.close(ctl)


def probe(paths: list[str], cgroup: str | None) -> dict[str, str]:
    """Open each path read-only in a child, inside cgroup if given; return path -> ok/ERRNO."""

    def join() -> None:
        if cgroup is not None:
            Path(f"/sys/fs/cgroup{cgroup}/cgroup.procs").write_text("0")

    out = subprocess.run(
        [sys.executable, "-c", PROBE, *paths],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=join,
        timeout=120,
    ).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


@dataclass
class RunningUnit:
    pool: str
    directory: Path
    dm: DeviceMapper
    since: str


@pytest.fixture(scope="class")
def running_unit() -> Iterator[RunningUnit]:
    """The unit started on a pool whose loops are loop256 and loop257, metrics to METRICS_DIR."""
    pool = f"twhard-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    filler = directory / "filler"
    filler.write_bytes(b"")
    os.truncate(filler, MiB)
    made = [d for d in (METRICS_DIR.parent, METRICS_DIR) if not d.exists()]
    METRICS_DIR.mkdir(parents=True, exist_ok=True)  # as the node-exporter package makes it
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    dm = DeviceMapper()
    config = pool_config(pool, directory, metrics_file=str(METRICS_DIR / "thinwatchd.prom"))
    try:
        with high_minor_loops(filler), installed_unit(directory, config):
            try:
                done = run("systemctl", "start", UNIT, check=False)
                assert done.returncode == 0, done.stderr + log_text(since)
                yield RunningUnit(pool, directory, dm, since)
            finally:
                run("systemctl", "stop", UNIT, check=False)
                teardown(dm, [pool], [directory / "data", directory / "metadata"])
    finally:
        dm.close()
        (METRICS_DIR / "thinwatchd.prom").unlink(missing_ok=True)
        for made_dir in reversed(made):
            with contextlib.suppress(OSError):
                made_dir.rmdir()
        shutil.rmtree(directory, ignore_errors=True)


class TestShippedUnit:
    def test_loops_past_minor_255_carry_and_grow_the_pool(self, running_unit: RunningUnit) -> None:
        unit = running_unit
        deadline = time.monotonic() + 120
        while not (grown := journal(unit.since, MessageId.DATA_GROWN)):
            assert time.monotonic() < deadline, "no growth:\n" + log_text(unit.since)
            time.sleep(1)
        assert grown[0]["POOL"] == unit.pool
        assert show("ActiveState") == "active" and show("NRestarts") == "0"
        (target,) = unit.dm.table(unit.pool)
        meta_dev, data_dev = target.params.split()[:2]
        devices = [tuple(int(x) for x in d.split(":")) for d in (meta_dev, data_dev)]
        assert devices == [(LOOP_MAJOR, HIGH_LOOPS[0]), (LOOP_MAJOR, HIGH_LOOPS[1])], target
        # The growth reached loop257 (LOOP_SET_CAPACITY needs it open) and the table.
        data_size = os.stat(unit.directory / "data").st_size
        assert int(grown[-1]["NEW_SIZE_BYTES"]) == data_size > 64 * MiB
        loop_size = int(Path(f"/sys/block/loop{HIGH_LOOPS[1]}/size").read_text()) * 512
        assert loop_size == data_size
        assert target.length * 512 == data_size // (64 * 1024) * (64 * 1024)

    def test_the_page_cache_counters_are_readable(self, running_unit: RunningUnit) -> None:
        """ProcSubset=pid would hide /proc/meminfo and /proc/vmstat: growths would then ignore
        writeback. A growth carries the counters it was decided with."""
        grown = journal(running_unit.since, MessageId.DATA_GROWN)
        assert grown, log_text(running_unit.since)
        assert "DIRTY_BYTES" in grown[0] and "WRITEBACK_BYTES" in grown[0], grown[0]
        assert "dirty counters" not in log_text(running_unit.since)

    def test_devices_outside_the_allow_list_are_denied(self, running_unit: RunningUnit) -> None:
        cgroup = show("ControlGroup")
        assert cgroup.endswith(f"/{UNIT}")
        blkext = running_unit.directory / "blkext0"  # no such device: only the cgroup says EPERM
        os.mknod(blkext, stat.S_IFBLK | 0o600, os.makedev(BLKEXT_MAJOR, 0))
        disks = [
            n
            for n in sorted(os.listdir("/sys/block"))
            if not n.startswith(("loop", "dm-", "ram", "zram"))
        ]
        assert disks, "no disk to probe"
        disk = f"/dev/{disks[0]}"  # the guest's scratch disk, /dev/vda
        loops = [f"/dev/loop{index}" for index in HIGH_LOOPS]
        controls = ["/dev/mapper/control", "/dev/loop-control"]
        allowed = [*loops, f"/dev/mapper/{running_unit.pool}", *controls]
        denied = [disk, str(blkext)]
        outside = probe(allowed + denied, None)
        assert outside == {**dict.fromkeys(allowed, "ok"), disk: "ok", str(blkext): "ENXIO"}
        inside = probe(allowed + denied, cgroup)
        assert inside == {**dict.fromkeys(allowed, "ok"), **dict.fromkeys(denied, "EPERM")}

    def test_metrics_file_in_node_exporters_directory(self, running_unit: RunningUnit) -> None:
        metrics = METRICS_DIR / "thinwatchd.prom"
        deadline = time.monotonic() + 60
        while not metrics.exists():
            assert time.monotonic() < deadline, "no metrics file:\n" + log_text(running_unit.since)
            time.sleep(1)
        text = metrics.read_text()
        assert f'thinwatchd_data_total_bytes{{pool="{running_unit.pool}"}}' in text
        # node_exporter runs as its own user (prometheus on Debian): it must read the file.
        assert stat.S_IMODE(metrics.stat().st_mode) == 0o644
        assert not any(p.name.startswith(".") for p in METRICS_DIR.iterdir())  # no temp left

    def test_runtime_directory_outlives_a_stop(self, running_unit: RunningUnit) -> None:
        st = RUNTIME_DIR.stat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        run("systemctl", "stop", UNIT)
        assert RUNTIME_DIR.is_dir(), "RuntimeDirectoryPreserve=yes keeps a manual run's lock"


def test_first_start_works_before_the_loop_module_is_loaded() -> None:
    """systemd turns DeviceAllow=block-loop into a rule only if /proc/devices lists "loop" when
    it sets up the service's cgroup, before any ExecStartPre=. Unload loop and start."""
    if not Path("/sys/module/loop/initstate").exists():
        pytest.skip("loop is built into this kernel (or not loaded): nothing to unload")
    unloaded = run("rmmod", "loop", check=False)
    if unloaded.returncode != 0:
        pytest.skip(f"loop is in use, cannot unload it: {unloaded.stderr.strip()}")
    pool = f"twmod-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    dm = DeviceMapper()
    try:
        assert "loop" not in Path("/proc/devices").read_text().split()
        with installed_unit(directory, pool_config(pool, directory)):
            try:
                done = run("systemctl", "start", UNIT, check=False)
                assert done.returncode == 0, done.stderr + log_text(since)
                assert show("NRestarts") == "0", log_text(since)
                assert os.path.exists(f"/dev/mapper/{pool}")
            finally:
                run("systemctl", "stop", UNIT, check=False)
                teardown(dm, [pool], [directory / "data", directory / "metadata"])
    finally:
        dm.close()
        run("modprobe", "loop", check=False)
        shutil.rmtree(directory, ignore_errors=True)


def test_security_exposure_at_most_2() -> None:
    out = run("systemd-analyze", "security", "--offline=true", "--no-pager", str(SHIPPED)).stdout
    found = re.search(rf"Overall exposure level for {UNIT}: (\d+\.\d+)", out)
    assert found, out
    assert float(found[1]) <= 2.0, out
