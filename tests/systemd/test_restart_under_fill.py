"""Issue 19, item 10, against the real kernel under systemd: upgrades under load.

Four `systemctl restart thinwatchd` (the issue tried six; every kind is here, CI's time is
not spent twice on the timed one) during a fast O_DIRECT fill (1 MiB writes at 32 MiB/s) of
a small pool (64 MiB, a 16 MiB mark, 128 MiB steps, a 16 MiB dirty limit) must cost no
out-of-space episode (the kernel's "switching pool to out-of-data-space"): a stopping daemon
grows each filling pool to hold what it fills at the last minute's steepest rate for twice its
own start-up, at least 10 s (its parting pass, commit 0cb024d).

The restarts come in three kinds: two with an event pending, one after low water, one timed:
- timed: a second after the previous one's READY=1;
- event pending: the daemon is frozen (SIGSTOP) a second of fill before the pool reaches the
  kernel's low-water mark, the kernel's event comes, then `systemctl restart` (systemd sends
  SIGTERM, then SIGCONT): a restart between a low-water event and its growth. The daemon wakes
  to both; if its loop serves the event first, the stop lands mid-growth; if the SIGTERM, its
  parting pass finds the event unanswered;
- after low water: `systemctl restart` as soon as the kernel logs "reached low water mark".

The same fill with `systemctl kill -s KILL` (the unit restarts the daemon: Restart=on-failure),
three kills, one of each kind, must cost no episode either while the next daemon comes within
the room the killed one kept. A killed daemon leaves no parting room: the adaptive mark holds
the fill rate for as long as a killed daemon's pools go unwatched (systemd's gap and twice its
own start-up, Daemon.crash_absence_seconds; commit 30059dc), and a filling pool is checked a
second after each growth so the mark follows a fill that has just begun (0082e39). Before them,
each of 3 kills cost an episode of 3.8-8.7 s. A next start-up the host slows past that (two
emulated guests side by side on two CPUs: 5 s, then 15-20 s, in one run on 4bbd60b) is beyond
what the daemon can know; such a kill is said, not failed, and at least one kill must come
within its kept room, or the test proved nothing.

Each variant writes its figures (per restart: SIGTERM to READY=1 and where the time went, the
parting growth, the growths in flight, the room left against what the writer wrote while no
daemon watched, episodes; the writer's longest stall) to the test's output and to
$THINWATCHD_VM_OUT/restart-under-fill-<variant>.txt, which comes back to the host.

The restarts take 6-33 s each in the guest under TCG (the daemon's interpreter start and imports
alone 4-24 s), against the issue's 5.7-9.2 s. At dd's full speed, 30-87 MiB/s here, six of them
took a fill of 6-8 GiB, all of it written to the guest's scratch disk, a sparse image on the
host; so the writer is paced at RATE_MIB, dd's speed here when the host is loaded, and the fill
runs past the issue's 3 GiB only until the restarts are done (up to MAX_FILL_MIB). What a
restart risks scales with the rate on both sides (the parting room is rate x absence estimate,
the need rate x real absence), so the pace does not hide an episode. The scratch disk is
trimmed after each variant.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.harness import (
    KernelLog,
    MiB,
    create_thin,
    installed_unit,
    kmsg_mark,
    pool_config,
    scratch_dir,
    teardown,
)
from tests.kernel.harness import dirty_bytes
from thinwatchd.base.logs import MessageId
from thinwatchd.daemon.daemon import RESTART_GAP_SECONDS, crash_absence, stop_absence
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
#: The fill: at least FILL_MIB (the issue's 3 GiB), on until the restarts are done.
FILL_MIB = 3072
MAX_FILL_MIB = 6144
#: The writer's pace: dd's own full speed in this guest when the host is loaded (30-33 MiB/s
#: measured; 48-87 MiB/s when it is not). Unpaced (0), the six restarts took 6-8 GiB here.
RATE_MIB = 32
#: 1 MiB O_DIRECT writes of zeros, as `dd oflag=direct bs=1M`, at most RATE_MIB a second (0:
#: as fast as it goes); no catching up after a stall (the next write is due a pace after the
#: last one, or now).
WRITER = r"""
import mmap, os, sys, time
device, count, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
buf = mmap.mmap(-1, 1 << 20)
fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
due = time.monotonic()
for n in range(count):
    if rate > 0:
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        due = max(due, time.monotonic() - 1 / rate) + 1 / rate
    os.pwrite(fd, buf, n << 20)
