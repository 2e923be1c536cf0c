"""Peers benchmark (issue 10): thinwatchd beside what users would run instead, in one guest run.

Run inside a guest with dm-thin (``bash bench/run_peers`` boots the VM test bed, then plots):

    python -m bench.peers [--systems a,b,...] [--workloads dd600,dd4096,ext4] [--rounds 2]
                          [--fs-mib 512] [--estimate]

Systems (bench/peer_systems.py), each on a fresh pool and thin volume per workload:

- ``presized``: big enough from the start (the workload + 1 GiB): the baseline for the ratio;
- ``thinwatchd``: the daemon with the config defaults (256 MiB mark, raised to hold the page
  cache's dirty limit; 1 GiB / 20% steps; every growth of the data file allocated, the 128 MiB
  metadata file allocated whole), but data_size 64MiB, as every pool here starts;
- ``thinwatchd-tight``: 16 MiB mark, 128 MiB steps (bench/workloads.py's tight config);
- ``floor``: no daemon; one thread polls for dm events and does the four growth steps by ioctl
  with the tight policy: the least a growth can cost here;
- ``lvm2``: a VG on a loop device over a sparse file, a thin pool monitored by dmeventd with
  thin_pool_autoextend_threshold 80 and _percent 20 (what users set; checked "monitored");
- ``diy``: Docker's table grown by bench/diy_grow.sh (`dmsetup wait` + status, truncate,
  `losetup -c`, `dmsetup reload`/`resume`, 1 GiB steps);
- ``docker-fixed``: Docker 0.7's loopback pool (block 128, low water 32768, queue when full),
  never grown: when and how its writer fails (bounded by ``--writer-timeout``).

Every growing pool starts with 64 MiB of data: what scripts/demo and the earlier benchmarks use,
and small enough that every workload must grow every system several times (thinwatchd, in both
configs, grows at start-up, before any writer, to leave twice its mark free: the mark raised to
the page cache's dirty limit, about 660 MiB in the 3 GiB guest, so 1.3 GiB: that is its policy).
Loops use direct I/O for all, lvm2's included, blocks are 64 KiB and zeroing is off.

Workloads: ``ddN``, dd if=/dev/zero bs=1M oflag=direct of N MiB into the thin volume; ``ext4``:
mkfs.ext4 -E nodiscard on the thin volume, then bench/fs_churn.py (files of 64 KiB-4 MiB, each
fsynced, a quarter deleted) until ``--fs-mib`` or ``--fs-seconds``.

Before the first cell, the scratch disk is written once as far as the largest workload needs
(the host allocates a sparse image's blocks on first write). Every system is set up (daemon
READY=1, the DIY script in its first `dmsetup wait`, lvm2's pool "monitored"), then
``--settle`` (2 s) passes before its writer starts. Measured per (workload,
system): from the kernel log, for this pool (its dm major:minor), the out-of-data-space episodes
and their length, growths, and each "reached low water mark" to the next "growing the data
device" (since the pool's creation, mkfs included; after the writer, up to 15 s for the growth
that answers the last event); the writer's time; its longest stall (its /proc/<pid>/io wchar,
sampled every 50 ms: the longest time it did not move, from its first write to its end); the
CPU time of the process that grows the pool (the daemon, dmeventd, the DIY shell and what it
ran) while the writer ran; the pool's data size and usage every 100 ms (the plot); the room the
pool takes on the host's filesystem (st_blocks * 512 of its data and metadata files; lvm2: the
PV's file, which holds both) against its data in use: at rest (set up, settled, just before the
writer), the most seen every 100 ms from the writer's start to the end, and at the end; at the
end also the pool's data size and the data file's size and allocated bytes.

``--rounds`` (2) runs every cell that often, the systems in reverse order every other round,
docker-fixed once per workload at the end. The table gives medians (writer time: median and
range; the ratio is to presized's median), episodes and event-to-grown times pooled, and the
longest stall; a second table gives each system's room taken beside lvm2's. The host's load
from other guests moves writer times by up to 2x between cells: compare the ratios with that in
mind, and the kernel-log columns first. Room taken does not depend on the host's load.

Writes peers.json and peers.md to $THINWATCHD_VM_OUT when set, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import peer_systems
from bench.peer_probes import Sampler, block_bytes, bounded, cpu_seconds, file_room, sample
from bench.peers_report import (
    Record,
    dd_bytes,
    event_to_grown,
    for_pool,
    growths,
    longest_stall,
    out_of_space_episodes,
    pool_tag,
    regroup,
    report,
    room,
    unanswered_event,
)
from bench.workloads import drop_caches, mkfs_mount, pool_usage, say
from testbed.harness import REPO, KernelLog, MiB, scratch_dir
from thinwatchd.kernel.dm import DeviceMapper

# Guest seconds, for --estimate: per cell set-up and teardown, and per MiB written, measured in
# one full run (TCG, 2 vCPUs, another guest on the host's 2 cores).
SETUP_S = {"thinwatchd": 10.0, "thinwatchd-tight": 10.0, "lvm2": 10.0, "diy": 8.0}
SETUP_OTHER_S = 4.0
S_PER_MIB = {"dd": 0.011, "ext4": 0.035}
SLOWER: dict[str, float] = {}  # none measurably slower per MiB in the first full run
BOOT_S = 90.0  # boot, and warming the scratch disk


def parse_workload(name: str) -> tuple[str, int]:
    """("dd", MiB) for ddN, ("ext4", 0) for ext4 (its size is --fs-mib)."""
    if name == "ext4":
        return "ext4", 0
    if name.startswith("dd") and name[2:].isdigit() and int(name[2:]) > 0:
        return "dd", int(name[2:])
    raise SystemExit(f"unknown workload {name!r}: ddN (MiB) or ext4")


def writer_command(
    kind: str, mib: int, rig: peer_systems.Rig, mnt: Path | None, args: argparse.Namespace
) -> list[str]:
    if kind == "dd":
        return ["dd", "if=/dev/zero", f"of={rig.thin}", "bs=1M", f"count={mib}", "oflag=direct"]
    return [
        sys.executable,
        "-m",
        "bench.fs_churn",
        str(mnt),
        str(args.fs_mib),
        str(args.fs_seconds),
    ]


def write(cmd: list[str], sampler: Sampler, timeout: float) -> dict[str, Any]:
    """Run the writer under the sampler; its time, exit, output and what it wrote."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    sampler.start(proc.pid)
    out: dict[str, Any] = {"timed_out": False}
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out["timed_out"] = True
        stdout, stderr = proc.communicate(timeout=120)
    out["writer_s"] = time.monotonic() - sampler.t0
    out["writer_exit"] = proc.returncode
    last = sampler.progress[-1][1] if sampler.progress else 0
    if cmd[0] == "dd":
        out["written_bytes"] = dd_bytes(stderr) or last
        errors = [line for line in stderr.splitlines() if "error" in line]
        out["writer_says"] = errors[-1].rsplit(": ", 1)[-1] if errors else None
    else:
        report = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
        out["written_bytes"] = report.get("bytes", last)
        out["writer_says"] = report.get("error")
        out["fs_churn"] = report
    return out


