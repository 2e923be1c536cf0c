"""Real-workload benchmark (issue 8): a filesystem on a thin volume, written through the page cache.

Run inside a guest with dm-thin (``bash bench/run_workloads`` boots the VM test bed), as root:

    python -m bench.workloads [--runs N] [--fs ext4,xfs] [--config tight,default]
                              [--workloads large,small,tar,trim] [--dirty-ratio N] [sizes...]

For each (filesystem, config, workload, run) it builds a fresh pool with the real daemon (data file
starting at 64 MiB), creates a thin volume (8 GiB, or twice the largest workload), makes a
filesystem on it without discards at mkfs (ext4 ``-E nodiscard``, xfs ``-K``), mounts it, runs
the workload, unmounts and tears everything down. Configs:

- ``tight``: low_water_mark 256 blocks (16 MiB), data.step 128MiB, data.step_percent 0%;
- ``default``: the config defaults (2 GiB mark), except data_size 64MiB.

Workloads (sizes are options; the defaults make a pool whose mark is ~600 MiB grow several times):

- ``large``: ``--large-mib`` (2048) in 32 MiB files copied (cp) from a random source file, then
  ``sync``; with the ``default`` config ``--default-large-mib`` (5120), as its pool starts by
  growing to ~4 GiB free;
- ``small``: small files (``--small-kib`` 4-256, uniform), each written and fsynced, until
  ``--small-mib`` (1024) or ``--small-files`` or ``--small-seconds`` (8), whichever comes first:
  an fsync per file costs a pool commit, so in practice the time cap ends it (~100 MiB);
- ``tar``: extract a tarball (of ``--tar-source``, /usr/include by default: ~110 MiB, 8,800
  entries) into separate directories until ``--tar-mib`` (512) is extracted, then ``sync``;
- ``trim``: ``--trim-mib`` (1024) in 32 MiB files, sync, delete three quarters, ``fstrim`` the
  mount; the pool's used blocks and the data file's allocated bytes before and after.

Measured per run: out-of-data-space episodes (kernel log, for this pool), each data growth's total
("done in") and its DECIDE/FILE/LOOP/RELOAD_MS (the daemon's debug "growth steps (ms)"), Dirty and
Writeback at the growth's decision (the daemon's debug "growth decided with Dirty ..., Writeback
... bytes", when it logs one), whether the kernel's low-water event came within the second before
the growth started (or the daemon grew early), the workload's wall time, and peak Dirty+Writeback
from /proc/meminfo, sampled every 100 ms. Growths during setup (mkfs, mount) are kept apart from
the workload's.

A direct-writer phase (dd oflag=direct, ``--direct-mib``, into a thin of a fresh tight pool) runs
at the start and at the end of the same guest run, so "writeback growth / direct growth" is a
within-run ratio.

``--dirty-ratio N`` sets vm.dirty_ratio=N and vm.dirty_background_ratio=N/2 for the runs (the old
values are put back at the end). ``--estimate`` prints the expected guest seconds and exits;
``--prepare`` (on the host: ``bench/run_workloads`` runs it before the boot) first builds the
tarball in .cache/bench/, which the guest copies instead of reading the tree over 9p.

Prints one JSON object and a markdown table; both also go to $THINWATCHD_VM_OUT (workloads.json,
workloads.md) when set.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

OUT_OF_SPACE = "switching pool to out-of-data-space"
LOW_WATER = "reached low water mark for data device"
CLOCK_MARK = "thinwatchd-bench clock"
MIN_THIN_SIZE = 8 << 30
BLOCK_BYTES = 64 * 1024
MiB = 1 << 20
PAGE = 4096
FILE_MIB = 32  # the random source file that large and trim copy
EARLY_WINDOW_S = 1.0  # a low-water event this long before a growth's start triggered it

CONFIGS: dict[str, dict[str, object]] = {
    "tight": {
        "data_size": "64MiB",
        "low_water_mark": 256,
        "data": {"step": "128MiB", "step_percent": "0%"},
    },
    "default": {"data_size": "64MiB"},
}

LOG_TIME_RX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
DECIDED_RX = re.compile(
    r"pool (\S+): (data|metadata) growth decided with Dirty (\d+), Writeback (\d+) bytes"
)
STEPS_RX = re.compile(r"pool (\S+): (data|metadata) growth steps \(ms\): (\{.*\})")
DONE_RX = re.compile(r"; done in (\d+) ms")

# Guest-time model for --estimate: seconds per MiB written and fixed costs, measured in one
# `--runs 1 --fs ext4,xfs --config tight,default` guest run (TCG, 2 vCPUs, 3 GiB, host otherwise
# idle; ext4 is ~25% slower than xfs in large). A second guest on the 2 cores doubles them.
RATE_S_PER_MIB = {"large": 0.0105, "trim": 0.0095, "tar": 0.040, "direct": 0.0047}
RUN_OVERHEAD_S = 6.0  # per run: daemon start (3.5 s), mkfs, mount, umount, teardown
FSTRIM_S = 2.0  # the trim workload's delete, sync, fstrim and the wait for the pool's commit
BOOT_S = 20.0  # guest boot and power-off, the random source file
TARBALL_S = {"built": 30.0, "copied": 3.0}  # in the guest from --tar-source, or from the host's
TAR_COPY_MIB = 110  # /usr/include's tarball content (Debian 12 with this project's -dev packages)
HOST_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)


# -- sampling and parsing ----------------------------------------------------------------------


def meminfo_kib(text: str, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
    return int(m.group(1)) if m else 0


def vmstat(key: str) -> int:
    m = re.search(rf"^{key} (\d+)$", Path("/proc/vmstat").read_text(), re.M)
    return int(m.group(1)) if m else 0


def dirty_thresholds_mib() -> dict[str, float]:
    """The kernel's current global dirty limits (what balance_dirty_pages enforces)."""
    return {
        "nr_dirty_threshold_mib": round(vmstat("nr_dirty_threshold") * PAGE / MiB, 1),
        "nr_dirty_background_threshold_mib": round(
            vmstat("nr_dirty_background_threshold") * PAGE / MiB, 1
        ),
    }