os.close(fd)
"""
BLOCK = 64 * 1024  # the pool's data block
TIMED, PENDING, AFTER = "timed", "event pending", "after low water"
#: The actions in order: those that wait for the pool to near its mark first, while it is small
#: and its marks come often (each restart's first check grows it by hundreds of MiB).
#: Each kind twice but the timed one (the issue's six restarts cost CI 3 min of guest time).
RESTARTS = (PENDING, AFTER, PENDING, TIMED)
KILLS = (PENDING, AFTER, TIMED)
EVENT_WAIT = 30.0  # seconds an action waits for its moment before it is taken anyway
#: ... for an event pending: a restart's first check leaves room for twice its absence (tens of
#: seconds of fill in the guest), so the pool nears its mark that much later.
PENDING_WAIT = 75.0
PENDING_CAME = "then the kernel's event came"
GAP = 1.0  # seconds from one action's READY=1 to the next
FREEZE_AHEAD = 1.0  # seconds of fill before the mark at which the daemon is frozen
DIRTY_BYTES = 16 * MiB
OUT_OF_SPACE = "switching pool to out-of-data-space"
BACK_TO_WRITE = "switching pool to write mode"
LOW_WATER = "reached low water mark"
PARTING = "to last until the next daemon"
GROWING = re.compile(r"growing the data device from \d+ to (\d+) blocks")
FREEZE_MAX = 48 * MiB  # ...and at most this far above it
QUIET = 1.5  # seconds since the pool's last resize before it is frozen (no growth in flight)


def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=timeout)


def main_pid() -> int:
    return int(run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip() or 0)


def active_pid() -> int:
    """The main pid once the unit is active (READY=1 came: Type=notify), else 0."""
    out = run("systemctl", "show", "-p", "ActiveState", "-p", "MainPID", UNIT).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return int(props.get("MainPID", "0")) if props.get("ActiveState") == "active" else 0


def process_started(pid: int) -> float | None:
    """The process's start, in CLOCK_MONOTONIC seconds (boot time: no suspend in the guest)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