def settle_growth(klog: KernelLog, tag: str, grows: bool) -> list[Record]:
    """The pool's kernel log once the growth answering its last event is logged: a slow
    grower's last growth counts too (up to 15 s; a pool that never grows: 1 s)."""
    deadline = time.monotonic() + (15.0 if grows else 1.0)
    while True:
        time.sleep(0.5)
        records = for_pool(klog.read(), tag)
        if not unanswered_event(records) or time.monotonic() > deadline:
            return records


def run_cell(
    dm: DeviceMapper, directory: Path, name: str, workload: str, args: argparse.Namespace
) -> dict[str, Any]:
    kind, mib = parse_workload(workload)
    drop_caches()
    system = peer_systems.make(name, directory)
    klog = KernelLog()
    cell: dict[str, Any] = {}
    mnt: Path | None = None
    started = time.monotonic()
    try:
        rig = system.start(dm, directory, mib or args.fs_mib)
        cell["notes"] = rig.notes
        info = dm.info(rig.pool)
        assert info is not None
        tag = pool_tag(os.major(info.dev), os.minor(info.dev))
        if kind == "ext4":
            mnt = directory / "mnt"
            mkfs_mount(rig.thin, "ext4", mnt)
        time.sleep(args.settle)  # the same quiet start for every system's writer
        block = block_bytes(dm, rig.pool)
        rest = sample(dm, rig.pool, block, rig.files)
        sampler = Sampler(rig.pool, rig.files)
        cpu_before = cpu_seconds(system.pids())
        try:
            cell.update(
                write(writer_command(kind, mib, rig, mnt, args), sampler, args.writer_timeout)
            )
            records = settle_growth(klog, tag, system.grows)
        finally:
            sampler.stop()
        cpu_after = cpu_seconds(system.pids())
        if cpu_before is not None and cpu_after is not None:
            cell["grower_cpu_s"] = round(cpu_after - cpu_before, 2)
        usage = pool_usage(dm, rig.pool)
        end = sample(dm, rig.pool, block, rig.files, time.monotonic() - sampler.t0)
        st = rig.backing.stat()
        cell.update(
            out_of_space=out_of_space_episodes(records),
            growths=growths(records),
            event_to_grown_s=event_to_grown(records),
            longest_stall_s=longest_stall(sampler.progress, cell["writer_s"]),
            pool_data_bytes=end[1],
            backing_size=st.st_size,
            backing_allocated=st.st_blocks * 512,
            **room(rest, sampler.series, end),
            files_end={p.name: file_room(p) for p in rig.files},
            series={
                "t": [round(t, 2) for t, _, _, _ in sampler.series],
                "data_mib": [round(d / MiB, 1) for _, d, _, _ in sampler.series],
                "used_mib": [round(u / MiB, 1) for _, _, u, _ in sampler.series],
                "room_mib": [round(r / MiB, 1) for _, _, _, r in sampler.series],
            },
            kernel_log=[f"[{t:.3f}] {m}" for t, m in records][:200],
        )
        cell["final_usage"] = usage
    except Exception as exc:
        cell["error"] = repr(exc)
        say(f"{workload}/{name}: {exc!r}")
    finally:
        if mnt is not None and bounded(["umount", str(mnt)], 120) != 0:
            bounded(["umount", "-l", str(mnt)], 30)
        try:
            cell.update(system.stop())
        except Exception as exc:  # the next cell gets a fresh pool anyway
            cell["stop_error"] = repr(exc)
            say(f"{workload}/{name}: teardown: {exc!r}")
        klog.close()
    cell["cell_s"] = round(time.monotonic() - started, 1)
    return cell


