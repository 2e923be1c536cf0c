"""The systems bench/peers.py compares: each builds a fresh pool and one thin volume, and keeps it
growing (or not) its own way until stop().

Every pool's data starts at START (64 MiB) on a loop device with direct I/O over a file on the
guest's scratch disk, blocks are 64 KiB and block zeroing is off, so only the growth mechanism
and its policy differ. The files are sparse except where a system's own policy allocates them:
thinwatchd's defaults (preallocate: true) allocate each growth of the data file, and the
metadata file (128 MiB) whole.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.fill_bench import ManualPool
from bench.workloads import CONFIGS, pool_usage
from testbed.harness import (
    DaemonProcess,
    GiB,
    MiB,
    create_thin,
    rescue_pool,
    teardown,
    write_config,
)
from thinwatchd.kernel.dm import DeviceMapper

START = 64 * MiB
THIN_SIZE = 8 * GiB
DOCKER_LOW_WATER = 32768  # blocks: Docker 0.7's table (2 GiB at 64 KiB blocks)
TIGHT_MARK, TIGHT_STEP = 256, 128 * MiB  # as bench/workloads.py's tight config
DIY_SCRIPT = Path(__file__).with_name("diy_grow.sh")
LVM_VG = "peersvg"


@dataclass
class Rig:
    """What a workload needs from a system: a thin volume, its pool's dm name, the data file,
    and every file the pool keeps on the host's filesystem (the room it takes there)."""

    thin: str
    pool: str  # the device whose target is thin-pool (status, kernel-log tag)
    backing: Path  # the data file (lvm2: the PV's file)
    files: list[Path]  # data and metadata files (lvm2: the PV's file, which holds both)
    notes: dict[str, Any] = field(default_factory=dict)


class System(Protocol):
    grows: bool  # False: a pool that never grows (the kernel log has no growth to wait for)

    def pids(self) -> list[int]:
        """The processes that grow the pool, for their CPU time (none: in this process)."""
        ...

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig: ...

    def stop(self) -> dict[str, Any]:
        """Tear everything down; return what the cell should also say (logs, errors)."""
        ...


# -- thinwatchd ---------------------------------------------------------------------------------


class Thinwatchd:
    """The real daemon with a config from bench/workloads.py: data_size 64MiB in both, the rest
    the daemon's defaults (preallocate included), or the tight mark and steps."""

    grows = True

    def __init__(self, config: str) -> None:
        self.keys = CONFIGS[config]
        self.daemon: DaemonProcess | None = None
        self.devices: list[str] = []
        self.files: list[Path] = []

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig:
        name = f"tw-{uuid.uuid4().hex[:6]}"
        data, meta = directory / f"{name}.data", directory / f"{name}.meta"
        self.dm, self.devices, self.files = dm, [f"{name}-thin", name], [data, meta]
        keys = {"data_file": str(data), "metadata_file": str(meta), **self.keys}
        config = write_config(directory / f"{name}.yaml", {name: keys})
        self.daemon = DaemonProcess(config, directory / f"{name}.log")
        self.daemon.start()
        thin = create_thin(dm, name, f"{name}-thin", 0, THIN_SIZE)
        return Rig(thin, name, data, [data, meta])

    def pids(self) -> list[int]:
        return [self.daemon.proc.pid] if self.daemon and self.daemon.proc else []

    def stop(self) -> dict[str, Any]:
        notes: dict[str, Any] = {}
        if self.daemon is not None:
            self.daemon.close()
            said = ("grow", "mark", "reload", "error", "warn")
            lines = [
                line for line in self.daemon.log().splitlines() if any(w in line for w in said)
            ]
            notes["daemon_log"] = lines[-30:]
        teardown(self.dm, self.devices, self.files)
        for path in self.files:
            path.unlink(missing_ok=True)
        return notes


# -- pools built by ioctl (bench/fill_bench.py's ManualPool) -------------------------------------


class Manual:
    """A ManualPool; subclasses add what grows it (nothing, here)."""

    grows = True
    low_water = DOCKER_LOW_WATER

    def size(self, mib: int) -> int:
        return START

    def pids(self) -> list[int]:
        return []

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig:
        self.pool = ManualPool(dm, directory, self.size(mib), self.low_water, direct_io=True)
        return Rig(self.pool.thin, self.pool.name, self.pool.data, [self.pool.data, self.pool.meta])

    def stop(self) -> dict[str, Any]:
        self.pool.close()
        return {}