class MemSampler:
    """Peak Dirty, Writeback and Dirty+Writeback (kB) from /proc/meminfo every interval."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_dirty = self.peak_writeback = self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open("/proc/meminfo", os.O_RDONLY)
        try:
            while not self._stop.is_set():
                text = os.pread(fd, 8192, 0).decode()
                dirty, wb = meminfo_kib(text, "Dirty"), meminfo_kib(text, "Writeback")
                self.peak_dirty = max(self.peak_dirty, dirty)
                self.peak_writeback = max(self.peak_writeback, wb)
                self.peak_sum = max(self.peak_sum, dirty + wb)
                self.samples += 1
                self._stop.wait(self.interval)
        finally:
            os.close(fd)

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def result(self) -> dict[str, float]:
        return {
            "peak_dirty_mib": round(self.peak_dirty / 1024, 1),
            "peak_writeback_mib": round(self.peak_writeback / 1024, 1),
            "peak_dirty_writeback_mib": round(self.peak_sum / 1024, 1),
            "mem_samples": self.samples,
        }


def log_time(line: str) -> float | None:
    """The wall-clock time of a daemon log line (its asctime, local time), or None."""
    m = LOG_TIME_RX.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def parse_growths(log_text: str) -> list[dict[str, Any]]:
    """Each data growth in a daemon log: its "done in" ms, its step breakdown, and, when the
    daemon logged them, Dirty and Writeback (bytes) at its decision. ``started`` is the growth's
    start in wall-clock seconds (the steps line's time less its steps)."""
    out: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    decided: dict[str, tuple[int, int]] = {}
    for line in log_text.splitlines():
        m = DECIDED_RX.search(line)
        if m:
            decided[m.group(2)] = (int(m.group(3)), int(m.group(4)))
            continue
        m = STEPS_RX.search(line)
        if m:
            target = m.group(2)
            seen = decided.pop(target, None)
            if target != "data":
                pending = None
                continue
            with contextlib.suppress(ValueError, SyntaxError, AttributeError):
                pending = {k: float(v) for k, v in ast.literal_eval(m.group(3)).items()}
            if pending is None:
                continue
            at = log_time(line)
            if at is not None:
                pending["started"] = at - sum(v for k, v in pending.items()) / 1000
            if seen is not None:
                pending["dirty_bytes"], pending["writeback_bytes"] = seen
            continue
        m = DONE_RX.search(line)
        if m and pending is not None:
            out.append({"total_ms": float(m.group(1)), **pending})
            pending = None
    return out


def pool_usage(dm: Any, name: str) -> dict[str, int]:
    """The pool's used and total data blocks (status read with NOFLUSH: no commit)."""
    (target,) = dm.status(name, noflush=True)
    fields = target.params.split()
    used, total = (int(x) for x in fields[2].split("/"))
    return {"used_blocks": used, "total_blocks": total}


def allocated(path: Path) -> int:
    st = path.stat()
    return st.st_blocks * 512


def clock_mark() -> None:
    """Write the wall-clock time into the kernel log, to map its timestamps onto wall time."""
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    try:
        os.write(fd, f"{CLOCK_MARK} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def clock_offset(records: list[tuple[float, str]]) -> float | None:
    """Wall time minus kernel-log time, from our clock marks (their median), or None."""
    offsets = []
    for ts, message in records:
        if message.startswith(CLOCK_MARK):
            with contextlib.suppress(ValueError, IndexError):
                offsets.append(float(message.split()[2]) - ts)
    return statistics.median(offsets) if offsets else None


def mkfs_mount(device: str, fs: str, mountpoint: Path) -> None:
    """Make fs on device and mount it at mountpoint (also used by bench/peers.py)."""
    if fs == "ext4":
        # No discard at mkfs, lazy init, and no lazy-init thread after mount: the workload's
        # writes are the only ones (containerd formats with nodiscard too).
        run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                device,
            ]
        )
        opts = "noinit_itable"
    elif fs == "xfs":
        run(["mkfs.xfs", "-q", "-f", "-K", device])  # -K: no discard at mkfs
        opts = "defaults"
    else:
        raise SystemExit(f"unknown filesystem {fs!r}")
    mountpoint.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", fs, "-o", opts, device, str(mountpoint)])