def schedule(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(round, workload, system) in run order: each round runs every workload on every
    system, the systems in reverse order every other round (so drift in the host's load hits
    all alike). docker-fixed runs once per workload, after everything else: its failure is the
    kernel's timeout, and the cell after it ran slow in the first runs (2x, twice)."""
    systems = [s for s in args.systems.split(",") if s != "docker-fixed"]
    workloads = args.workloads.split(",")
    out = []
    for round_no in range(args.rounds):
        order = systems if round_no % 2 == 0 else systems[::-1]
        out += [(round_no, w, s) for w in workloads for s in order]
    if "docker-fixed" in args.systems.split(","):
        out += [(0, w, "docker-fixed") for w in workloads]
    return out


def summary(cell: dict[str, Any]) -> str:
    return (
        f"writer {cell.get('writer_s', 0):.1f} s, exit {cell.get('writer_exit')}, episodes "
        f"{cell.get('out_of_space')}, growths {cell.get('growths')}, event->grown "
        f"{[round(x, 2) for x in cell.get('event_to_grown_s', [])]}, stall "
        f"{cell.get('longest_stall_s', 0):.2f} s, cell {cell['cell_s']} s, "
        f"error {cell.get('error')}"
    )


def warm_scratch(directory: Path, args: argparse.Namespace) -> float:
    """Write, then delete, as much as the largest workload and 1 GiB more on the scratch disk.

    The scratch disk is a sparse file on the host: the first cell to write 4 GiB paid for the
    host allocating it (presized, first in every first run: 1.5-3x its second round).
    """
    mib = max(parse_workload(w)[1] or args.fs_mib for w in args.workloads.split(",")) + 1024
    warm = directory / "warm"
    started = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={warm}", "bs=1M", f"count={mib}", "oflag=direct"],
        check=True,
        capture_output=True,
    )
    warm.unlink()
    subprocess.run(["sync"], check=False)
    return round(time.monotonic() - started, 1)


