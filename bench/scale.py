"""Scale benchmark (issue 9): one daemon, many pools; does a growth cost the same with 64 pools?

Run inside a guest with dm-thin (``bash bench/run_scale`` boots the VM test bed), as root:

    python -m bench.scale [--pools 64] [--writers 8] [--idle-pools 200] [--idle-s 30] [sizes...]

Every pool has the same config: data_size 64MiB, metadata_size 16MiB, low_water_mark 256 blocks
(16 MiB), data.step 128MiB, data.step_percent 0% and data.adaptive_low_water false, so the mark
stays at 16 MiB and every growth happens under a direct writer. Phases, in one guest run, each
with a daemon of its own (one instance per host) and its pools' files on the scratch disk:

- ``A``: 1 pool: start-up (daemon start to READY=1), idle CPU over ``--idle-s``, then one
  ``dd if=/dev/zero bs=1M oflag=direct`` of ``--a-mib`` into a thin volume;
- ``B``: ``--pools`` pools: start-up, idle CPU, then ``--writers`` dd processes of ``--b-mib``
  each, started together, on as many pools' thin volumes;
- ``A2``: phase A's writer again, after B, so drift shows (``--no-a2``: none);
- ``B1`` and ``W8``, the controls (``--no-controls``: none): B's pools with A's one writer (the
  pool count alone), and as many pools as B has writers, each written (the writers alone);
- ``C``: ``--idle-pools`` pools (0: none): start-up and idle CPU only, if the time budget
  (``--budget-s``) still allows it;
- ``F1`` and ``F8``, the floor (``--no-floor``: none): no daemon, pools built by ioctl
  (bench/fill_bench.py's ManualPool), pre-sized for their writer; 1, then ``--writers``, writers
  of ``--b-mib``, and one thread per pool doing the four growth steps by ioctl (ftruncate,
  LOOP_SET_CAPACITY, TABLE_LOAD, resume) every ``--floor-every`` s while its writer runs. The
  ratio F8 / F1 is what the load alone does to a growth, with no daemon to blame
  (``--only-floor``: these phases alone).

After READY=1 every phase first waits (up to ``--settle-cap``) until the daemon has read every
kernel uevent queued on its udev monitor's netlink socket (/proc/net/netlink): start-up's loop
and dm events arrive after READY=1, and reading them is work too ("busy after READY=1").

Measured per growth, from the kernel log: the pool's "reached low water mark for data device" to
its next "growing the data device" (the pool's dm device 253:N names it there), and out-of-space
episodes ("switching pool to out-of-data-space"). From the daemon's debug log, matched to the
kernel's growths in order per pool: its steps (DECIDE_MS: from the loop's wake-up to this pool's
decision, so it holds the time spent on the pools before it in the same pass; FILE_MS, LOOP_MS,
RELOAD_MS), the wake-up after the kernel's event (daemon log times mapped onto kernel time
through clock marks written to /dev/kmsg), and which growths shared one pass. Per daemon: CPU
(utime+stime from /proc/<pid>/stat) at READY=1, over the idle window and during the writers;
VmRSS and VmHWM from /proc/<pid>/status.

Prints one JSON object and markdown tables; both also go to $THINWATCHD_VM_OUT (scale.json,
scale.md) when set, with each phase's daemon log (scale-<phase>-daemon.log). Targets (issue 9):
no out-of-space episode; event-to-grown p50 <= 1.5x and p99 <= 3x the one-pool figures of the
same run (phases A and A2 together). Percentiles are linear interpolations between the closest
ranks (a p99 of fewer than 100 growths is near the max).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.workloads import clock_mark, clock_offset

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOW_WATER = "reached low water mark for data device"
GROWING = "growing the data device"
OUT_OF_SPACE = "switching pool to out-of-data-space"
# dm-thin names the pool by its device number: "device-mapper: thin: 253:4: reached ..."
KMSG_RX = re.compile(rf"(\d+:\d+): ({LOW_WATER}|{GROWING}|{OUT_OF_SPACE})")
LOG_TIME_RX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
STEPS_RX = re.compile(r"pool (\S+): (data|metadata) growth steps \(ms\): (\{.*\})")
DONE_RX = re.compile(r"growing data of (\S+) from .*?: (.*); done in (\d+) ms")
NETLINK_KOBJECT_UEVENT = 15
SAME_PASS_MS = 3.0  # growths whose loop wake-ups are this close shared a pass (log times: 1 ms)

POOL_CONFIG: dict[str, object] = {
    "data_size": "64MiB",
    "metadata_size": "16MiB",
    "low_water_mark": 256,
    "data": {"step": "128MiB", "step_percent": "0%", "adaptive_low_water": False},
}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of xs, linear between the closest ranks; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(xs),
        "p50": pct(xs, 0.5),
        "p90": pct(xs, 0.9),
        "p99": pct(xs, 0.99),
        "max": max(xs) if xs else None,
    }


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    text = f"{x:,.{digits}f}"
    return text[1:] if text.startswith("-") and float(text.replace(",", "")) == 0 else text


# -- the daemon process and the kernel log ------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """The process's utime + stime (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is state
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (VmRSS and VmHWM are in KiB)."""
    m = re.search(rf"^{key}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def log_time(line: str) -> float | None:
    """The wall-clock time of a daemon log line (its asctime, local time), or None."""
    m = LOG_TIME_RX.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def daemon_growths(log_text: str) -> dict[str, list[dict[str, Any]]]:
    """Each pool's data growths in a daemon log, in order: the steps (ms), their total, the
    loop's wake-up (wall clock: the steps line's time less its steps) and the reason."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in log_text.splitlines():
        m = STEPS_RX.search(line)
        if m and m.group(2) == "data":
            steps: dict[str, float] = {}
            with contextlib.suppress(ValueError, SyntaxError, AttributeError):
                steps = {k: float(v) for k, v in ast.literal_eval(m.group(3)).items()}
            at = log_time(line)
            total = sum(steps.values())
            g: dict[str, Any] = {"steps": steps, "total_ms": round(total, 1)}
            if at is not None:
                g["woke_wall"] = at - total / 1000
            out.setdefault(m.group(1), []).append(g)
            continue
        m = DONE_RX.search(line)
        if m and out.get(m.group(1)):
            out[m.group(1)][-1].setdefault("reason", m.group(2))
    return out


