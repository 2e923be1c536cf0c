"""Real-workload benchmark (issue 8): a filesystem on a thin volume, written through the page cache.

Run inside a guest with dm-thin (``bash bench/run_workloads`` boots the VM test bed), as root:

    python -m bench.workloads [--runs N] [--fs ext4,xfs] [--config tight,default]
                              [--workloads large,small,tar,trim]

For each (filesystem, config, workload, run) it builds a fresh pool with the real daemon (data file
starting at 64 MiB), creates an 8 GiB thin volume, makes a filesystem on it, mounts it, runs the
workload, unmounts and tears everything down. Configs:

- ``tight``: low_water_mark 256 blocks (16 MiB), data.step 128MiB, data.step_percent 0%;
- ``default``: the config defaults, except data_size 64MiB.

Workloads:

- ``large``: 16 x 32 MiB files copied (cp) from a random source file, then ``sync``;
- ``small``: many small files (4-64 KiB), each written and fsynced;
- ``tar``: extract a tarball (built once, from /usr/include by default), then ``sync``;
- ``trim``: write files, sync, delete most, ``fstrim`` the mount; the pool's used blocks and the
  data file's allocated bytes before and after.

Measured per run: out-of-data-space episodes (kernel log, for this pool), each data growth's total
("done in") and its DECIDE/FILE/LOOP/RELOAD_MS (the daemon's debug "growth steps (ms)"), the
workload's wall time, and peak Dirty+Writeback from /proc/meminfo, sampled every 100 ms. Growths
during setup (mkfs, mount) are kept apart from the workload's.

A direct-writer phase (dd oflag=direct into a thin of a fresh tight pool) runs at the start and at
the end of the same guest run, so "writeback growth / direct growth" is a within-run ratio.

Prints one JSON object and a markdown table; both also go to $THINWATCHD_VM_OUT (workloads.json,
workloads.md) when set.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
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

from tests.kernel.harness import (
    DaemonProcess,
    GiB,
    KernelLog,
    MiB,
    create_thin,
    rescue_pool,
    scratch_dir,
    teardown,
    write_config,
)
from thinwatchd.kernel.dm import DeviceMapper

OUT_OF_SPACE = "switching pool to out-of-data-space"
LOW_WATER = "reached low water mark for data device"
THIN_SIZE = 8 * GiB
BLOCK_BYTES = 64 * 1024

CONFIGS: dict[str, dict[str, object]] = {
    "tight": {
        "data_size": "64MiB",
        "low_water_mark": 256,
        "data": {"step": "128MiB", "step_percent": "0%"},
    },
    "default": {"data_size": "64MiB"},
}

STEPS_RX = re.compile(r"pool (\S+): data growth steps \(ms\): (\{.*\})")
DONE_RX = re.compile(r"; done in (\d+) ms")


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout)


# -- sampling and parsing ----------------------------------------------------------------------


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
                dirty = int(re.search(r"^Dirty:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
                wb = int(re.search(r"^Writeback:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
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


def parse_growths(log_text: str) -> list[dict[str, float]]:
    """Each data growth in a daemon log: its "done in" ms and its step breakdown."""
    out: list[dict[str, float]] = []
    pending: dict[str, float] | None = None
    for line in log_text.splitlines():
        m = STEPS_RX.search(line)
        if m:
            with contextlib.suppress(ValueError, SyntaxError):
                pending = {k: float(v) for k, v in ast.literal_eval(m.group(2)).items()}
            continue
        m = DONE_RX.search(line)
        if m and pending is not None:
            out.append({"total_ms": float(m.group(1)), **pending})
            pending = None
    return out


def pool_usage(dm: DeviceMapper, name: str) -> dict[str, int]:
    """The pool's used and total data blocks (status read with NOFLUSH: no commit)."""
    (target,) = dm.status(name, noflush=True)
    fields = target.params.split()
    used, total = (int(x) for x in fields[2].split("/"))
    return {"used_blocks": used, "total_blocks": total}


def allocated(path: Path) -> int:
    st = path.stat()
    return st.st_blocks * 512


# -- one pool with the daemon -------------------------------------------------------------------