class Presized(Manual):
    """Big enough from the start: the writer's time with no growth at all."""

    grows = False

    def size(self, mib: int) -> int:
        return (mib + 1024) * MiB


class DockerFixed(Manual):
    """Docker 0.7's loopback pool: its table (block 128, low water 32768, queue when full), never
    grown. Writers queue until the kernel's no_space_timeout, then fail."""

    grows = False


class Floor(Manual):
    """The ioctl floor with the tight policy: on each dm event (DM_DEV_ARM_POLL, poll), while
    fewer than 256 blocks are free, ftruncate +128 MiB, LOOP_SET_CAPACITY, TABLE_LOAD, resume.
    No daemon, no config, no logging: what the tight config costs at the least."""

    low_water = TIGHT_MARK

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig:
        own = DeviceMapper()  # the grower's own control fd: polled, and used for its ioctls
        self.pool = ManualPool(own, directory, START, self.low_water, direct_io=True)
        self.stopping = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._grow, args=(own,), daemon=True)
        self.thread.start()
        return Rig(self.pool.thin, self.pool.name, self.pool.data, [self.pool.data, self.pool.meta])

    def _grow(self, dm: DeviceMapper) -> None:
        try:
            while not self.stopping.is_set():
                dm.arm_poll()  # arm first, then look: no event between the two is lost
                usage = pool_usage(dm, self.pool.name)
                if usage["total_blocks"] - usage["used_blocks"] < self.low_water:
                    self.pool.grow(TIGHT_STEP)
                    continue
                select.select([dm], [], [], 0.2)
        except Exception as exc:  # said in the cell's notes, not lost with the thread
            self.error = repr(exc)

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.thread.join(10)
        dm = self.pool.dm
        super().stop()
        dm.close()
        return {"grower_error": self.error} if self.error else {}


class Diy(Manual):
    """Docker's table grown by bench/diy_grow.sh: `dmsetup wait`, `dmsetup status`, truncate,
    `losetup -c`, `dmsetup reload` and `resume`, 1 GiB at a time."""

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig:
        rig = super().start(dm, directory, mib)
        self.log = directory / f"{self.pool.name}.diy.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["sh", str(DIY_SCRIPT), self.pool.name, str(self.pool.data), "1024"],
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own group: kill it whole
            )
        self.await_first_wait()
        return rig

    def pids(self) -> list[int]:
        return [self.proc.pid]  # the shell: its children's CPU counts once it has waited for them

    def await_first_wait(self, timeout: float = 120.0) -> None:
        """Return once the script blocks in its first `dmsetup wait` (the daemons' READY=1):
        its first pass has grown the pool to the table's mark, before any writer."""
        deadline = time.monotonic() + timeout
        while "waiting for event" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"diy_grow.sh not waiting: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        # A reload cut short by the kill would leave the pool suspended: resume it first.
        rescued = rescue_pool(self.pool.dm, self.pool.name, self.pool.data)
        super().stop()
        lines = self.log.read_text(errors="replace").splitlines()
        return {"diy_log": lines[-30:], "rescued": rescued}


# -- lvm2 with dmeventd --------------------------------------------------------------------------

LVM_CONF = """\
devices {
    filter = [ "a|^/dev/loop[0-9]+$|", "r|.*|" ]
    use_devicesfile = 0
    obtain_device_list_from_udev = 0
}
activation {
    # The plain guest runs no udev: lvm makes the /dev nodes itself.
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 1
    monitoring = 1
    thin_pool_autoextend_threshold = 80
    thin_pool_autoextend_percent = 20
}
global {
    use_lvmpolld = 0
}
"""