class Progress:
    """Samples a writer's /proc/<pid>/io wchar every 50 ms (bytes written, O_DIRECT too)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/io").read_text()
            except OSError:
                return
            found = re.search(r"^wchar: (\d+)$", text, re.MULTILINE)
            if found:
                self.samples.append((time.monotonic(), int(found[1])))
            self._stop.wait(0.05)

    def written(self, at: float | None = None) -> int:
        """Bytes written by now, or by monotonic time at."""
        if at is None:
            return self.samples[-1][1] if self.samples else 0
        before = [w for t, w in self.samples if t <= at]
        return before[-1] if before else 0

    def rate(self, over: float = 2.0) -> float:
        """Bytes per second over the last `over` seconds."""
        if len(self.samples) < 2:
            return 0.0
        t1, w1 = self.samples[-1]
        t0, w0 = next(((t, w) for t, w in self.samples if t >= t1 - over), self.samples[0])
        return (w1 - w0) / (t1 - t0) if t1 > t0 else 0.0

    def stalls(self, longer_than: float) -> list[tuple[float, float]]:
        """(start, seconds) of each time the writer wrote nothing for longer than longer_than."""
        out, since = [], None
        samples = [(t, w) for t, w in self.samples if w > 0]  # (from its first write on)
        for (t0, w0), (t1, w1) in itertools.pairwise(samples):
            if w1 == w0 and since is None:
                since = t0
            elif w1 != w0 and since is not None:
                if t1 - since > longer_than:
                    out.append((since, t1 - since))
                since = None
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class StartWatch:
    """Finds the next daemon's process (not `old`) and when it first holds /dev/mapper/control
    open: the interpreter has started, thinwatchd is imported, its config read."""

    def __init__(self, old: int) -> None:
        self.old = old
        self.pid = 0
        self.control: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.control is None:
            if not self.pid:
                self.pid = self._find()
            elif self._holds_control():
                self.control = time.monotonic()
            self._stop.wait(0.2)

    def _find(self) -> int:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) <= self.old:  # (pids grow: no wrap here)
                continue
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if any(a.endswith(b"thinwatchd") for a in argv) and b"run" in argv:
                    return int(entry)
        return 0

    def _holds_control(self) -> bool:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{self.pid}/fd/{fd}") == "/dev/mapper/control":
                        return True
        return False

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join(5)
        return self.control


@dataclass
class Action:
    index: int
    kind: str  # TIMED, PENDING or AFTER
    at: float  # monotonic: just before `systemctl restart` / `systemctl kill`
    old_pid: int = 0
    done: float = 0.0  # active again (READY=1), as the test saw it
    new_pid: int = 0
    forked: float | None = None  # the new daemon's exec (its /proc start time)
    control: float | None = None  # the new daemon opened /dev/mapper/control
    written_mib: int = 0
    note: str = ""


@dataclass
class Fill:
    pool: str
    directory: Path
    dm: DeviceMapper
    since: str
    klog: KernelLog
    first_pid: int = 0  # the daemon the fixture started
    first_control: float | None = None  # when it opened /dev/mapper/control
    first_forked: float | None = None  # its exec (its /proc start time)
    actions: list[Action] = field(default_factory=list)
    kmsg_offset: float | None = None

    def dev(self) -> str:
        info = self.dm.info(self.pool)
        assert info is not None
        return f"{os.major(info.dev)}:{os.minor(info.dev)}"

    def room(self) -> tuple[int, int]:
        """(free blocks, the live table's low-water mark in blocks)."""
        status = parse_pool_status(self.dm.status(self.pool, noflush=True)[0].params)
        assert isinstance(status, ThinPoolWorkingStatus), status
        (table,) = self.dm.table(self.pool)
        return int(status.data_free), int(table.params.split()[3])

    def kmsg_now(self) -> float:
        """The kernel log's clock now: CLOCK_MONOTONIC plus an offset measured once (a mark
        written and read back)."""
        if self.kmsg_offset is None:
            at = kmsg_mark("clock")
            (t,) = [t for t, m in self.klog.read() if m == "thinwatchd-test: clock"][-1:]
            self.kmsg_offset = t - at
        return time.monotonic() + self.kmsg_offset

    def low_water_events(self, dev: str) -> int:
        return sum(1 for _, m in self.klog.read() if LOW_WATER in m and dev in m)


@pytest.fixture
def fill() -> Iterator[Fill]:
    """The shipped unit on one small pool with a 64 MiB data file; a 16 MiB dirty limit."""
    pool = f"twrst-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    config = pool_config(
        pool,
        directory,
        data_size="64MiB",
        metadata_size="16MiB",
        low_water_mark=256,  # 16 MiB
        reserve="256MiB",
        data={"step": "128MiB", "step_percent": "0%"},
    )
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    dm = DeviceMapper()
    klog = KernelLog()
    try:
        with dirty_bytes(DIRTY_BYTES), installed_unit(directory, config):
            try:
                watch = StartWatch(0)
                done = run("systemctl", "start", UNIT, check=False)
                assert done.returncode == 0, done.stderr
                pid = main_pid()
                control = watch.stop() if watch.pid == pid else None
                yield Fill(pool, directory, dm, since, klog, pid, control, process_started(pid))
            finally:
                pid = main_pid()
                if pid:  # never left frozen
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGCONT)
                run("systemctl", "stop", UNIT, check=False)
                teardown(dm, [f"{pool}-thin", pool], [directory / "data", directory / "metadata"])
    finally:
        klog.close()
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)
        # Give the scratch disk's blocks back to the host's image (the fill wrote GiBs).
        run("fstrim", str(scratch_dir()), check=False)