def guest_env() -> dict[str, Any]:
    timeout = Path("/sys/module/dm_thin_pool/parameters/no_space_timeout")
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "no_space_timeout_s": int(timeout.read_text()) if timeout.exists() else None,
        "lvm": lvm_version(),
    }


def lvm_version() -> str:
    done = subprocess.run(["lvm", "version"], capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0].strip() if done.stdout else "-"


def estimate_seconds(args: argparse.Namespace) -> float:
    """Expected guest seconds of the selected cells (see SETUP_S and S_PER_MIB)."""
    total = BOOT_S
    for _, workload, system in schedule(args):
        kind, mib = parse_workload(workload)
        total += SETUP_S.get(system, SETUP_OTHER_S)
        if system == "docker-fixed":
            total += 65.0  # the kernel's no_space_timeout (60 s), then the failure
        else:
            total += (mib or args.fs_mib) * S_PER_MIB[kind] * SLOWER.get(system, 1.0)
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--systems",
        default=",".join(peer_systems.SYSTEMS),
        help="comma-separated; presized first gives the ratios",
    )
    parser.add_argument("--workloads", default="dd600,dd4096,ext4")
    parser.add_argument("--fs-mib", type=int, default=512)
    parser.add_argument("--fs-seconds", type=float, default=300.0)
    parser.add_argument(
        "--rounds", type=int, default=2, help="each cell this often (docker-fixed once); medians"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between a system's set-up and its writer"
    )
    parser.add_argument(
        "--writer-timeout",
        type=float,
        default=900.0,
        help="kill a writer after this long (a pool that never grows)",
    )
    parser.add_argument(
        "--estimate", action="store_true", help="print the expected guest seconds and exit"
    )
    args = parser.parse_args(argv)
    for system in args.systems.split(","):
        if system not in peer_systems.SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; known: {', '.join(peer_systems.SYSTEMS)}")
    for workload in args.workloads.split(","):
        parse_workload(workload)
    return args


def main() -> None:
    args = parse_args()
    estimate = estimate_seconds(args)
    if args.estimate:
        say(f"estimate: ~{estimate / 60:.0f} min of guest time (TCG, 2 vCPUs)")
        print(round(estimate))
        return
    started = time.monotonic()
    directory = scratch_dir() / "peers"
    directory.mkdir(exist_ok=True)
    out_dir = os.environ.get("THINWATCHD_VM_OUT")
    result: dict[str, Any] = {
        "args": vars(args),
        "estimate_s": round(estimate),
        "env": guest_env(),
        "runs": [],
        "cells": {},
    }
    say(f"estimate ~{estimate / 60:.0f} min; guest {result['env']}")

    def save() -> None:
        if out_dir:
            Path(out_dir, "peers.json").write_text(json.dumps(result, indent=1))

    result["warm_scratch_s"] = warm_scratch(directory, args)
    say(f"scratch disk warmed in {result['warm_scratch_s']} s")
    with DeviceMapper() as dm:
        try:
            for round_no, workload, system in schedule(args):
                cell = run_cell(dm, directory, system, workload, args)
                result["runs"].append(
                    {"round": round_no, "workload": workload, "system": system, **cell}
                )
                say(f"#{round_no} {workload}/{system}: {summary(cell)}")
                result["cells"] = regroup(result["runs"])
                save()
        finally:
            peer_systems.Lvm.stop_dmeventd()
    result["guest_s"] = round(time.monotonic() - started, 1)
    save()
    text = report(result)
    print(text)
    if out_dir:
        Path(out_dir, "peers.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