# -- one pool with the daemon -------------------------------------------------------------------


class Pool:
    """A fresh pool run by the real daemon (debug log), with one thin volume."""

    def __init__(self, dm: Any, directory: Path, config: str, thin_size: int) -> None:
        from testbed.harness import DaemonProcess, KernelLog, create_thin, write_config

        self.dm = dm
        self.name = f"wl-{uuid.uuid4().hex[:6]}"
        self.data = directory / f"{self.name}.data"
        self.meta = directory / f"{self.name}.meta"
        keys = {"data_file": str(self.data), "metadata_file": str(self.meta), **CONFIGS[config]}
        cfg = write_config(directory / f"{self.name}.yaml", {self.name: keys}, log_level="debug")
        self.daemon = DaemonProcess(cfg, directory / f"{self.name}.log")
        self.klog = KernelLog()
        clock_mark()
        self.thin_name = f"{self.name}-thin"
        self.thin = ""
        self.mounted: Path | None = None
        self.daemon.start()
        self.thin = create_thin(dm, self.name, self.thin_name, 0, thin_size)
        info = dm.info(self.name)
        assert info is not None
        # dm-thin names the pool by its device number in the kernel log: "253:4: reached ..."
        self.tag = f"{os.major(info.dev)}:{os.minor(info.dev)}:"

    def mark(self) -> tuple[int, int, float]:
        """A point in the daemon log and kernel log (and the wall clock), to split phases."""
        return len(self.daemon.log()), len(self.klog.read()), time.time()

    def since(self, mark: tuple[int, int, float]) -> dict[str, Any]:
        clock_mark()
        log = self.daemon.log()[mark[0] :]
        every = self.klog.read()
        offset = clock_offset(every)
        records = [(t, m) for t, m in every[mark[1] :] if self.tag in m]
        low_water = [t + offset for t, m in records if LOW_WATER in m] if offset is not None else []
        growths = parse_growths(log)
        for g in growths:
            started = g.pop("started", None)
            if started is None or offset is None:
                continue
            g["at_s"] = round(started - mark[2], 2)
            # The daemon wakes on the event and its growth's clock starts then; an early growth
            # (free space still above the kernel's mark) has no event right before it.
            g["after_low_water"] = any(
                started - EARLY_WINDOW_S <= t <= started + 0.05 for t in low_water
            )
        return {
            "out_of_space": sum(1 for _, m in records if OUT_OF_SPACE in m),
            "low_water_events": sum(1 for _, m in records if LOW_WATER in m),
            "growths": growths,
        }

    def mkfs_mount(self, fs: str, mountpoint: Path) -> None:
        mkfs_mount(self.thin, fs, mountpoint)
        self.mounted = mountpoint

    def close(self) -> None:
        from testbed.harness import rescue_pool, teardown

        if self.mounted is not None:
            for _ in range(20):
                done = subprocess.run(
                    ["umount", str(self.mounted)], capture_output=True, check=False
                )
                if done.returncode == 0:
                    break
                time.sleep(0.5)
        self.daemon.close()
        notes = rescue_pool(self.dm, self.name, self.data)
        if notes:
            say(f"rescue {self.name}: {notes}")
        teardown(self.dm, [self.thin_name, self.name], [self.data, self.meta])
        self.klog.close()
        for path in (self.data, self.meta):
            path.unlink(missing_ok=True)