class Fleet:
    """One real daemon (debug log) with n pools of POOL_CONFIG on the scratch disk."""

    def __init__(self, dm: Any, directory: Path, label: str, n: int) -> None:
        from testbed.harness import SpawnedDaemon, write_config

        self.dm = dm
        self.label = label
        token = uuid.uuid4().hex[:4]
        self.names = [f"sc{token}-{label}-{i:03d}" for i in range(n)]
        self.files = {
            name: (directory / f"{name}.data", directory / f"{name}.meta") for name in self.names
        }
        pools = {
            name: {"data_file": str(d), "metadata_file": str(m), **POOL_CONFIG}
            for name, (d, m) in self.files.items()
        }
        cfg = write_config(directory / f"sc{token}-{label}.yaml", pools, log_level="debug")
        # SpawnedDaemon: start() as DaemonProcess, plus drain(), which reads the notify socket
        # as systemd does (unread, it fills after 10 datagrams and each STATUS= is re-sent).
        self.daemon = SpawnedDaemon(cfg, directory / f"sc{token}-{label}.log")
        self.thins: list[str] = []
        self.by_dev: dict[str, str] = {}  # "253:N" -> pool name
        self.pid = 0

    def start(self, timeout: float) -> dict[str, Any]:
        t0 = time.monotonic()
        self.daemon.start(timeout)
        startup = time.monotonic() - t0
        assert self.daemon.proc is not None
        self.pid = self.daemon.proc.pid
        out = {
            "pools": len(self.names),
            "startup_s": round(startup, 2),
            "startup_cpu_s": round(self.cpu_s(), 2),
            "rss_kib_ready": proc_status(self.pid, "VmRSS"),
        }
        for name in self.names:
            info = self.dm.info(name)
            assert info is not None, f"pool {name} missing after READY=1"
            self.by_dev[f"{os.major(info.dev)}:{os.minor(info.dev)}"] = name
        return out

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def memory(self) -> dict[str, int]:
        return {
            "rss_kib": proc_status(self.pid, "VmRSS"),
            "hwm_kib": proc_status(self.pid, "VmHWM"),
            "threads": proc_status(self.pid, "Threads"),
            "fds": len(os.listdir(f"/proc/{self.pid}/fd")),
        }

    def uevent_queue(self) -> tuple[int, int] | None:
        """The daemon's kernel-uevent netlink socket (its udev monitor): bytes queued unread
        and events dropped, from /proc/net/netlink; None if it has none."""
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
        for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
            f = line.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            if len(f) >= 10 and f[1] == str(NETLINK_KOBJECT_UEVENT) and f[9] in inodes:
                return int(f[4]), int(f[8])
        return None

    def settle(self, cap: float) -> dict[str, Any]:
        """Wait until the daemon has read every uevent queued for it (2 s with an empty
        queue; at most cap seconds): start-up's loop and dm events arrive after READY=1."""
        c0, t0 = self.cpu_s(), time.monotonic()
        peak, empty_since, drops = 0, None, None
        while time.monotonic() - t0 < cap:
            q = self.uevent_queue()
            if q is None:
                break
            peak, drops = max(peak, q[0]), q[1]
            now = time.monotonic()
            if q[0] > 0:
                empty_since = None
            elif empty_since is None:
                empty_since = now
            elif now - empty_since >= 2:
                break
            self.wait(0.5)
        end = empty_since if empty_since is not None else time.monotonic()
        return {
            "settle_s": round(end - t0, 1),
            "settle_cpu_s": round(self.cpu_s() - c0, 2),
            "settle_capped": time.monotonic() - t0 >= cap,
            "uevent_queue_peak_bytes": peak,
            "uevent_drops": drops,
        }

    def wait(self, seconds: float) -> None:
        """Sleep, reading the daemon's notifications every second."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            self.daemon.drain()

    def idle(self, seconds: float) -> dict[str, Any]:
        """The daemon's CPU over seconds with nothing to do (after settle())."""
        c0, t0 = self.cpu_s(), time.monotonic()
        self.wait(seconds)
        cpu, wall = self.cpu_s() - c0, time.monotonic() - t0
        pct_core = 100 * cpu / wall
        return {
            "idle_s": round(wall, 1),
            "idle_cpu_s": round(cpu, 3),
            "idle_cpu_pct": round(pct_core, 3),
            "idle_cpu_pct_per_pool": round(pct_core / len(self.names), 5),
            **self.memory(),
        }

    def thin(self, pool: str, size: int) -> str:
        from testbed.harness import create_thin

        name = f"{pool}-thin"
        self.thins.append(name)
        return create_thin(self.dm, pool, name, 0, size)

    def close(self) -> list[str]:
        """Stop the daemon, resume anything left suspended, remove every device and file."""
        from testbed.harness import rescue_pool, teardown
        from thinwatchd.kernel.loop import LoopControl

        notes: list[str] = []
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            try:
                self.daemon.stop()
            except Exception as exc:  # killed after the stop's timeout
                notes.append(f"daemon stop: {exc!r}")
        self.daemon.close()
        for name in self.names:
            for note in rescue_pool(self.dm, name, self.files[name][0]):
                notes.append(f"{name}: {note}")
        teardown(self.dm, [*self.thins, *self.names], [])  # thin volumes first
        # One scan of the loops for all files (teardown's find scans them all per file).
        by_file = {}
        with contextlib.suppress(Exception):
            by_file = {(lp.backing_dev, lp.backing_inode): lp for lp in LoopControl().list_loops()}
        left: list[Path] = []
        for path in (p for pair in self.files.values() for p in pair):
            try:
                st = path.stat()
            except OSError:
                continue
            loop = by_file.get((st.st_dev, st.st_ino))
            if loop is not None:
                try:
                    LoopControl().detach(loop)
                except Exception:
                    left.append(path)
        teardown(self.dm, [], left)
        for path in (p for pair in self.files.values() for p in pair):
            path.unlink(missing_ok=True)
        self.daemon.config.unlink(missing_ok=True)
        return notes


