"""Fill benchmark: thinwatchd against a pre-sized pool and against the physical floor.

Run inside a guest with dm-thin (``bash bench/run``, which boots the VM test bed), as root:

    python -m bench.fill_bench [--mib 600] [--rounds 3]

It measures, in one guest run, so that only ratios matter:

1. presized: dd bs=1M oflag=direct into a thin volume of a pool already big enough (no daemon);
2. thinwatchd: the same write into a pool whose data file starts at 64 MiB, the daemon running
   with its default policy; from the kernel log: out-of-data-space episodes and, for each
   "reached low water mark" event, the time to the next "growing the data device";
3. floor: one process doing the four growth steps by ioctl (ftruncate, LOOP_SET_CAPACITY,
   TABLE_LOAD, resume), idle and under the same full-speed writer.

Prints one JSON object and a human summary with the ratios the issue sets as targets:
writer <= 1.05x presized, zero out-of-space episodes, median event-to-grown <= 1.5x floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path

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
from thinwatchd.base.units import Bytes, Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.fs import Files
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.nodes import UdevNodes

LOW_WATER = "reached low water mark for data device"
GROWING = "growing the data device"
OUT_OF_SPACE = "switching pool to out-of-data-space"
BLOCK = 128  # sectors


def dd(device: str, mib: int) -> float:
    start = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={mib}", "oflag=direct"],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - start


class ManualPool:
    """A pool built directly by ioctl (no daemon), for the presized and floor runs."""

    def __init__(
        self, dm: DeviceMapper, directory: Path, data_size: int, low_water: int, direct_io: bool
    ) -> None:
        self.dm, self.name = dm, f"bench-{uuid.uuid4().hex[:6]}"
        self.data, self.meta = directory / f"{self.name}.data", directory / f"{self.name}.meta"
        Files().create(str(self.meta), Bytes(64 * MiB), preallocate=False)  # reads as zeros
        Files().create(str(self.data), Bytes(data_size), preallocate=False)
        loops = LoopControl()
        self.meta_loop = loops.attach(str(self.meta), direct_io=direct_io)
        self.data_loop = loops.attach(str(self.data), direct_io=direct_io)
        self.low_water = low_water
        dm.create(self.name)
        dm.load_table(self.name, [self.target(data_size)])
        UdevNodes().resume_synced(dm, self.name)
        self.size = data_size
        self.thin = create_thin(dm, self.name, f"{self.name}-thin", 0, 8 * GiB)

    def target(self, size: int) -> Target:
        m, d = self.meta_loop.dev, self.data_loop.dev
        params = (
            f"{os.major(m)}:{os.minor(m)} {os.major(d)}:{os.minor(d)} {BLOCK} "
            f"{self.low_water} 1 skip_block_zeroing"
        )
        return Target(Sectors(0), Sectors(size // 512 // BLOCK * BLOCK), "thin-pool", params)

    def grow(self, by: int) -> float:
        """Do the four growth steps; return their wall time in seconds."""
        start = time.monotonic()
        self.size += by
        os.truncate(self.data, self.size)
        LoopControl().set_capacity(self.data_loop)
        self.dm.load_table(self.name, [self.target(self.size)])
        self.dm.resume(self.name)
        return time.monotonic() - start

    def close(self) -> None:
        teardown(self.dm, [f"{self.name}-thin", self.name], [self.data, self.meta])
        for path in (self.data, self.meta):
            path.unlink(missing_ok=True)


def presized(dm: DeviceMapper, directory: Path, mib: int, direct_io: bool) -> float:
    pool = ManualPool(dm, directory, (mib + 512) * MiB, 32768, direct_io)
    try:
        return dd(pool.thin, mib)
    finally:
        pool.close()


def floor(dm: DeviceMapper, directory: Path, mib: int) -> dict[str, list[float]]:
    """Growth step times idle, and while a full-speed writer fills the pool."""
    pool = ManualPool(dm, directory, 64 * MiB, 32768, direct_io=True)  # as the daemon's loops
    try:
        idle = [pool.grow(64 * MiB) for _ in range(10)]
        pool.grow((mib + 256) * MiB)  # room for the writer; steps below add more
        loaded: list[float] = []
        writer = threading.Thread(target=dd, args=(pool.thin, mib))
        writer.start()
        time.sleep(0.2)
        while writer.is_alive() and len(loaded) < 20:
            loaded.append(pool.grow(64 * MiB))
            time.sleep(0.05)
        writer.join()
        return {"idle": idle, "loaded": loaded}
    finally:
        pool.close()


def with_daemon(dm: DeviceMapper, directory: Path, mib: int) -> dict[str, object]:
    name = f"bench-{uuid.uuid4().hex[:6]}"
    data, meta = directory / f"{name}.data", directory / f"{name}.meta"
    config = write_config(
        directory / f"{name}.yaml",
        {
            name: {
                "data_file": str(data),
                "metadata_file": str(meta),
                "data_size": "64MiB",
                "metadata_size": "64MiB",
            }
        },
        log_level="debug",
    )
    daemon = DaemonProcess(config, directory / f"{name}.log")
    klog = KernelLog()
    try:
        daemon.start()
        thin = create_thin(dm, name, f"{name}-thin", 0, (mib + 1024) * MiB)
        info = dm.info(name)
        assert info is not None
        # dm-thin names the pool by its device number in the kernel log: "253:4: reached ..."
        tag = f"{os.major(info.dev)}:{os.minor(info.dev)}:"
        seconds = dd(thin, mib)
        time.sleep(0.5)
        records = [(t, m) for t, m in klog.read() if tag in m]
        events = [t for t, m in records if LOW_WATER in m]
        grown = [t for t, m in records if GROWING in m]
        latencies = []
        for t in events:
            later = [g for g in grown if g >= t]
            if later:
                latencies.append(later[0] - t)
        return {
            "writer_s": seconds,
            "out_of_space": sum(1 for _, m in records if OUT_OF_SPACE in m),
            "events": len(events),
            "growths": len(grown),
            "event_to_grown_s": latencies,
            "data_file_mib": data.stat().st_size / MiB,
            "daemon_steps": [
                line.split("growth steps (ms): ", 1)[1]
                for line in daemon.log().splitlines()
                if "growth steps" in line
            ],
        }
    finally:
        daemon.close()
        klog.close()
        teardown(dm, [f"{name}-thin", name], [data, meta])
        for path in (data, meta):
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    directory = scratch_dir() / "bench"
    directory.mkdir(exist_ok=True)
    presized_s: list[float] = []
    presized_buffered_s: list[float] = []
    runs: list[dict[str, object]] = []
    result: dict[str, object] = {
        "mib": args.mib,
        "presized_s": presized_s,
        "presized_buffered_s": presized_buffered_s,
        "thinwatchd": runs,
    }
    with DeviceMapper() as dm:
        result["floor"] = floor(dm, directory, args.mib)
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            presized_s.append(presized(dm, directory, args.mib, True))
            presized_buffered_s.append(presized(dm, directory, args.mib, False))
            runs.append(with_daemon(dm, directory, args.mib))
    print(json.dumps(result, indent=1))
    summarize(result)


def summarize(result: dict[str, object]) -> None:
    floor_ = result["floor"]
    assert isinstance(floor_, dict)
    pre = statistics.median(result["presized_s"])  # type: ignore[arg-type]
    runs = result["thinwatchd"]
    assert isinstance(runs, list)
    writer = statistics.median(r["writer_s"] for r in runs)
    lat = [x for r in runs for x in r["event_to_grown_s"]]
    f_idle = statistics.median(floor_["idle"])
    f_load = statistics.median(floor_["loaded"]) if floor_["loaded"] else float("nan")
    print(f"floor: idle {f_idle * 1000:.0f} ms, under writer {f_load * 1000:.0f} ms (median)")
    buffered = statistics.median(result["presized_buffered_s"])  # type: ignore[arg-type]
    print(
        f"writer: presized {pre:.2f} s (direct-I/O loops, as thinwatchd's), thinwatchd "
        f"{writer:.2f} s -> {writer / pre:.3f}x; presized on buffered loops (Docker's) "
        f"{buffered:.2f} s -> {writer / buffered:.3f}x"
    )
    print(f"out-of-data-space episodes: {sum(r['out_of_space'] for r in runs)}")
    if lat:
        med = statistics.median(lat)
        print(
            f"event->grown: median {med * 1000:.0f} ms over {len(lat)} growths "
            f"({med / f_load:.2f}x the loaded floor, {med / f_idle:.2f}x the idle floor)"
        )


if __name__ == "__main__":
    main()