class Pool:
    """A fresh pool run by the real daemon (debug log), with one thin volume."""

    def __init__(self, dm: DeviceMapper, directory: Path, config: str, thin_size: int) -> None:
        self.dm = dm
        self.name = f"wl-{uuid.uuid4().hex[:6]}"
        self.data = directory / f"{self.name}.data"
        self.meta = directory / f"{self.name}.meta"
        keys = {"data_file": str(self.data), "metadata_file": str(self.meta), **CONFIGS[config]}
        cfg = write_config(directory / f"{self.name}.yaml", {self.name: keys}, log_level="debug")
        self.daemon = DaemonProcess(cfg, directory / f"{self.name}.log")
        self.klog = KernelLog()
        self.thin_name = f"{self.name}-thin"
        self.thin = ""
        self.mounted: Path | None = None
        self.daemon.start()
        self.thin = create_thin(dm, self.name, self.thin_name, 0, thin_size)
        info = dm.info(self.name)
        assert info is not None
        # dm-thin names the pool by its device number in the kernel log: "253:4: reached ..."
        self.tag = f"{os.major(info.dev)}:{os.minor(info.dev)}:"

    def mark(self) -> tuple[int, int]:
        """A point in the daemon log and kernel log, to split phases."""
        return len(self.daemon.log()), len(self.klog.read())

    def since(self, mark: tuple[int, int]) -> dict[str, object]:
        log = self.daemon.log()[mark[0] :]
        records = [m for _, m in self.klog.read()[mark[1] :] if self.tag in m]
        return {
            "out_of_space": sum(1 for m in records if OUT_OF_SPACE in m),
            "low_water_events": sum(1 for m in records if LOW_WATER in m),
            "growths": parse_growths(log),
        }

    def mkfs_mount(self, fs: str, mountpoint: Path) -> None:
        if fs == "ext4":
            # No discard at mkfs, lazy init, and no lazy-init thread after mount: the workload's
            # writes are the only ones (containerd formats with nodiscard too).
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                 self.thin])  # fmt: skip
            opts = "noinit_itable"
        elif fs == "xfs":
            run(["mkfs.xfs", "-q", "-f", "-K", self.thin])
            opts = "defaults"
        else:
            raise SystemExit(f"unknown filesystem {fs!r}")
        mountpoint.mkdir(parents=True, exist_ok=True)
        run(["mount", "-o", opts, self.thin, str(mountpoint)])
        self.mounted = mountpoint

    def close(self) -> None:
        if self.mounted is not None:
            for _ in range(20):
                done = subprocess.run(["umount", str(self.mounted)], capture_output=True,
                                      check=False)  # fmt: skip
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


class Sources:
    """Inputs built once per guest run, on the scratch disk (not tmpfs: /tmp is RAM)."""

    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.directory = directory
        self.args = args
        self.random = directory / "random-32m"
        if not self.random.exists() or self.random.stat().st_size != 32 * MiB:
            with open(self.random, "wb") as f:
                for _ in range(32):
                    f.write(os.urandom(MiB))
        self.tarball = directory / "tree.tar"
        self.tar_info: dict[str, object] = {}

    def ensure_tarball(self) -> Path:
        if not self.tarball.exists():
            start = time.monotonic()
            run(["tar", "-cf", str(self.tarball), "-C", "/", *self.args.tar_source.split(",")],
                timeout=1800)  # fmt: skip
            listing = run(["tar", "-tf", str(self.tarball)]).stdout.splitlines()
            self.tar_info = {
                "source": self.args.tar_source,
                "bytes": self.tarball.stat().st_size,
                "entries": len(listing),
                "build_s": round(time.monotonic() - start, 1),
            }
            say(f"tarball: {self.tar_info}")
        return self.tarball