# -- workloads ----------------------------------------------------------------------------------


def tarball_name(source: str) -> str:
    return "tree-" + re.sub(r"[^A-Za-z0-9]+", "_", source).strip("_") + ".tar"


def build_tarball(path: Path, source: str) -> dict[str, Any]:
    """tar -cf path -C / source..., and its size, content bytes and entries (also in path.json)."""
    start = time.monotonic()
    partial = path.with_suffix(".partial")
    run(["tar", "-cf", str(partial), "-C", "/", *source.split(",")], timeout=1800)
    listing = run(["tar", "-tvf", str(partial)]).stdout.splitlines()
    info = {
        "source": source,
        "bytes": partial.stat().st_size,
        "content_bytes": sum(int(line.split()[2]) for line in listing if line[:1] == "-"),
        "entries": len(listing),
        "build_s": round(time.monotonic() - start, 1),
    }
    path.with_suffix(".json").write_text(json.dumps(info))
    partial.rename(path)
    return info


def host_tarball(source: str) -> Path:
    """Where the host builds the tarball (bench/run_workloads); the guest sees the same path."""
    return HOST_CACHE / tarball_name(source)


def prepare(args: argparse.Namespace) -> None:
    """On the host, before the guest: build the tar workload's tarball (seconds here, minutes
    in the guest over 9p)."""
    if "tar" in args.workloads.split(","):
        path = host_tarball(args.tar_source)
        if not path.exists() or not path.with_suffix(".json").exists():
            HOST_CACHE.mkdir(parents=True, exist_ok=True)
            say(f"tarball: {build_tarball(path, args.tar_source)} in {path}")