# -- writers ------------------------------------------------------------------------------------


def write_phase(fleet: Fleet, pools: list[str], mib: int, deadline: float) -> dict[str, Any]:
    """dd oflag=direct of mib into a thin of each pool, all started together; then each
    growth from the kernel log, matched with the daemon's steps."""
    from testbed.harness import KernelLog

    thins = [fleet.thin(pool, (mib + 1024) * MiB) for pool in pools]
    log_from = len(fleet.daemon.log())
    klog = KernelLog()
    try:
        clock_mark()
        cpu0, t0 = fleet.cpu_s(), time.monotonic()
        procs = [
            subprocess.Popen(
                ["dd", "if=/dev/zero", f"of={thin}", "bs=1M", f"count={mib}", "oflag=direct"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for thin in thins
        ]
        walls: list[float | None] = [None] * len(procs)
        error = None
        while any(w is None for w in walls):
            for i, p in enumerate(procs):
                if walls[i] is None and p.poll() is not None:
                    walls[i] = round(time.monotonic() - t0, 2)
            klog.read()  # keep up with the ring buffer
            fleet.daemon.drain()
            if time.monotonic() - t0 > deadline:
                error = f"writers not done after {deadline:.0f} s"
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.25)
        wall = time.monotonic() - t0
        fleet.wait(1.5)  # a growth that began at the end is logged by now
        cpu = fleet.cpu_s() - cpu0
        clock_mark()
        failed = []
        for thin, p in zip(thins, procs, strict=True):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.returncode != 0:
                err = p.stderr.read() if p.stderr else ""
                failed.append(f"{thin}: exit {p.returncode}: {err.strip()[-300:]}")
        records = klog.read()
        growths, per_pool = match_growths(fleet, records, fleet.daemon.log()[log_from:])
        out: dict[str, Any] = {
            "writers": len(pools),
            "mib_each": mib,
            "wall_s": round(wall, 2),
            "writer_s": walls,
            "mib_per_s": round(len(pools) * mib / wall, 1),
            "daemon_cpu_s": round(cpu, 3),
            "growths": growths,
            "per_pool": per_pool,
            **fleet.memory(),
        }
        if error or failed:
            out["error"] = "; ".join([*([error] if error else []), *failed])
        return out
    finally:
        klog.close()


def match_growths(
    fleet: Fleet, records: list[tuple[float, str]], log_text: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Pair each pool's kernel growths with the low-water event before them (the first since
    its previous growth) and, in order, with the daemon's growths of that pool."""
    offset = clock_offset(records)
    kernel: dict[str, list[tuple[float, str]]] = {}
    for ts, message in records:
        m = KMSG_RX.search(message)
        if m and m.group(1) in fleet.by_dev:
            kernel.setdefault(fleet.by_dev[m.group(1)], []).append((ts, m.group(2)))
    daemon = daemon_growths(log_text)
    growths: list[dict[str, Any]] = []
    per_pool: dict[str, dict[str, int]] = {}
    for pool in sorted(set(kernel) | set(daemon)):
        events = kernel.get(pool, [])
        ours = daemon.get(pool, [])
        pending: float | None = None
        count = {"events": 0, "growths": 0, "out_of_space": 0, "daemon_growths": len(ours)}
        n = 0
        for ts, kind in events:
            if kind == LOW_WATER:
                count["events"] += 1
                if pending is None:
                    pending = ts
            elif kind == OUT_OF_SPACE:
                count["out_of_space"] += 1
            else:
                count["growths"] += 1
                g: dict[str, Any] = {"pool": pool, "grown_k": ts, "event_k": pending}
                if pending is not None:
                    g["event_to_grown_ms"] = round((ts - pending) * 1000, 1)
                if n < len(ours):
                    d = ours[n]
                    g.update({k: v for k, v in d.items() if k != "woke_wall"})
                    woke = d.get("woke_wall")
                    if woke is not None and offset is not None:
                        g["woke_k"] = woke - offset
                        if pending is not None:
                            g["woke_after_event_ms"] = round((woke - offset - pending) * 1000, 1)
                        g["grown_after_woke_ms"] = round((ts - (woke - offset)) * 1000, 1)
                n += 1
                growths.append(g)
                pending = None
        count["unserved_events"] = int(pending is not None)
        per_pool[pool] = count
    # Growths whose loop wake-ups coincide were decided in one pass, one after the other.
    woke = sorted((g["woke_k"], i) for i, g in enumerate(growths) if "woke_k" in g)
    group, last = 0, None
    sizes: dict[int, int] = {}
    for t, i in woke:
        if last is None or (t - last) * 1000 > SAME_PASS_MS:
            group += 1
        last = t
        growths[i]["pass"] = group
        sizes[group] = sizes.get(group, 0) + 1
    for g in growths:
        if "pass" in g:
            g["pass_size"] = sizes[g["pass"]]
    growths.sort(key=lambda g: g["grown_k"])
    return growths, per_pool


# -- phases -------------------------------------------------------------------------------------


def phase(
    dm: Any,
    directory: Path,
    label: str,
    pools: int,
    writers: int,
    mib: int,
    args: argparse.Namespace,
    idle: bool,
) -> dict[str, Any]:
    started = time.monotonic()
    fleet = Fleet(dm, directory, label, pools)
    out: dict[str, Any] = {"phase": label, "pools": pools}
    try:
        say(f"{label}: starting a daemon with {pools} pool(s)")
        out.update(fleet.start(args.start_timeout))
        say(
            f"{label}: READY=1 after {out['startup_s']} s (CPU {out['startup_cpu_s']} s, RSS "
            f"{out['rss_kib_ready'] // 1024} MiB)"
        )
        out["settle"] = fleet.settle(args.settle_cap)
        say(f"{label}: settled {out['settle']}")
        if idle:
            out["idle"] = fleet.idle(args.idle_s)
            say(f"{label}: idle {out['idle']}")
        if writers:
            chosen = [fleet.names[i * pools // writers] for i in range(writers)]
            say(f"{label}: {writers} writer(s) of {mib} MiB")
            w = write_phase(fleet, chosen, mib, args.writer_deadline)
            out["write"] = w
            e2g = [g["event_to_grown_ms"] for g in w["growths"] if "event_to_grown_ms" in g]
            d = dist(e2g)
            say(
                f"{label}: {len(w['growths'])} growths in {w['wall_s']} s, event-to-grown p50 "
                f"{fmt(d['p50'])} p99 {fmt(d['p99'])} max {fmt(d['max'])} ms, OODS "
                f"{sum(c['out_of_space'] for c in w['per_pool'].values())}"
                f"{', ERROR ' + w['error'] if 'error' in w else ''}"
            )
    except Exception as exc:
        out["error"] = repr(exc)
        say(f"{label}: error {exc!r}\n{fleet.daemon.log()[-3000:]}")
    finally:
        out_dir = os.environ.get("THINWATCHD_VM_OUT")
        if out_dir:
            with contextlib.suppress(OSError):
                Path(out_dir, f"scale-{label}-daemon.log").write_text(fleet.daemon.log())
        t0 = time.monotonic()
        notes = fleet.close()
        out["teardown_s"] = round(time.monotonic() - t0, 1)
        if notes:
            out["teardown_notes"] = notes
            say(f"{label}: teardown: {notes}")
    out["phase_s"] = round(time.monotonic() - started, 1)
    say(f"{label}: done in {out['phase_s']} s (teardown {out['teardown_s']} s)")
    return out


def floor_phase(
    dm: Any, directory: Path, label: str, writers: int, mib: int, every: float
) -> dict[str, Any]:
    """Growth-step times by ioctl (no daemon) while writers fill their pools, each pool grown
    every `every` seconds (the daemon's B grows each of its 8 written pools every 5-6 s)."""
    import threading

    from bench.fill_bench import ManualPool, dd

    say(f"{label}: {writers} pool(s) by ioctl, {writers} writer(s) of {mib} MiB")
    pools = [ManualPool(dm, directory, (mib + 256) * MiB, 32768, True) for _ in range(writers)]
    times: list[float] = []
    try:
        running = [threading.Thread(target=dd, args=(p.thin, mib)) for p in pools]

        def grow(pool: Any, writer: threading.Thread) -> None:
            time.sleep(0.2)
            while writer.is_alive():
                times.append(pool.grow(64 * MiB) * 1000)
                time.sleep(every)

        growers = [
            threading.Thread(target=grow, args=pair) for pair in zip(pools, running, strict=True)
        ]
        started = time.monotonic()
        for t in running + growers:
            t.start()
        for t in running + growers:
            t.join()
        wall = time.monotonic() - started
    finally:
        for pool in pools:
            pool.close()
    out = {"phase": label, "pools": writers, "floor_ms": dist(times), "wall_s": round(wall, 1)}
    say(f"{label}: {len(times)} growths by ioctl, ms {out['floor_ms']}")
    return out


# -- summary ------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def e2g_of(phases: list[dict[str, Any]]) -> list[float]:
    return [
        g["event_to_grown_ms"]
        for p in phases
        for g in p.get("write", {}).get("growths", [])
        if "event_to_grown_ms" in g
    ]


def summarize(result: dict[str, Any]) -> str:
    phases: list[dict[str, Any]] = result["phases"]
    by = {p["phase"]: p for p in phases}
    one = by.get("A")
    ones = [p for p in phases if p["phase"] in ("A", "A2")]
    base_start = one["startup_s"] if one and "startup_s" in one else None
    base_cpu = one["idle"]["idle_cpu_pct"] if one and "idle" in one else None
    base_rss = one["idle"]["rss_kib"] if one and "idle" in one else None
    lines = [
        "| phase | pools / writers | growths (no event) | event to grown p50 / p90 / p99 / max ms "
        "| OODS | start-up s (per pool ms: mean / added) | busy after READY=1 s (CPU s) "
        "| idle CPU % of a core (per pool: mean / added) | RSS MiB (added KiB per pool) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        n = p["pools"]
        w = p.get("write", {})
        gs = w.get("growths", [])
        e2g = [g["event_to_grown_ms"] for g in gs if "event_to_grown_ms" in g]
        d = dist(e2g)
        oods = sum(c["out_of_space"] for c in w.get("per_pool", {}).values())
        s = p.get("startup_s")
        added = (s - base_start) / (n - 1) * 1000 if s and base_start and n > 1 else None
        start = f"{fmt(s, 1)} ({fmt(s / n * 1000 if s else None)} / {fmt(added)})"
        idle = p.get("idle")
        if idle:
            c = idle["idle_cpu_pct"]
            c_add = (c - base_cpu) / (n - 1) if base_cpu is not None and n > 1 else None
            cpu = f"{c:.2f} ({c / n:.4f} / {fmt(c_add, 4)})"
            r = idle["rss_kib"]
            r_add = (r - base_rss) / (n - 1) if base_rss is not None and n > 1 else None
            rss = f"{r / 1024:.1f} ({fmt(r_add)})"
        else:
            cpu = rss = "-"
        st = p.get("settle")
        busy = f"{st['settle_s']} ({st['settle_cpu_s']})" if st else "-"
        writers = w.get("writers", 0)
        growths = f"{len(gs)} ({len(gs) - len(e2g)})" if w else "-"
        lat = f"{fmt(d['p50'])} / {fmt(d['p90'])} / {fmt(d['p99'])} / {fmt(d['max'])}" if w else "-"
        err = " (error)" if "error" in p or "error" in w else ""
        lines.append(
            f"| {p['phase']}{err} | {n} / {writers} | {growths} | {lat} | "
            f"{oods if w else '-'} | {start} | {busy} | {cpu} | {rss} |"
        )
    a = e2g_of(ones)
    ratios: dict[str, dict[str, float]] = {}
    for label in ("B", "B1", "W8"):
        x = e2g_of([by[label]]) if label in by else []
        if a and x:
            ratios[label] = {
                "p50": round(pct(x, 0.5) / pct(a, 0.5), 3),  # type: ignore[operator]
                "p99": round(pct(x, 0.99) / pct(a, 0.99), 3),  # type: ignore[operator]
            }
    if "B" in ratios:
        r = ratios["B"]
        lines += [
            "",
            f"Ratios to the one-pool growths (A and A2 together, {len(a)}): B p50 {r['p50']:.2f}x "
            f"(target <= 1.5x), p99 {r['p99']:.2f}x (target <= 3x)"
            + "".join(
                f"; {k} ({by[k]['pools']} / {by[k].get('write', {}).get('writers')}) "
                f"p50 {v['p50']:.2f}x, p99 {v['p99']:.2f}x"
                for k, v in ratios.items()
                if k != "B"
            )
            + ".",
        ]
    result["ratios"] = ratios
    # Where the time goes: the daemon's side of each growth.
    lines += [
        "",
        "| phase | growths | woke after event p50 / max ms | DECIDE (wake to this pool) p50 / "
        "max | FILE p50 | LOOP p50 | RELOAD p50 / max | grown (kernel) after wake p50 / max "
        "| growths per pass: max (passes with >1) | daemon CPU per growth ms | MiB/s all writers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in phases:
        w = p.get("write")
        if not w:
            continue
        gs = w["growths"]

        def col(key: str, gs: list[dict[str, Any]] = gs) -> list[float]:
            return [g[key] for g in gs if key in g]

        def step(key: str, gs: list[dict[str, Any]] = gs) -> list[float]:
            return [g["steps"][key] for g in gs if key in g.get("steps", {})]

        passes: dict[int, int] = {}
        for g in gs:
            if "pass" in g:
                passes[g["pass"]] = g["pass_size"]
        shared = sum(1 for v in passes.values() if v > 1)
        per = w["daemon_cpu_s"] * 1000 / len(gs) if gs else None
        woke, dec, rel, aft = (
            col("woke_after_event_ms"),
            step("DECIDE_MS"),
            step("RELOAD_MS"),
            col("grown_after_woke_ms"),
        )
        lines.append(
            f"| {p['phase']} | {len(gs)} | {fmt(pct(woke, 0.5))} / {fmt(max(woke, default=None))} "
            f"| {fmt(pct(dec, 0.5))} / {fmt(max(dec, default=None))} "
            f"| {fmt(pct(step('FILE_MS'), 0.5), 1)} | {fmt(pct(step('LOOP_MS'), 0.5), 1)} "
            f"| {fmt(pct(rel, 0.5))} / {fmt(max(rel, default=None))} "
            f"| {fmt(pct(aft, 0.5))} / {fmt(max(aft, default=None))} "
            f"| {max(passes.values(), default=0)} ({shared}) | {fmt(per, 1)} "
            f"| {w['mib_per_s']} |"
        )
    floors = result.get("floor") or []
    if len(floors) == 2:
        f1, fn = (f["floor_ms"] for f in floors)
        every = result["args"].get("floor_every", 0.25)
        lines += [
            "",
            f"Floor, no daemon (four growth steps by ioctl, every {every:g} s per "
            "pool, while the writers run): "
            + "; ".join(
                f"{f['phase']} p50 / p90 / p99 / max {fmt(f['floor_ms']['p50'])} / "
                f"{fmt(f['floor_ms']['p90'])} / {fmt(f['floor_ms']['p99'])} / "
                f"{fmt(f['floor_ms']['max'])} ms ({f['floor_ms']['n']} growths)"
                for f in floors
            )
            + f"; {floors[1]['phase']} / F1: p50 {ratio(fn['p50'], f1['p50'])}, p99 "
            f"{ratio(fn['p99'], f1['p99'])}.",
        ]
    env = result.get("env", {})
    lines += [
        "",
        f"Guest: {env.get('mem_total_mib')} MiB, {env.get('cpus')} CPUs, kernel "
        f"{env.get('kernel')}; guest time {result.get('guest_s')} s. Per pool: mean = total / "
        "pools; added = (this phase - phase A) / (pools - 1). 'no event': growths with no "
        "low-water event since the pool's previous growth (the safety check's).",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pools", type=int, default=64)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--a-mib", type=int, default=2048, help="the one-pool writer")
    parser.add_argument("--b-mib", type=int, default=1024, help="each of the many-pool writers")
    parser.add_argument("--idle-pools", type=int, default=200, help="phase C (0: none)")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--no-a2", action="store_true", help="skip the one-pool rerun after B")
    parser.add_argument(
        "--no-controls", action="store_true", help="skip B1 (pools alone) and W8 (writers alone)"
    )
    parser.add_argument(
        "--settle-cap", type=float, default=180.0, help="longest wait for the uevent backlog"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=780.0,
        help="skip phase C if it would end the run later than this",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip F1 and F8 (no daemon)")
    parser.add_argument(
        "--floor-every", type=float, default=2.0, help="seconds between a floor pool's growths"
    )
    parser.add_argument("--only-floor", action="store_true", help="no daemon phases")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--writer-deadline", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.writers > args.pools:
        raise SystemExit("--writers cannot exceed --pools")
    return args


def guest_env() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text()
    m = re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M)
    return {
        "mem_total_mib": int(m.group(1)) // 1024 if m else None,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "clk_tck": CLK_TCK,
    }


def main() -> None:
    args = parse_args()
    from testbed.harness import scratch_dir
    from thinwatchd.kernel.dm import DeviceMapper

    started = time.monotonic()
    directory = scratch_dir() / "scale"
    directory.mkdir(exist_ok=True)
    out_dir = os.environ.get("THINWATCHD_VM_OUT")
    result: dict[str, Any] = {
        "args": vars(args),
        "config": POOL_CONFIG,
        "env": guest_env(),
        "phases": [],
    }
    say(f"guest: {result['env']}")

    def save() -> None:
        result["guest_s"] = round(time.monotonic() - started, 1)
        if out_dir:
            Path(out_dir, "scale.json").write_text(json.dumps(result, indent=1))

    with DeviceMapper() as dm:
        phases: list[dict[str, Any]] = result["phases"]

        def run(label: str, pools: int, writers: int, mib: int, idle: bool) -> dict[str, Any]:
            phases.append(phase(dm, directory, label, pools, writers, mib, args, idle))
            save()
            return phases[-1]

        b: dict[str, Any] = {}
        if not args.only_floor:
            run("A", 1, 1, args.a_mib, True)
            b = run("B", args.pools, args.writers, args.b_mib, True)
        if not args.no_a2 and not args.only_floor:
            run("A2", 1, 1, args.a_mib, False)
        if not args.no_controls and not args.only_floor:
            run("B1", args.pools, 1, args.a_mib, False)  # the pool count alone
            run("W8", args.writers, args.writers, args.b_mib, False)  # the writers alone
        if args.idle_pools and not args.only_floor:
            # start-up and teardown linear in the pools, the settle (the uevent backlog read
            # after READY=1) quadratic, with a margin
            n = args.idle_pools / args.pools
            start = b.get("startup_s", 60.0) + b.get("teardown_s", 30.0)
            backlog = b.get("settle", {}).get("settle_s", 30.0)
            need = 1.5 * (start * n + min(args.settle_cap, backlog * n * n)) + args.idle_s
            elapsed = time.monotonic() - started
            if elapsed + need <= args.budget_s:
                run("C", args.idle_pools, 0, 0, True)
            else:
                result["skipped_c"] = f"{elapsed:.0f} s gone, C needs ~{need:.0f} s"
                say(f"phase C skipped: {result['skipped_c']}")
        if not args.no_floor:
            result["floor"] = [
                floor_phase(dm, directory, "F1", 1, args.b_mib, args.floor_every),
                floor_phase(
                    dm, directory, f"F{args.writers}", args.writers, args.b_mib, args.floor_every
                ),
            ]
        save()
    with contextlib.suppress(OSError):
        directory.rmdir()
    table = summarize(result)
    save()
    print(json.dumps(result, indent=1))
    print()
    print(table)
    if out_dir:
        Path(out_dir, "scale.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