def lvm(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        ["lvm", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"lvm {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Lvm:
    """lvm2 2.03 as users set it up: a VG on a loop device over a sparse file, a thin pool
    monitored by dmeventd, autoextend 80/20. lvm.conf lives in its own LVM_SYSTEM_DIR, which
    dmeventd (started here, once) inherits; monitoring is checked, not assumed."""

    grows = True
    dmeventd: subprocess.Popen[bytes] | None = None

    def __init__(self, directory: Path) -> None:
        system_dir = directory / "lvm"
        system_dir.mkdir(parents=True, exist_ok=True)
        (system_dir / "lvm.conf").write_text(LVM_CONF)
        self.env = dict(os.environ, LVM_SYSTEM_DIR=str(system_dir), LVM_SUPPRESS_FD_WARNINGS="1")
        for run_dir in ("/run/lock/lvm", "/run/lvm"):
            Path(run_dir).mkdir(parents=True, exist_ok=True)

    def start_dmeventd(self) -> None:
        if Lvm.dmeventd is None:
            Lvm.dmeventd = subprocess.Popen(
                ["dmeventd", "-f"], env=self.env, stderr=subprocess.DEVNULL
            )
            time.sleep(1)

    @classmethod
    def stop_dmeventd(cls) -> None:
        if cls.dmeventd is not None:
            cls.dmeventd.terminate()
            cls.dmeventd.wait(30)
            cls.dmeventd = None

    def start(self, dm: DeviceMapper, directory: Path, mib: int) -> Rig:
        self.start_dmeventd()
        self.dm = dm
        self.pv = directory / "lvm-pv.img"
        with open(self.pv, "wb") as f:
            f.truncate((2 * mib + 4096) * MiB)  # room for 20% steps past the workload
        self.loop = subprocess.run(
            ["losetup", "-f", "--show", "--direct-io=on", str(self.pv)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        lvm("pvcreate", "-q", self.loop, env=self.env)
        lvm("vgcreate", "-q", LVM_VG, self.loop, env=self.env)
        lvm(
            "lvcreate",
            "-q",
            "--type",
            "thin-pool",
            "-n",
            "pool",
            "-L",
            f"{START // MiB}M",
            "--chunksize",
            "64k",
            "--poolmetadatasize",
            "64M",
            "--zero",
            "n",
            LVM_VG,
            env=self.env,
        )
        lvm(
            "lvcreate",
            "-q",
            "-n",
            "thin",
            "-V",
            f"{THIN_SIZE // MiB}M",
            "--thinpool",
            f"{LVM_VG}/pool",
            env=self.env,
        )
        monitored = self.monitor_state()
        if monitored != "monitored":
            lvm("lvchange", "--monitor", "y", f"{LVM_VG}/pool", env=self.env)
            monitored = self.monitor_state()
        if monitored != "monitored":
            raise RuntimeError(f"lvm pool not monitored by dmeventd: {monitored!r}")
        pool = next(
            d.name
            for d in dm.list_devices()
            if d.name.startswith(f"{LVM_VG}-pool") and self._is_pool(d.name)
        )
        (target,) = dm.table(pool)
        notes = {
            "seg_monitor": monitored,
            "table": target.params,
            "low_water_blocks": int(target.params.split()[3]),
        }
        return Rig(f"/dev/mapper/{LVM_VG}-thin", pool, self.pv, [self.pv], notes)

    def pids(self) -> list[int]:
        return [Lvm.dmeventd.pid] if Lvm.dmeventd else []  # lvextend runs inside dmeventd

    def monitor_state(self) -> str:
        out = lvm("lvs", "--noheadings", "-o", "seg_monitor", f"{LVM_VG}/pool", env=self.env)
        return out.strip()

    def _is_pool(self, name: str) -> bool:
        table = self.dm.table(name)
        return len(table) == 1 and table[0].target_type == "thin-pool"

    def stop(self) -> dict[str, Any]:
        notes = {"lvs": self.lvs()}
        for args in (
            ("lvremove", "-q", "-f", LVM_VG),
            ("vgremove", "-q", "-f", LVM_VG),
            ("pvremove", "-q", "-f", self.loop),
        ):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                lvm(*args, env=self.env)
        subprocess.run(["losetup", "-d", self.loop], check=False)
        self.pv.unlink(missing_ok=True)
        return notes

    def lvs(self) -> str:
        try:
            return lvm(
                "lvs", "-a", "-o", "lv_name,lv_size,data_percent,seg_monitor", LVM_VG, env=self.env
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return repr(exc)


def make(name: str, directory: Path) -> System:
    """The system called name (see SYSTEMS)."""
    if name in ("thinwatchd", "thinwatchd-tight"):
        return Thinwatchd("default" if name == "thinwatchd" else "tight")
    if name == "lvm2":
        return Lvm(directory)
    return {"docker-fixed": DockerFixed, "diy": Diy, "presized": Presized, "floor": Floor}[name]()


SYSTEMS = ("presized", "thinwatchd", "thinwatchd-tight", "floor", "lvm2", "diy", "docker-fixed")