class Sources:
    """Inputs built once per guest run, on the scratch disk (not tmpfs: /tmp is RAM)."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.directory = directory
        self.args = args
        self.random = directory / f"random-{FILE_MIB}m"
        if not self.random.exists() or self.random.stat().st_size != FILE_MIB * MiB:
            with open(self.random, "wb") as f:
                for _ in range(FILE_MIB):
                    f.write(os.urandom(MiB))
        self.tarball = directory / tarball_name(args.tar_source)
        self.tar_info: dict[str, Any] = {}

    def ensure_tarball(self) -> Path:
        """The tarball on the scratch disk: the host's copy (bench/run_workloads builds it),
        else built here from --tar-source."""
        if self.tar_info:
            return self.tarball
        start = time.monotonic()
        host = host_tarball(self.args.tar_source)
        if host.exists() and host.with_suffix(".json").exists():
            shutil.copyfile(host, self.tarball)
            self.tar_info = {
                **json.loads(host.with_suffix(".json").read_text()),
                "copied_from": str(host),
            }
        else:
            self.tar_info = build_tarball(self.tarball, self.args.tar_source)
        self.tar_info["guest_s"] = round(time.monotonic() - start, 1)
        say(f"tarball: {self.tar_info}")
        return self.tarball


def copies(mib: int) -> int:
    return max(1, math.ceil(mib / FILE_MIB))


def large_mib(config: str, args: argparse.Namespace) -> int:
    return int(args.default_large_mib if config == "default" else args.large_mib)


def w_large(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    n = copies(large_mib(args.current_config, args))
    for i in range(n):
        run(["cp", str(src.random), str(mnt / f"large-{i:03d}")])
    run(["sync"])
    return {"files": n, "mib": n * FILE_MIB}


def w_small(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(8)
    lo, hi = (int(x) for x in args.small_kib.split("-"))
    blob = os.urandom(hi * 1024)
    target = args.small_mib * MiB
    deadline = time.monotonic() + args.small_seconds
    total = files = 0
    stopped_by = "mib"
    while total < target:
        if files >= args.small_files:
            stopped_by = "files"
            break
        if time.monotonic() >= deadline:
            stopped_by = "seconds"
            break
        d = mnt / f"d{files // 200:04d}"
        if files % 200 == 0:
            d.mkdir()
        size = rng.randint(lo, hi) * 1024
        fd = os.open(d / f"f{files:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, blob[:size])
            os.fsync(fd)
        finally:
            os.close(fd)
        total += size
        files += 1
    return {"files": files, "mib": round(total / MiB, 1), "stopped_by": stopped_by}


def w_tar(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    per_copy = src.tar_info["content_bytes"] or src.tarball.stat().st_size
    n = max(1, math.ceil(args.tar_mib * MiB / per_copy))
    for i in range(n):
        target = mnt / f"tar-{i:02d}"
        target.mkdir()
        run(["tar", "-xf", str(src.tarball), "-C", str(target)])
    run(["sync"])
    return {"copies": n, "mib": round(n * per_copy / MiB, 1)}


def w_trim(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    def point() -> dict[str, int]:
        return {
            **pool_usage(pool.dm, pool.name),
            "data_file_allocated": allocated(pool.data),
            "data_file_size": pool.data.stat().st_size,
        }

    n = copies(args.trim_mib)
    for i in range(n):
        run(["cp", str(src.random), str(mnt / f"trim-{i:03d}")])
    run(["sync"])
    written = point()
    keep = max(1, n // 4)
    for i in range(keep, n):
        (mnt / f"trim-{i:03d}").unlink()
    run(["sync"])
    deleted = point()
    t0 = time.monotonic()
    out = run(["fstrim", "-v", str(mnt)]).stdout.strip()
    fstrim_s = round(time.monotonic() - t0, 2)
    time.sleep(1.5)  # the pool's periodic commit (1 s) frees the blocks
    trimmed = point()
    return {
        "mib": n * FILE_MIB,
        "written_mib": n * FILE_MIB,
        "deleted_mib": (n - keep) * FILE_MIB,
        "after_write": written,
        "after_delete": deleted,
        "after_fstrim": trimmed,
        "fstrim": out,
        "fstrim_s": fstrim_s,
        "pool_blocks_freed": written["used_blocks"] - trimmed["used_blocks"],
        "file_bytes_released": written["data_file_allocated"] - trimmed["data_file_allocated"],
    }


WORKLOADS = {"large": w_large, "small": w_small, "tar": w_tar, "trim": w_trim}


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def thin_size(args: argparse.Namespace) -> int:
    """8 GiB, or twice the largest workload (rounded up to GiB), whichever is larger."""
    largest: int = max(
        args.large_mib,
        args.default_large_mib,
        args.trim_mib,
        args.tar_mib,
        args.small_mib,
        args.direct_mib,
    )
    return max(MIN_THIN_SIZE, math.ceil(2 * largest / 1024) << 30)


def one_run(
    dm: Any,
    directory: Path,
    src: Sources,
    fs: str,
    config: str,
    workload: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    drop_caches()
    result: dict[str, Any] = {"fs": fs, "config": config, "workload": workload}
    result.update(dirty_thresholds_mib())
    started = time.monotonic()
    pool = Pool(dm, directory, config, thin_size(args))
    result["pool_start_s"] = round(time.monotonic() - started, 2)
    try:
        start_mark = pool.mark()
        t0 = time.monotonic()
        pool.mkfs_mount(fs, directory / f"{pool.name}.mnt")
        result["setup_s"] = round(time.monotonic() - t0, 2)
        result["setup"] = pool.since(start_mark)
        mark = pool.mark()
        args.current_config = config
        with MemSampler() as mem:
            t0 = time.monotonic()
            result["detail"] = WORKLOADS[workload](pool.mounted, src, pool, args)  # type: ignore[arg-type]
            result["wall_s"] = round(time.monotonic() - t0, 2)
        time.sleep(0.5)  # a growth that began at the end logs its "done in"
        result.update(pool.since(mark))
        result.update(mem.result())
        result["final_pool"] = pool_usage(dm, pool.name)
        result["data_file_size"] = pool.data.stat().st_size
    except Exception as exc:
        result["error"] = repr(exc)
        tail = pool.daemon.log()[-3000:]
        say(f"error in {fs}/{config}/{workload}: {exc!r}\n{tail}")
    finally:
        t0 = time.monotonic()
        pool.close()
        result["close_s"] = round(time.monotonic() - t0, 2)
    result["run_s"] = round(time.monotonic() - started, 1)
    return result


def direct_phase(dm: Any, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """dd oflag=direct into a thin of a fresh tight pool: the reference growth time."""
    drop_caches()
    started = time.monotonic()
    pool = Pool(dm, directory, "tight", thin_size(args))
    try:
        mark = pool.mark()
        t0 = time.monotonic()
        run(
            [
                "dd",
                "if=/dev/zero",
                f"of={pool.thin}",
                "bs=1M",
                f"count={args.direct_mib}",
                "oflag=direct",
            ]
        )
        wall = time.monotonic() - t0
        time.sleep(0.5)
        out = pool.since(mark)
        out["wall_s"] = round(wall, 2)
        out["mib"] = args.direct_mib
    finally:
        pool.close()
    out["run_s"] = round(time.monotonic() - started, 1)
    return out


# -- guest settings -----------------------------------------------------------------------------

VM = Path("/proc/sys/vm")
DIRTY_KNOBS = ("dirty_ratio", "dirty_background_ratio", "dirty_bytes", "dirty_background_bytes")


@contextlib.contextmanager
def dirty_ratio(ratio: int | None) -> Any:
    """vm.dirty_ratio=ratio and vm.dirty_background_ratio=ratio/2 inside; the old values after."""
    if ratio is None:
        yield
        return
    saved = {k: (VM / k).read_text().strip() for k in DIRTY_KNOBS}
    (VM / "dirty_ratio").write_text(f"{ratio}\n")
    (VM / "dirty_background_ratio").write_text(f"{max(1, ratio // 2)}\n")
    say(
        f"vm.dirty_ratio={ratio}, vm.dirty_background_ratio={max(1, ratio // 2)} "
        f"(were {saved['dirty_ratio']}/{saved['dirty_background_ratio']})"
    )
    try:
        yield
    finally:
        # Writing a *_bytes knob zeroes its *_ratio twin and back: put back the one in force.
        pairs = [
            ("dirty_ratio", "dirty_bytes"),
            ("dirty_background_ratio", "dirty_background_bytes"),
        ]
        for ratio_key, bytes_key in pairs:
            key = bytes_key if saved[bytes_key] != "0" else ratio_key
            with contextlib.suppress(OSError):
                (VM / key).write_text(saved[key] + "\n")
        now = {k: (VM / k).read_text().strip() for k in DIRTY_KNOBS}
        say(f"vm dirty settings put back: {now}")


def guest_env() -> dict[str, object]:
    meminfo = Path("/proc/meminfo").read_text()
    return {
        "mem_total_mib": meminfo_kib(meminfo, "MemTotal") // 1024,
        **{k: (VM / k).read_text().strip() for k in DIRTY_KNOBS},
        **dirty_thresholds_mib(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }


# -- estimate and summary -----------------------------------------------------------------------


def workload_seconds(workload: str, config: str, args: argparse.Namespace) -> float:
    """Expected guest seconds of one run of a workload (with its pool's set-up and teardown)."""
    if workload == "large":
        work = copies(large_mib(config, args)) * FILE_MIB * RATE_S_PER_MIB["large"]
    elif workload == "trim":
        work = copies(args.trim_mib) * FILE_MIB * RATE_S_PER_MIB["trim"] + FSTRIM_S
    elif workload == "tar":
        work = math.ceil(args.tar_mib / TAR_COPY_MIB) * TAR_COPY_MIB * RATE_S_PER_MIB["tar"]
    else:
        work = args.small_seconds
    return RUN_OVERHEAD_S + work


def estimate_seconds(args: argparse.Namespace) -> float:
    fss, configs, workloads = args.fs.split(","), args.config.split(","), args.workloads.split(",")
    total = BOOT_S + 2 * (RUN_OVERHEAD_S + args.direct_mib * RATE_S_PER_MIB["direct"])
    if "tar" in workloads:
        prebuilt = host_tarball(args.tar_source).exists()
        total += TARBALL_S["copied" if prebuilt else "built"]
    per_run = sum(workload_seconds(w, c, args) for c in configs for w in workloads)
    return float(total + args.runs * len(fss) * per_run)


def p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def p90(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return xs[0] if xs else None
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarize(result: dict[str, Any]) -> str:
    direct = [g for d in result["direct"] for g in d["growths"]]
    d_total = p50([g["total_ms"] for g in direct])
    d_reload = p50([g.get("RELOAD_MS", 0.0) for g in direct])
    d_oods = sum(d["out_of_space"] for d in result["direct"])
    phases = ", ".join(
        f"{fmt(p50([g['total_ms'] for g in d['growths']]))} ms in {d['wall_s']} s"
        for d in result["direct"]
    )
    lines = [
        f"Direct writer (dd oflag=direct, {result['args']['direct_mib']} MiB, tight pool, "
        f"{len(result['direct'])} runs): {len(direct)} growths, total p50 {fmt(d_total)} ms "
        f"(max {fmt(max((g['total_ms'] for g in direct), default=None))}), RELOAD p50 "
        f"{fmt(d_reload)} ms, OODS {d_oods}; per phase (start, end): growth p50 {phases}",
        "",
        "| fs | config | workload | runs | MiB p50 | OODS total (runs) | growths (early) "
        "| growth p50 / p90 / max ms | RELOAD p50 / max ms | ratio to direct p50 "
        "| Dirty+WB at decision p50 MiB | wall p50 s | peak Dirty+WB MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["runs"]:
        groups.setdefault((r["fs"], r["config"], r["workload"]), []).append(r)
    trims: list[tuple[str, str, dict[str, Any]]] = []
    for (fs, config, workload), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        gs = [g for r in ok for g in r["growths"]]
        tot = [g["total_ms"] for g in gs]
        rel = [g.get("RELOAD_MS", 0.0) for g in gs]
        at_decision = [
            (g["dirty_bytes"] + g["writeback_bytes"]) / MiB for g in gs if "dirty_bytes" in g
        ]
        known = [g for g in gs if "after_low_water" in g]
        early = sum(1 for g in known if not g["after_low_water"])
        early_s = f"{early}" if len(known) == len(gs) else f"{early} of {len(known)}"
        ratio = (p50(tot) / d_total) if tot and d_total else None  # type: ignore[operator]
        errs = len(runs) - len(ok)
        lines.append(
            f"| {fs} | {config} | {workload} | {len(ok)}{f' ({errs} failed)' if errs else ''} "
            f"| {fmt(p50([float(r['detail'].get('mib', 0)) for r in ok]))} "
            f"| {sum(r['out_of_space'] for r in ok)} "
            f"({sum(1 for r in ok if r['out_of_space'])}) | {len(gs)} ({early_s}) "
            f"| {fmt(p50(tot))} / {fmt(p90(tot))} / {fmt(max(tot, default=None))} "
            f"| {fmt(p50(rel))} / {fmt(max(rel, default=None))} | {fmt(ratio, 2)} "
            f"| {fmt(p50(at_decision))} "
            f"| {fmt(p50([r['wall_s'] for r in ok]), 1)} "
            f"| {fmt(max((r['peak_dirty_writeback_mib'] for r in ok), default=None))} |"
        )
        if workload == "trim":
            trims.extend((fs, config, r) for r in ok)
    if trims:
        lines += [
            "",
            "| fs | config | pool used blocks: written / deleted / fstrim "
            "| data file allocated MiB: written / deleted / fstrim | fstrim s "
            "| fstrim says |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for fs, config, r in trims:
            d = r["detail"]
            a, b, c = d["after_write"], d["after_delete"], d["after_fstrim"]
            lines.append(
                f"| {fs} | {config} | {a['used_blocks']} / {b['used_blocks']} / "
                f"{c['used_blocks']} | {a['data_file_allocated'] / MiB:.0f} / "
                f"{b['data_file_allocated'] / MiB:.0f} / {c['data_file_allocated'] / MiB:.0f} "
                f"| {d.get('fstrim_s', '-')} | {d['fstrim']} |"
            )
    setup = [r for r in result["runs"] if "setup" in r]
    s_oods = sum(r["setup"]["out_of_space"] for r in setup)
    s_g = [g["total_ms"] for r in setup for g in r["setup"]["growths"]]
    env = result["env"]
    lines += [
        "",
        f"Setup (mkfs + mount, not in the table): {len(s_g)} growths, p50 "
        f"{fmt(p50(s_g))} ms, max {fmt(max(s_g, default=None))} ms, OODS {s_oods}",
        f"Guest: {env['mem_total_mib']} MiB, vm.dirty_ratio {env['dirty_ratio']}, "
        f"dirty_background_ratio {env['dirty_background_ratio']} (dirty_bytes "
        f"{env['dirty_bytes']}, dirty_background_bytes {env['dirty_background_bytes']}), "
        f"nr_dirty_threshold {env['nr_dirty_threshold_mib']} MiB, "
        f"nr_dirty_background_threshold {env['nr_dirty_background_threshold_mib']} MiB, "
        f"kernel {env['kernel']}, {env['cpus']} CPUs",
        f"Guest time: {result.get('guest_s')} s (estimated {result.get('estimate_s')} s); "
        "growths (early) counts growths with no kernel low-water event in the second before.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--fs", default="ext4")
    parser.add_argument("--config", default="tight,default")
    parser.add_argument("--workloads", default="large,small,tar,trim")
    parser.add_argument("--large-mib", type=int, default=2048)
    parser.add_argument(
        "--default-large-mib",
        type=int,
        default=5120,
        help="large with the default config (its pool starts ~4 GiB)",
    )
    parser.add_argument("--small-mib", type=int, default=1024)
    parser.add_argument("--small-files", type=int, default=100_000)
    parser.add_argument("--small-seconds", type=float, default=8.0)
    parser.add_argument("--small-kib", default="4-256", help="file sizes, uniform, KiB")
    parser.add_argument("--tar-mib", type=int, default=512)
    parser.add_argument("--tar-source", default="usr/include")
    parser.add_argument("--trim-mib", type=int, default=1024)
    parser.add_argument("--direct-mib", type=int, default=2048)
    parser.add_argument("--dirty-ratio", type=int, default=None)
    parser.add_argument(
        "--estimate", action="store_true", help="print the expected guest seconds and exit"
    )
    parser.add_argument(
        "--prepare", action="store_true", help="on the host: build the tarball, then as --estimate"
    )
    args = parser.parse_args(argv)
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    for c in args.config.split(","):
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    for fs in args.fs.split(","):
        if fs not in ("ext4", "xfs"):
            raise SystemExit(f"unknown filesystem {fs!r}; known: ext4, xfs")
    return args


def main() -> None:
    args = parse_args()
    if args.prepare:
        prepare(args)
    estimate = estimate_seconds(args)
    if args.estimate or args.prepare:
        say(f"estimate: ~{estimate / 60:.0f} min of guest time (TCG, 2 vCPUs)")
        print(round(estimate))
        return
    from testbed.harness import scratch_dir
    from thinwatchd.kernel.dm import DeviceMapper

    fss, configs = args.fs.split(","), args.config.split(",")
    workloads = args.workloads.split(",")
    for fs in fss:
        if shutil.which(f"mkfs.{fs}") is None:
            raise SystemExit(f"mkfs.{fs} not found (xfs: apt-get install xfsprogs on the host)")
        if fs not in Path("/proc/filesystems").read_text().split():
            subprocess.run(["modprobe", fs], check=False)
    say(
        f"estimate: ~{estimate / 60:.0f} min of guest time; thin volume {thin_size(args) >> 30} GiB"
    )
    started = time.monotonic()
    directory = scratch_dir() / "workloads"
    directory.mkdir(exist_ok=True)
    src = Sources(directory, args)
    if "tar" in workloads:
        src.ensure_tarball()
    result: dict[str, Any] = {
        "args": vars(args),
        "estimate_s": round(estimate),
        "direct": [],
        "runs": [],
    }
    out_dir = os.environ.get("THINWATCHD_VM_OUT")

    def save() -> None:
        if out_dir:
            Path(out_dir, "workloads.json").write_text(json.dumps(result, indent=1))

    with dirty_ratio(args.dirty_ratio), DeviceMapper() as dm:
        result["env"] = guest_env()
        say(f"guest: {result['env']}")
        say("direct phase (start)")
        result["direct"].append(direct_phase(dm, directory, args))
        save()
        for run_no in range(args.runs):  # interleaved, so drift hits every cell alike
            for fs in fss:
                for config in configs:
                    for workload in workloads:
                        r = one_run(dm, directory, src, fs, config, workload, args)
                        r["run"] = run_no
                        result["runs"].append(r)
                        gs = r.get("growths", [])
                        say(
                            f"{fs}/{config}/{workload} #{run_no}: run {r.get('run_s')} s, wall "
                            f"{r.get('wall_s')} s, {r.get('detail', {}).get('mib')} MiB, OODS "
                            f"{r.get('out_of_space')}, growths {[g['total_ms'] for g in gs]} ms, "
                            f"RELOAD {[g.get('RELOAD_MS') for g in gs]}, early "
                            f"{[not g.get('after_low_water', True) for g in gs]}, D+WB at "
                            f"decision {[g.get('dirty_bytes') for g in gs]}/"
                            f"{[g.get('writeback_bytes') for g in gs]}, peak D+WB "
                            f"{r.get('peak_dirty_writeback_mib')} MiB"
                        )
                        save()
        say("direct phase (end)")
        result["direct"].append(direct_phase(dm, directory, args))
    result["tarball"] = src.tar_info
    result["guest_s"] = round(time.monotonic() - started, 1)
    save()
    print(json.dumps(result, indent=1))
    table = summarize(result)
    print()
    print(table)
    if out_dir:
        Path(out_dir, "workloads.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
