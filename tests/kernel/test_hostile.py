"""Issue 7: thinwatchd on a hostile host, against the real kernel. Never a hung writer, never a
lost byte: an operator growing the pool by hand beside the daemon (and losing the race against
one of its growths), a second instance on the same config, and a pool left half-way between
suspend, load and resume. The operator uses the real dmsetup, losetup and truncate.

Every wait has its own deadline: a pool suspended for seconds or a writer without progress fails
the test with dmsetup's view, the daemon logs and the kernel log, after the pool has been resumed
and the writer killed (harness.await_writer), so a failure never hangs the guest.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from testbed.harness import REPO, MiB
from tests.kernel.harness import (
    HostileEnv,
    PoolWatch,
    await_writer,
    build_pool,
    hostile_env,
    kernel_lines,
    run_tool,
    verify_stamped,
)
from thinwatchd.base.errors import KernelError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.units import Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

pytestmark = pytest.mark.kernel

OUT_OF_SPACE = "switching pool to out-of-data-space"
#: dm-thin's refusal of a table shorter than the data size its metadata records.
TOO_SMALL = r"too small: expected"
#: dm-thin's note of each data resize: "<pool>: growing the data device from A to B blocks".
GROWING = re.compile(r"growing the data device from (\d+) to (\d+) blocks")
BLOCK_SECTORS = 128  # 64 KiB data blocks, the default
EX_TEMPFAIL = 75

#: Small pool, fixed mark, small steps: the pool grows several times in a few hundred MiB.
SMALL_POOL: dict[str, object] = {
    "data_size": "64MiB",
    "metadata_size": "16MiB",
    "low_water_mark": 128,
    "reserve": 0,
    "data": {"adaptive_low_water": False, "step": "32MiB", "step_percent": "0%"},
}
FAST_CHECKS: dict[str, object] = {"check_interval": "1s"}


def pool_status(env: HostileEnv) -> ThinPoolWorkingStatus:
    status = parse_pool_status(env.dm.status(env.pool, noflush=True)[0].params)
    assert isinstance(status, ThinPoolWorkingStatus), status
    return status


def assert_pool_healthy(env: HostileEnv) -> None:
    """ACTIVE: an active table, not suspended, nothing in the inactive slot, mode rw."""
    info = env.dm.info(env.pool)
    assert info is not None, "pool device gone"
    state = f"suspended={info.suspended} inactive={info.inactive_present}"
    assert info.active_present and not info.suspended and not info.inactive_present, (
        f"pool not ACTIVE at the end ({state})\n{env.diagnostics()}"
    )
    status = pool_status(env)
    assert status.mode.value == "rw", f"pool in mode {status.mode.value}\n{env.diagnostics()}"


def assert_no_traceback(env: HostileEnv) -> None:
    logs = env.logs()
    assert "Traceback" not in logs and "internal error" not in logs, logs


# -- 1. an operator grows the pool by hand while the daemon grows it too ----------------------


def operator_grow(env: HostileEnv, add: int) -> tuple[int, int, str]:
    """Grow the pool as old Docker docs taught: truncate, losetup -c, dmsetup reload, resume.

    Return (old length, new length) in sectors and the transcript. Every command has a deadline.
    """
    transcript: list[str] = []

    def run(*args: str) -> str:
        done = run_tool(list(args), timeout=30)
        transcript.append(f"$ {' '.join(args)} -> {done.returncode}\n{done.stdout}{done.stderr}")
        if done.returncode != 0:
            diagnostics = env.diagnostics()
            notes = env.unstick()
            pytest.fail(
                "the operator's own growth failed (a race with the daemon's growth, or dmsetup "
                f"itself): {args}\n" + "\n".join(transcript) + f"\nunstuck: {notes}\n{diagnostics}",
                pytrace=False,
            )
        return done.stdout

    loop = run("losetup", "-j", str(env.data)).split(":", 1)[0]
    assert loop.startswith("/dev/loop"), transcript
    new_size = env.data.stat().st_size + add
    run("truncate", "-s", str(new_size), str(env.data))
    run("losetup", "-c", loop)
    start, old_length, kind, params = run("dmsetup", "table", env.pool).split(None, 3)
    assert (start, kind) == ("0", "thin-pool"), transcript
    new_length = new_size // 512 // BLOCK_SECTORS * BLOCK_SECTORS
    run("dmsetup", "reload", env.pool, "--table", f"0 {new_length} thin-pool {params.strip()}")
    run("dmsetup", "resume", env.pool)
    return int(old_length), new_length, "\n".join(transcript)


def test_manual_grow_during_fill_is_adopted() -> None:
    """dmsetup reload/resume with a longer table beside the running daemon, mid-fill: the
    writer finishes, every byte reads back, the pool ends ACTIVE, never out of space, the
    daemon says it saw the outside growth, and never loads a table shorter than the manual one
    (the known bug: it reloads its cached length, the kernel refuses it at resume, the undo
    loads the same stale length, the pool stays suspended and the writer hangs in D state)."""
    for tool in ("dmsetup", "losetup", "truncate"):
        assert shutil.which(tool), f"{tool} missing in the guest (lvm2/dmsetup, util-linux)"
    # MiB written, MiB before the manual growth. The writer pauses for the operator's commands
    # (0.5-2 s here): else the daemon may grow past the operator's length in between and the
    # kernel refuse his resume, a race of his own (test_operator_refused_resume_...). It
    # starts right after one of the daemon's growths, so the daemon is not about to grow.
    total, manual_at, add, rate = 256, 64, 128 * MiB, 16
    with hostile_env() as env:
        daemon = env.daemon(env.config(FAST_CHECKS, **SMALL_POOL))
        thin = env.thin(size=1024 * MiB)
        watch = PoolWatch(env.pool)
        try:
            writer = env.writer(thin, total * MiB, b"manual grow", rate=rate)
            await_writer(env, writer, until_mib=manual_at, watch=watch)
            before = env.table_length()  # start right after one of the daemon's growths
            await_writer(env, writer, until=lambda: env.table_length() != before, watch=watch)
            with writer.paused():
                old, manual, transcript = operator_grow(env, add)
            manual_since = time.monotonic()
            print(f"operator grew {env.pool} from {old} to {manual} sectors\n{transcript}")
            await_writer(env, writer, deadline=240, watch=watch)
            time.sleep(3)  # a few safety checks after the fill
        finally:
            watch.stop()
        print(f"writer: {total} MiB in {writer.seconds} s; table lengths seen: {watch.lengths()}")

        bad = verify_stamped(thin, total * MiB, b"manual grow")
        assert not bad, f"{len(bad)} MiB differ, first at {bad[:8]}\n{env.diagnostics()}"
        assert_pool_healthy(env)
        kernel = env.klog.text()
        assert OUT_OF_SPACE not in kernel, kernel
        refused = kernel_lines(env.klog, TOO_SMALL)
        assert not refused, f"a table shorter than the pool was loaded: {refused}\n{kernel}"

        # never shorter than the manual length once it was seen
        lengths = [s.length for s in watch.samples if s.at >= manual_since and s.length]
        assert lengths and min(lengths) >= manual, (
            f"table lengths after the manual growth: {lengths}"
        )
        assert watch.lengths() == sorted(watch.lengths()), f"a table shrank: {watch.lengths()}"
        manual_blocks = manual // BLOCK_SECTORS
        resizes = [
            tuple(map(int, m.groups())) for m in map(GROWING.search, kernel.splitlines()) if m
        ]
        after = [(a, b) for a, b in resizes if b > manual_blocks]
        assert after, f"no growth by the daemon after the manual one: {resizes}\n{env.logs()}"
        assert all(a >= manual_blocks for a, _ in after), (
            f"resizes {resizes}, manual {manual_blocks}"
        )
        assert env.table_length() > manual, "the daemon must have grown past the manual length"

        # the daemon logged the outside growth: wording free, the fact (that length) required
        numbers = {str(manual), str(manual * 512), str(manual_blocks), format_bytes(manual * 512)}
        words = re.compile(r"(?i)outside|someone else|by hand|external|adopt|not by thinwatchd")
        said = [
            line
            for line in daemon.log().splitlines()
            if words.search(line)
            and any(n in line for n in numbers)
            and "after a restart" not in line
        ]
        assert said, (
            f"the daemon never logged that the pool was grown to {manual} sectors "
            f"({format_bytes(manual * 512)}) by someone else:\n{daemon.log()}"
        )
        print("the daemon said:", *said, sep="\n  ")
        assert daemon.proc is not None and daemon.proc.poll() is None, (
            "the daemon must keep running"
        )
        assert_no_traceback(env)


def test_operator_refused_resume_does_not_hang_writers() -> None:
    """An operator's `dmsetup reload` with a table shorter than the pool (what he gets when he
    loses the race against one of the daemon's growths: he read the table before it) and
    `dmsetup resume`: the kernel refuses it and leaves the pool SUSPENDED with that table swapped
    in. Nobody else will ever resume it, so the running daemon must (the kernel cannot accept
    that table, so it is no deliberate `dmsetup suspend`): the writer finishes, nothing is lost,
    and the pool keeps its real length (the refused one is never adopted)."""
    with hostile_env() as env:
        env.daemon(env.config(FAST_CHECKS, **SMALL_POOL))
        thin = env.thin(size=512 * MiB)
        writer = env.writer(thin, 32 * MiB, b"refused resume", rate=8)
        await_writer(env, writer, until_mib=8)
        live = env.table_length()
        start, _, kind, params = run_tool(["dmsetup", "table", env.pool]).stdout.split(None, 3)
        short = live // 2 // BLOCK_SECTORS * BLOCK_SECTORS
        table = f"{start} {short} {kind} {params.strip()}"
        loaded = run_tool(["dmsetup", "reload", env.pool, "--table", table])
        resumed = run_tool(["dmsetup", "resume", env.pool])
        info = env.dm.info(env.pool)
        assert loaded.returncode == 0 and resumed.returncode != 0, (loaded, resumed)
        # dmsetup resume returns after its udev wait: the daemon, woken by the kernel's event,
        # may have resumed the pool by then. Either way the refusal left it suspended first.
        assert info is not None, "test setup: the pool is gone"
        if not info.suspended:
            assert "someone's resume of it was refused" in env.logs(), env.logs()
        await_writer(env, writer, deadline=60, suspended_limit=10)
        assert_pool_healthy(env)
        assert env.table_length() >= live, f"table {env.table_length()} < {live} before"
        assert not verify_stamped(thin, 32 * MiB, b"refused resume")
        assert_no_traceback(env)


# -- 2. a second instance on the same config ---------------------------------------------------


def _thinwatchd(config: object, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "thinwatchd", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        text=True,
    )


def test_second_instance_exits_and_the_first_keeps_working() -> None:
    """A second `thinwatchd run` on the same config exits promptly with 75 (EX_TEMPFAIL) and one
    line naming the first's pid, without touching the pool; the first goes on growing it; and
    the lock dies with its holder (a SIGKILLed first does not block the next start)."""
    os.makedirs("/run", exist_ok=True)  # the plain guest's /run is a bare tmpfs
    with hostile_env() as env:
        config = env.config(FAST_CHECKS, **SMALL_POOL)
        first = env.daemon(config)
        assert first.proc is not None
        table = env.dm.table(env.pool)

        # baseline: the same interpreter start and config load, nothing else
        started = time.monotonic()
        baseline_run = _thinwatchd(config, "check-config")
        baseline_run.communicate(timeout=120)
        baseline = time.monotonic() - started

        started = time.monotonic()
        second = _thinwatchd(config, "run", "--log-target", "stderr")
        limit = 2 * baseline + 10
        try:
            out, _ = second.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            second.send_signal(signal.SIGTERM)
            try:
                out, _ = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                second.kill()
                out, _ = second.communicate()
            info = env.dm.info(env.pool)
            pytest.fail(
                f"a second `thinwatchd run` was still running after {limit:.0f} s (check-config "
                f"takes {baseline:.1f} s): two daemons on one pool (suspended now: "
                f"{info and info.suspended}). Its output:\n{out}",
                pytrace=False,
            )
        elapsed = time.monotonic() - started
        print(
            f"second instance: exit {second.returncode} after {elapsed:.1f} s "
            f"(check-config {baseline:.1f} s): {out!r}"
        )
        lines = [line for line in out.splitlines() if line.strip()]
        assert second.returncode == EX_TEMPFAIL, f"exit {second.returncode}, output:\n{out}"
        assert len(lines) == 1, f"want one line, got:\n{out}"
        assert re.search(rf"\b{first.proc.pid}\b", lines[0]), (
            f"pid {first.proc.pid} not named: {out}"
        )
        assert env.dm.table(env.pool) == table, "the second instance touched the pool"
        assert first.proc.poll() is None, "the first instance must keep running"

        # the first keeps working: a fill through several growths
        thin = env.thin(size=1024 * MiB)
        writer = env.writer(thin, 160 * MiB, b"first keeps going")
        await_writer(env, writer, deadline=180)
        assert not verify_stamped(thin, 160 * MiB, b"first keeps going")
        assert_pool_healthy(env)
        assert OUT_OF_SPACE not in env.klog.text(), env.klog.text()
        assert "growing data" in first.log(), first.log()

        # the lock dies with its holder: the unit's restart after a crash must not get 75
        first.proc.kill()
        first.proc.wait(30)
        env.daemon(config, timeout=120)
        assert_no_traceback(env)


# -- 3. a crash between suspend, load and resume -----------------------------------------------


def _grow_file_and_loop(env: HostileEnv, add: int) -> int:
    """truncate + LOOP_SET_CAPACITY: the first two steps of a growth; return the new length."""
    os.truncate(env.data, env.data.stat().st_size + add)
    loops = LoopControl()
    loop = loops.find(str(env.data))
    assert loop is not None
    loops.set_capacity(loop)
    return env.loop_length()


def _grow_by_hand(env: HostileEnv, add: int) -> int:
    """A whole growth (file, loop, load, resume); return the live length."""
    length = _grow_file_and_loop(env, add)
    (active,) = env.dm.table(env.pool)
    env.dm.load_table(env.pool, [Target(Sectors(0), Sectors(length), "thin-pool", active.params)])
    env.dm.resume(env.pool)
    return length


def _leave_interrupted(env: HostileEnv, state: str) -> None:
    """Leave the pool as a crash between the steps of a reload can."""
    dm, pool = env.dm, env.pool
    (active,) = dm.table(pool)
    if state == "inactive_longer":  # loaded, never resumed
        length = _grow_file_and_loop(env, 64 * MiB)
        dm.load_table(pool, [Target(Sectors(0), Sectors(length), "thin-pool", active.params)])
    elif state == "suspended_no_inactive":  # suspended, then the load never came
        _grow_file_and_loop(env, 64 * MiB)
        dm.suspend(pool)
    elif state == "suspended_inactive_shorter":  # suspended, a stale shorter table loaded
        old = active.length
        _grow_by_hand(env, 64 * MiB)
        (active,) = dm.table(pool)
        dm.suspend(pool)
        dm.load_table(pool, [Target(Sectors(0), old, "thin-pool", active.params)])
        os.truncate(env.data, env.data.stat().st_size + 64 * MiB)  # and a file step on top
    elif state == "resume_refused_stale":  # what today's failed undo leaves: stale table swapped in
        old = active.length
        _grow_by_hand(env, 64 * MiB)
        (active,) = dm.table(pool)
        dm.load_table(pool, [Target(Sectors(0), old, "thin-pool", active.params)])
        with pytest.raises(KernelError):  # the kernel refuses to shrink
            dm.resume(pool)
    info = dm.info(pool)
    assert info is not None
    expected = {
        "inactive_longer": (False, True),
        "suspended_no_inactive": (True, False),
        "suspended_inactive_shorter": (True, True),
        "resume_refused_stale": (True, False),
    }[state]
    assert (info.suspended, info.inactive_present) == expected, (
        f"test setup: {state} gave suspended={info.suspended} inactive={info.inactive_present}"
    )


#: The states the kernel shows alike for an operator's `dmsetup suspend`: not ours to undo.
SOMEONE_ELSES = ("suspended_no_inactive",)


@pytest.mark.parametrize(
    "state",
    [
        "inactive_longer",
        "suspended_no_inactive",
        "suspended_inactive_shorter",
        "resume_refused_stale",
    ],
)
def test_start_over_a_pool_left_between_suspend_load_and_resume(state: str) -> None:
    """Whatever a crash between suspend, load and resume left, with a writer blocked on the
    pool: the daemon comes up, the pool ends ACTIVE with the longest valid length (the data
    file's, in whole blocks), the blocked writer finishes and every byte reads back. A bare
    suspend on a valid table (SOMEONE_ELSES) is what `dmsetup suspend` leaves: the daemon
    leaves it, says so, and the writer goes on once the operator resumes the pool."""
    with hostile_env() as env:
        config = env.config(FAST_CHECKS, **SMALL_POOL)
        build_pool(env, 64 * MiB, 16 * MiB)  # as the daemon builds it (saves a start here)
        thin = env.thin(size=512 * MiB)
        before = env.writer(thin, 16 * MiB, b"before the crash")
        await_writer(env, before, deadline=60)
        _leave_interrupted(env, state)
        blocked = env.writer(thin, 16 * MiB, b"while it is stuck", offset=16 * MiB)
        time.sleep(0.5)
        started = time.monotonic()
        second = env.daemon(config, start=False)
        try:
            second.start(timeout=90)
        except AssertionError as exc:
            diagnostics = env.diagnostics()
            pytest.fail(
                f"daemon did not come up over {state}: {exc}; unstuck: "
                f"{env.unstick()}\n{diagnostics}",
                pytrace=False,
            )
        ready = time.monotonic() - started
        if state in SOMEONE_ELSES:
            # What `dmsetup suspend` leaves, and the record of our own suspends does not name
            # it: left to whoever suspended it, and said; the operator then resumes it.
            time.sleep(3)
            info = env.dm.info(env.pool)
            assert info is not None and info.suspended, f"resumed by the daemon\n{second.log()}"
            assert "suspended by someone else" in second.log(), second.log()
            assert blocked.poll() is None, "the writer finished while the pool was suspended"
            env.dm.resume(env.pool)
        await_writer(env, blocked, deadline=60)
        print(f"{state}: ready after {ready:.1f} s; {second.log()}")

        assert_pool_healthy(env)
        longest = env.data.stat().st_size // 512 // BLOCK_SECTORS * BLOCK_SECTORS
        if state not in SOMEONE_ELSES:  # the operator's resume did not finish the growth
            assert env.table_length() == longest, (
                f"table {env.table_length()} sectors, the data file allows {longest}\n"
                f"{second.log()}"
            )
            assert pool_status(env).data_total * BLOCK_SECTORS == longest
        assert not verify_stamped(thin, 16 * MiB, b"before the crash"), "data lost"
        assert not verify_stamped(thin, 16 * MiB, b"while it is stuck", offset=16 * MiB)
        assert OUT_OF_SPACE not in env.klog.text()
        assert second.proc is not None and second.proc.poll() is None
        assert_no_traceback(env)