def wait_until(cond: Callable[[], bool], timeout: float, writing: Callable[[], bool]) -> bool:
    """Poll cond every 20 ms while the writer writes; False on timeout or the writer's end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and writing():
        if cond():
            return True
        time.sleep(0.02)
    return False


def act(fill: Fill, action: Action, kill: bool, watch: StartWatch) -> None:
    """Restart (or SIGKILL) the daemon; return once the next one is active (READY=1)."""
    if kill:
        run("systemctl", "kill", "-s", "KILL", UNIT)
        deadline = time.monotonic() + 180
        while (pid := active_pid()) in (0, action.old_pid):
            assert time.monotonic() < deadline, "the unit did not come back after SIGKILL"
            time.sleep(0.1)
        action.new_pid = pid
    else:
        done = run("systemctl", "restart", UNIT, check=False, timeout=180)
        assert done.returncode == 0, done.stderr
        action.new_pid = main_pid()
    action.done = time.monotonic()
    action.forked = process_started(action.new_pid)
    action.control = watch.stop() if watch.pid == action.new_pid else None


def lead_up(
    fill: Fill, kind: str, dev: str, progress: Progress, writing: Callable[[], bool]
) -> tuple[str, int]:
    """Wait for the moment of an action of this kind; return a note on how it came, and the
    pid of the daemon if it is left frozen (an event pending) for the action.

    For an event pending, the daemon is frozen when the pool is FREEZE_AHEAD seconds of fill
    above the live table's mark: the kernel's event comes while it cannot answer."""
    seen = fill.low_water_events(dev)

    def event() -> bool:
        return fill.low_water_events(dev) > seen

    if kind == AFTER:
        return ("" if wait_until(event, EVENT_WAIT, writing) else "no low-water event came"), 0
    if kind != PENDING:
        return "", 0

    def due() -> bool:
        free, mark = fill.room()
        ahead = min(FREEZE_AHEAD * max(progress.rate(), MiB), FREEZE_MAX) / BLOCK
        return mark < free <= mark + ahead and quiet()

    def quiet() -> bool:  # the last resize long enough ago: the daemon is not mid-growth
        resized = [t for t, m in fill.klog.read() if dev in m and GROWING.search(m)]
        return not resized or fill.kmsg_now() - resized[-1] >= QUIET

    if not wait_until(due, PENDING_WAIT, writing):
        return "the pool did not near its mark in time: not frozen", 0
    info = fill.dm.info(fill.pool)
    if info is None or info.suspended:
        return "the pool was suspended (a growth): not frozen", 0
    frozen = main_pid()
    os.kill(frozen, signal.SIGSTOP)
    free, mark = fill.room()
    seen = fill.low_water_events(dev)  # only one that comes while it is frozen counts
    how = f"frozen {(free - mark) * BLOCK // MiB} MiB above the mark"
    if wait_until(event, 5, writing):  # a second of fill away
        return f"{how}, {PENDING_CAME}", frozen
    return f"{how}, but no event came within 5 s", frozen


def run_fill(fill: Fill, kill: bool) -> tuple[Progress, int]:
    """Fill the pool (WRITER, at RATE_MIB) and restart (or SIGKILL) the daemon meanwhile, as
    RESTARTS (KILLS) says; return the writer's progress and its exit code."""
    thin = create_thin(fill.dm, fill.pool, f"{fill.pool}-thin", 0, MAX_FILL_MIB * MiB)
    dev = fill.dev()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, thin, str(MAX_FILL_MIB), str(RATE_MIB)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = Progress(writer.pid)

    def writing() -> bool:
        return writer.poll() is None

    wait_until(lambda: progress.written() > 0, 60, writing)
    next_at = time.monotonic() + 3.0  # the first after 3 s of fill
    frozen = 0
    try:
        for index, kind in enumerate(KILLS if kill else RESTARTS):
            while time.monotonic() < next_at and writing():
                time.sleep(0.05)
            note, frozen = lead_up(fill, kind, dev, progress, writing)
            if not writing():
                break
            old = main_pid()
            at = kmsg_mark(f"{'kill' if kill else 'restart'} {index} ({kind})")
            action = Action(index, kind, at, old, written_mib=progress.written() // MiB, note=note)
            act(fill, action, kill, StartWatch(old))
            frozen = 0
            fill.actions.append(action)
            next_at = action.done + GAP
        # A few seconds past the last action, and on to FILL_MIB for the restarts.
        settle = time.monotonic() + 5
        least = 0 if kill else FILL_MIB * MiB
        wait_until(
            lambda: progress.written() >= least and time.monotonic() >= settle,
            600,
            writing,
        )
        if writing():
            writer.terminate()
        code = writer.wait(120)
    finally:
        if frozen:
            with contextlib.suppress(OSError):
                os.kill(frozen, signal.SIGCONT)
        if writer.poll() is None:
            writer.kill()
            writer.wait(30)
        progress.stop()
    return progress, code


@dataclass(frozen=True)
class Entry:
    """One journal entry of the unit (the daemon's or systemd's own), at CLOCK_MONOTONIC."""

    t: float
    pid: int
    message: str
    fields: dict[str, str]

    @property
    def grown(self) -> bool:
        return self.fields.get("MESSAGE_ID") == MessageId.DATA_GROWN.value

    @property
    def new_size(self) -> int:
        return int(self.fields["NEW_SIZE_BYTES"])

    def begun(self) -> float:
        return self.t - float(self.fields["GROWTH_MS"]) / 1000

    def size(self) -> str:
        old = int(self.fields["OLD_SIZE_BYTES"])
        seconds = self.t - self.begun()
        return f"{old // MiB}->{self.new_size // MiB} MiB in {seconds:.2f} s"


def journal(since: str) -> list[Entry]:
    out = run(
        "journalctl", "-u", UNIT, "-o", "json", "--since", since, "--no-pager", check=False
    ).stdout
    entries = []
    for line in out.splitlines():
        if line.strip():
            e = json.loads(line)
            message = e.get("MESSAGE") if isinstance(e.get("MESSAGE"), str) else ""
            t = int(e["__MONOTONIC_TIMESTAMP"]) / 1e6
            entries.append(Entry(t, int(e.get("_PID", 0)), message, e))
    return entries


def first(entries: list[Entry], pid: int, text: str, after: float, until: float) -> float | None:
    """When the first entry of pid (1: systemd) in [after, until) containing text came."""
    found = [e.t for e in entries if e.pid == pid and text in e.message and after <= e.t < until]
    return min(found) if found else None


def since(t: float | None, t0: float | None) -> str:
    return "?" if t is None or t0 is None else f"{t - t0:.2f}"


def sizes(entries: list[Entry]) -> str:
    return ", ".join(e.size() for e in entries) or "none"


def action_lines(
    a: Action,
    until: float,
    entries: list[Entry],
    progress: Progress,
    kill: bool,
    estimate: float | None,
    size: Callable[[float], int],
) -> list[str]:
    """Where one restart's (or SIGKILL's) time went, what the daemons grew meanwhile, and the
    room left at the old daemon's exit against what the writer wrote until the next one's
    first check (the absence). estimate: the old daemon's own idea of the absence
    (stop_absence of its start-up from exec to READY=1).
    size: the pool's data size at a time (the kernel's resizes)."""
    sigterm = first(entries, 1, "Stopping thinwatchd", a.at, until)
    stopping = first(entries, a.old_pid, "thinwatchd stopping", a.at, until)
    exited = first(entries, 1, "thinwatchd.service: Deactivated", a.at, until) or first(
        entries, 1, "thinwatchd.service: Main process exited", a.at, until
    )
    starting = first(entries, 1, "Starting thinwatchd", a.at, until)
    adopted = first(entries, a.new_pid, "adopted after a restart", a.at, until)
    ready = first(entries, a.new_pid, "thinwatchd ready", a.at, until)
    grown = [e for e in entries if e.grown and a.at <= e.t < until]
    # The old daemon's growths after the restart was asked for: its parting pass's (begun
    # after "stopping", or saying why), and those in flight at the stop (begun before).
    late = [e for e in grown if e.pid == a.old_pid]
    parting = [
        e for e in late if PARTING in e.message or (stopping is not None and e.begun() >= stopping)
    ]
    in_flight = [e for e in late if e not in parting]
    at_start = [e for e in grown if e.pid == a.new_pid and ready is not None and e.t <= ready]
    wanted = [m[1] for e in parting if (m := re.search(r"< ([\d.]+\w+) to last until", e.message))]
    total = "?" if ready is None else f"{ready - a.at:.2f}"
    lines = [
        f"#{a.index} {'SIGKILL' if kill else 'restart'} ({a.kind}) at {a.written_mib} MiB "
        f"written: {total} s to READY=1 (the systemctl call: {a.done - a.at:.2f} s)"
        + (f"; {a.note}" if a.note else "")
    ]
    if kill:
        lines.append(
            f"    SIGKILL->exit seen by systemd {since(exited, a.at)} s; growths by the killed "
            f"daemon after the kill: {sizes(late)}"
        )
    else:
        lines.append(
            f"    stop: systemctl->SIGTERM {since(sigterm, a.at)} s, SIGTERM->'stopping' "
            f"{since(stopping, sigterm)} s, 'stopping'->exited {since(exited, stopping)} s; "
            f"parting growth: {sizes(parting)}"
            + (f" (room wanted: {', '.join(wanted)})" if wanted else "")
            + f"; growths in flight at the stop: {sizes(in_flight)}"
        )
    lines.append(
        f"    start: exited->exec {since(a.forked, exited)} s (systemd"
        f"{', RestartSec=' if kill else ''}{since(starting, exited) if kill else ''}), "
        f"exec->/dev/mapper/control {since(a.control, a.forked)} s (interpreter, imports, "
        f"config), ->adopted {since(adopted, a.control or a.forked)} s, adopted->READY=1 "
        f"{since(ready, adopted)} s (first reconcile); growths before READY=1: {sizes(at_start)}"
    )
    gone = stopping if not kill else a.at
    if gone is not None and exited is not None and adopted is not None:
        room = size(exited) - progress.written(exited)
        need = progress.written(adopted) - progress.written(exited)
        line = f"    unwatched {adopted - gone:.1f} s"
        if estimate is not None and not kill:
            rate = (progress.written(gone) - progress.written(gone - 10)) / 10
            due = rate * estimate
            line += (
                f" (the daemon's own estimate {estimate:.1f} s: at {rate / MiB:.0f} MiB/s, "
                f"{due / MiB:.0f} MiB of parting room; room at 'stopping' "
                f"{(size(gone) - progress.written(gone)) // MiB} MiB)"
            )
        lines.append(
            f"{line}; room at the exit {room // MiB} MiB, written from the exit to the next "
            f"daemon's first check {need // MiB} MiB"
        )
    return lines


def report(fill: Fill, progress: Progress, kill: bool) -> tuple[str, list[str]]:
    """Return the figures as text, and the kernel lines of the out-of-space episodes the daemon
    promised to prevent: all of them for restarts; for SIGKILLs, those after a kill whose
    absence (to the next daemon's first check) was within the room the killed daemon kept,
    Daemon.crash_absence_seconds: systemd's gap plus twice its own start-up, exec to READY=1.
    A start-up slowed past that by the host (two emulated guests on two CPUs) is said."""
    variant = "sigkill" if kill else "restart"
    dev = fill.dev()
    records = fill.klog.read()
    # The kernel log's clock against CLOCK_MONOTONIC, from the marks written at each action.
    verb = "kill" if kill else "restart"
    offsets = [
        t - a.at
        for a in fill.actions
        for t, m in records
        if m.startswith(f"thinwatchd-test: {verb} {a.index} ")
    ]
    offset = sorted(offsets)[len(offsets) // 2] if offsets else 0.0
    spread = (max(offsets) - min(offsets)) if offsets else 0.0
    ours = [(t - offset, m) for t, m in records if dev in m]
    episodes = [(t, m) for t, m in ours if OUT_OF_SPACE in m]
    back = [t for t, m in ours if BACK_TO_WRITE in m]
    low_waters = [t for t, m in ours if LOW_WATER in m]
    resizes = [(t, int(g[1]) * BLOCK) for t, m in ours if (g := GROWING.search(m))]

    def size(at: float) -> int:
        return max([b for t, b in resizes if t <= at], default=64 * MiB)

    entries = journal(fill.since)
    t_start = next((t for t, w in progress.samples if w > 0), 0.0)
    t_end = progress.samples[-1][0] if progress.samples else 0.0
    written = progress.written() // MiB
    lines = [
        f"{variant}: {len(fill.actions)} actions during a fill of {written} MiB (O_DIRECT, 1 MiB "
        f"writes, paced at {RATE_MIB} MiB/s) of a 64 MiB pool in {t_end - t_start:.1f} s "
        f"({written / max(t_end - t_start, 1e-9):.1f} MiB/s); kernel log clock offset "
        f"{offset:+.3f} s (spread {spread:.3f} s)"
    ]
    # The old daemon's absence_seconds(), as far as the test sees it: from its exec.
    ready = first(entries, fill.first_pid, "thinwatchd ready", 0.0, float("inf"))
    forked = fill.first_forked
    estimate = None if ready is None or forked is None else stop_absence(ready - forked)
    promised: list[tuple[float, float]] = []  # (from, until) of kills within the kept room
    for n, a in enumerate(fill.actions):
        until = fill.actions[n + 1].at if n + 1 < len(fill.actions) else float("inf")
        lines += action_lines(a, until, entries, progress, kill, estimate, size)
        if kill:
            lines.append(kept_room_line(a, until, entries, ready, forked, promised))
        forked = a.forked
        ready = first(entries, a.new_pid, "thinwatchd ready", a.at, until)
        estimate = None if ready is None or forked is None else stop_absence(ready - forked)
        lw = [t for t in low_waters if t <= a.at]
        if lw:
            lines.append(f"    the last low-water event came {a.at - lw[-1]:.2f} s before")
        eps = [t for t, _ in episodes if a.at <= t < until]
        lines.append(f"    out-of-space episodes until the next action: {len(eps)}")
    lines.append(f"out-of-space episodes in all: {len(episodes)}")
    for t, _ in episodes:
        ends = [b for b in back if b > t]
        lasted = f"{ends[0] - t:.2f} s" if ends else "not ended"
        lines.append(f"    at +{t - t_start:.2f} s into the fill, lasted {lasted}")
    stalls = progress.stalls(0.5)
    if stalls:
        worst = max(stalls, key=lambda s: s[1])
        lines.append(
            f"writer's longest stall: {worst[1]:.2f} s at +{worst[0] - t_start:.2f} s; all "
            "over 0.5 s: " + ", ".join(f"{d:.1f} s at +{t - t_start:.1f}" for t, d in stalls)
        )
    else:
        lines.append("writer's longest stall: none over 0.5 s")
    text = "\n".join(lines)
    out = os.environ.get("THINWATCHD_VM_OUT")
    if out:
        journal_text = "\n".join(f"[{e.t:12.6f}] {e.pid}: {e.message}" for e in entries)
        with contextlib.suppress(OSError):
            Path(out, f"restart-under-fill-{variant}.txt").write_text(
                f"{text}\n\n--- journal\n{journal_text}\n\n--- kernel log (offset "
                f"{offset:+.3f} s)\n{fill.klog.text()}\n"
            )
    if kill:
        episodes = [(t, m) for t, m in episodes if any(f <= t < u for f, u in promised)]
        if not promised:
            episodes.append((0.0, "no kill came within the room its daemon kept: nothing proved"))
    return text, [m for _, m in episodes]


def kept_room_line(
    a: Action,
    until: float,
    entries: list[Entry],
    ready: float | None,
    forked: float | None,
    promised: list[tuple[float, float]],
) -> str:
    """Whether the killed daemon's absence was within the room it kept (appended to promised)."""
    adopted = first(entries, a.new_pid, "adopted after a restart", a.at, until)
    if ready is None or forked is None or adopted is None:
        return "    the killed daemon's kept room: not measured"
    kept = crash_absence(ready - forked)
    unwatched = adopted - a.at
    if unwatched <= kept:
        promised.append((a.at, until))
        verdict = "within it"
    else:
        verdict = "beyond it: the host slowed the next start-up past the killed one's"
    return (
        f"    the killed daemon kept room for {kept:.1f} s ({RESTART_GAP_SECONDS:g} s + twice "
        f"its start-up of {ready - forked:.1f} s); unwatched {unwatched:.1f} s: {verdict}"
    )


def pool_mode(fill: Fill) -> str:
    status = parse_pool_status(fill.dm.status(fill.pool, noflush=True)[0].params)
    assert isinstance(status, ThinPoolWorkingStatus), status
    return status.mode.value


def test_restarts_during_a_fast_fill_cost_no_out_of_space(fill: Fill) -> None:
    progress, code = run_fill(fill, kill=False)
    time.sleep(2)  # the journal's last lines
    text, episodes = report(fill, progress, kill=False)
    print(text)
    done = tuple(a.kind for a in fill.actions)
    assert done == RESTARTS, f"the fill ended before the restarts: {done}\n{text}"
    # The case the issue names: a restart between a low-water event and its growth.
    pending = [a for a in fill.actions if a.note.endswith(PENDING_CAME)]
    assert pending, f"no restart came with the kernel's event pending\n{text}"
    assert code in (0, -signal.SIGTERM), f"the writer exited {code}\n{text}"
    assert progress.written() >= FILL_MIB * MiB, text
    assert not episodes, f"out of space during restarts: {episodes}\n{text}"
    assert pool_mode(fill) == "rw", text


def test_sigkills_during_a_fast_fill_cost_no_out_of_space(fill: Fill) -> None:
    progress, _code = run_fill(fill, kill=True)
    time.sleep(2)
    text, episodes = report(fill, progress, kill=True)
    print(text)
    assert fill.actions, text
    assert not episodes, f"out of space while a killed daemon was away: {episodes}\n{text}"
    assert pool_mode(fill) == "rw", text