def w_large(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    for i in range(args.large_files):
        run(["cp", str(src.random), str(mnt / f"large-{i:02d}")])
    run(["sync"])
    return {"files": args.large_files, "mib": args.large_files * 32}


def w_small(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(8)
    blob = os.urandom(64 * 1024)
    total = 0
    for i in range(args.small_files):
        d = mnt / f"d{i // 200:03d}"
        if i % 200 == 0:
            d.mkdir()
        size = rng.randrange(4, 65) * 1024
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, blob[:size])
            os.fsync(fd)
        finally:
            os.close(fd)
        total += size
    return {"files": args.small_files, "mib": round(total / MiB, 1)}


def w_tar(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    run(["tar", "-xf", str(src.tarball), "-C", str(mnt)])
    run(["sync"])
    return {"tarball_mib": round(src.tarball.stat().st_size / MiB, 1)}


def w_trim(mnt: Path, src: Sources, pool: Pool, args: argparse.Namespace) -> dict[str, object]:
    def point() -> dict[str, int]:
        return {**pool_usage(pool.dm, pool.name), "data_file_allocated": allocated(pool.data),
                "data_file_size": pool.data.stat().st_size}  # fmt: skip

    for i in range(args.trim_files):
        run(["cp", str(src.random), str(mnt / f"trim-{i:02d}")])
    run(["sync"])
    written = point()
    keep = max(1, args.trim_files // 4)
    for i in range(keep, args.trim_files):
        (mnt / f"trim-{i:02d}").unlink()
    run(["sync"])
    deleted = point()
    out = run(["fstrim", "-v", str(mnt)]).stdout.strip()
    time.sleep(1.5)  # the pool's periodic commit (1 s) frees the blocks
    trimmed = point()
    return {
        "written_mib": args.trim_files * 32, "deleted_mib": (args.trim_files - keep) * 32,
        "after_write": written, "after_delete": deleted, "after_fstrim": trimmed,
        "fstrim": out,
        "pool_blocks_freed": written["used_blocks"] - trimmed["used_blocks"],
        "file_bytes_released": written["data_file_allocated"] - trimmed["data_file_allocated"],
    }  # fmt: skip


WORKLOADS = {"large": w_large, "small": w_small, "tar": w_tar, "trim": w_trim}


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def one_run(dm: DeviceMapper, directory: Path, src: Sources, fs: str, config: str, workload: str,
            args: argparse.Namespace) -> dict[str, object]:  # fmt: skip
    drop_caches()
    result: dict[str, object] = {"fs": fs, "config": config, "workload": workload}
    pool = Pool(dm, directory, config, THIN_SIZE)
    try:
        start_mark = pool.mark()
        t0 = time.monotonic()
        pool.mkfs_mount(fs, directory / f"{pool.name}.mnt")
        result["setup_s"] = round(time.monotonic() - t0, 2)
        result["setup"] = pool.since(start_mark)
        mark = pool.mark()
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
        pool.close()
    return result


def direct_phase(dm: DeviceMapper, directory: Path, mib: int) -> dict[str, object]:
    """dd oflag=direct into a thin of a fresh tight pool: the reference growth time."""
    drop_caches()
    pool = Pool(dm, directory, "tight", THIN_SIZE)
    try:
        mark = pool.mark()
        t0 = time.monotonic()
        run(["dd", "if=/dev/zero", f"of={pool.thin}", "bs=1M", f"count={mib}", "oflag=direct"])
        wall = time.monotonic() - t0
        time.sleep(0.5)
        out = pool.since(mark)
        out["wall_s"] = round(wall, 2)
        out["mib"] = mib
        return out
    finally:
        pool.close()


# -- summary ------------------------------------------------------------------------------------


def p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarize(result: dict[str, object]) -> str:
    direct = [g for d in result["direct"] for g in d["growths"]]  # type: ignore[attr-defined]
    d_total = p50([g["total_ms"] for g in direct])
    d_reload = p50([g.get("RELOAD_MS", 0.0) for g in direct])
    d_oods = sum(d["out_of_space"] for d in result["direct"])  # type: ignore[attr-defined]
    lines = [
        f"Direct writer (dd oflag=direct, tight pool, {len(result['direct'])} runs): "  # type: ignore[arg-type]
        f"{len(direct)} growths, total p50 {fmt(d_total)} ms "
        f"(max {fmt(max((g['total_ms'] for g in direct), default=None))}), RELOAD p50 "
        f"{fmt(d_reload)} ms, OODS {d_oods}",
        "",
        "| fs | config | workload | runs | OODS total | growths | growth p50 / max ms "
        "| RELOAD p50 / max ms | ratio to direct p50 | wall p50 s | peak Dirty+WB MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in result["runs"]:  # type: ignore[attr-defined]
        groups.setdefault((r["fs"], r["config"], r["workload"]), []).append(r)
    trims = []
    for (fs, config, workload), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        gs = [g for r in ok for g in r["growths"]]
        tot = [g["total_ms"] for g in gs]
        rel = [g.get("RELOAD_MS", 0.0) for g in gs]
        ratio = (p50(tot) / d_total) if tot and d_total else None
        errs = len(runs) - len(ok)
        lines.append(
            f"| {fs} | {config} | {workload} | {len(ok)}{f' ({errs} failed)' if errs else ''} "
            f"| {sum(r['out_of_space'] for r in ok)} "
            f"({sum(1 for r in ok if r['out_of_space'])} runs) | {len(gs)} "
            f"| {fmt(p50(tot))} / {fmt(max(tot, default=None))} "
            f"| {fmt(p50(rel))} / {fmt(max(rel, default=None))} | {fmt(ratio, 2)} "
            f"| {fmt(p50([r['wall_s'] for r in ok]), 1)} "
            f"| {fmt(max((r['peak_dirty_writeback_mib'] for r in ok), default=None))} |"
        )
        if workload == "trim":
            trims.extend((fs, config, r) for r in ok)
    if trims:
        lines += ["", "| fs | config | pool used blocks: written / deleted / fstrim "
                  "| data file allocated MiB: written / deleted / fstrim | fstrim says |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for fs, config, r in trims:
            d = r["detail"]
            a, b, c = d["after_write"], d["after_delete"], d["after_fstrim"]
            lines.append(
                f"| {fs} | {config} | {a['used_blocks']} / {b['used_blocks']} / "
                f"{c['used_blocks']} | {a['data_file_allocated'] / MiB:.0f} / "
                f"{b['data_file_allocated'] / MiB:.0f} / {c['data_file_allocated'] / MiB:.0f} "
                f"| {d['fstrim']} |"
            )
    setup = [r for r in result["runs"] if "setup" in r]  # type: ignore[attr-defined]
    s_oods = sum(r["setup"]["out_of_space"] for r in setup)
    s_g = [g["total_ms"] for r in setup for g in r["setup"]["growths"]]
    lines += [
        "",
        f"Setup (mkfs + mount, not in the table): {len(s_g)} growths, p50 "
        f"{fmt(p50(s_g))} ms, max {fmt(max(s_g, default=None))} ms, OODS {s_oods}",
    ]
    env = result["env"]
    lines.append(f"Guest: {env}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--fs", default="ext4")
    parser.add_argument("--config", default="tight,default")
    parser.add_argument("--workloads", default="large,small,tar,trim")
    parser.add_argument("--large-files", type=int, default=16)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--trim-files", type=int, default=8)
    parser.add_argument("--tar-source", default="usr/include")
    parser.add_argument("--direct-mib", type=int, default=512)
    args = parser.parse_args()
    fss, configs = args.fs.split(","), args.config.split(",")
    workloads = args.workloads.split(",")
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    for fs in fss:
        if shutil.which(f"mkfs.{fs}") is None:
            raise SystemExit(f"mkfs.{fs} not found")
    started = time.monotonic()
    directory = scratch_dir() / "workloads"
    directory.mkdir(exist_ok=True)
    src = Sources(directory, args)
    if "tar" in workloads:
        src.ensure_tarball()
    meminfo = Path("/proc/meminfo").read_text()
    env = {
        "mem_total_mib": int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) // 1024,  # type: ignore[union-attr]
        "dirty_ratio": Path("/proc/sys/vm/dirty_ratio").read_text().strip(),
        "dirty_background_ratio": Path("/proc/sys/vm/dirty_background_ratio").read_text().strip(),
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
    }
    result: dict[str, object] = {"env": env, "args": vars(args), "direct": [], "runs": []}
    out_dir = os.environ.get("THINWATCHD_VM_OUT")

    def save() -> None:
        if out_dir:
            Path(out_dir, "workloads.json").write_text(json.dumps(result, indent=1))

    with DeviceMapper() as dm:
        say("direct phase (start)")
        result["direct"].append(direct_phase(dm, directory, args.direct_mib))  # type: ignore[attr-defined]
        save()
        for run_no in range(args.runs):  # interleaved, so drift hits every cell alike
            for fs in fss:
                for config in configs:
                    for workload in workloads:
                        r = one_run(dm, directory, src, fs, config, workload, args)
                        r["run"] = run_no
                        result["runs"].append(r)  # type: ignore[attr-defined]
                        say(f"{fs}/{config}/{workload} #{run_no}: wall {r.get('wall_s')} s, "
                            f"OODS {r.get('out_of_space')}, growths "
                            f"{[g['total_ms'] for g in r.get('growths', [])]} ms, RELOAD "
                            f"{[g.get('RELOAD_MS') for g in r.get('growths', [])]}, peak "
                            f"D+WB {r.get('peak_dirty_writeback_mib')} MiB")  # fmt: skip
                        save()
        say("direct phase (end)")
        result["direct"].append(direct_phase(dm, directory, args.direct_mib))  # type: ignore[attr-defined]
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
