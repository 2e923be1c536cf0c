"""Issue 19: thinwatchd's own faults. Each test here failed on the code before its fix.

Reloads that race a build, a reload that hands a running pool's file to a new pool, syscalls
on pool files made on the event loop's thread, and files never looked at yet behind one lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel, Fault
from testbed.workers import InlineWorkers
from thinwatchd.base.errors import KernelError
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.notify import Notifier
from thinwatchd.base.workers import Workers
from thinwatchd.daemon.daemon import Daemon, Threads
from thinwatchd.growth.state import ManagedPool
from thinwatchd.kernel.api import Kernel
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

MiB = 1024**2
#: Long enough for anything here many times over; a test that waits this long has failed.
PATIENCE = 5.0


def small_pool(tmp: Path, name: str, **keys: object) -> dict[str, object]:
    return {
        "data_file": f"{tmp}/{name}.data",
        "metadata_file": f"{tmp}/{name}.meta",
        "data_size": "64MiB",
        "metadata_size": "8MiB",
        "low_water_mark": 16,
        "reserve": 0,
        **keys,
    }


def configure(path: Path, pools: dict[str, dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump({"daemon": {"check_interval": "10s"}, "pools": pools}))
    return path


def file_workers(loop: EventLoop) -> Workers:
    return Workers(loop, max_threads=2, stuck_after=1.0)


#: The daemon's own threads for jobs on pool files (conftest's INLINE runs them inline).
FILES_IN_THREADS = Threads(reconciles=InlineWorkers, files=file_workers)
#: ... and for reconciles too.
ALL_IN_THREADS = Threads(reconciles=lambda loop: Workers(loop, max_threads=2), files=file_workers)


def started(
    tmp_path: Path,
    kernel: Kernel,
    pools: dict[str, dict[str, object]],
    threads: Threads = FILES_IN_THREADS,
    own_suspends: Path | None = None,
) -> Daemon:
    config = configure(tmp_path / "config.yaml", pools)
    daemon = Daemon(
        config,
        kernel,
        notifier=Notifier(),
        loop=EventLoop(Clock()),
        threads=threads,
        own_suspends_file=own_suspends,
    )
    daemon.start()
    daemon._started = True
    return daemon


def test_a_pool_removed_while_its_build_fails_is_not_built_later(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 6: a reload adds pool extra; a second reload removes it while its build runs; the
    build then fails. It must not go on the retry list (the next check would build it)."""
    one = {"pool": small_pool(tmp_path, "pool")}
    daemon = started(tmp_path, kernel, one)
    fake.faults.append(Fault("lstat", errno.EIO, target="extra", times=None))
    configure(daemon.config_path, {**one, "extra": small_pool(tmp_path, "extra")})
    daemon.reload()  # extra's build starts in a worker; its result reaches the loop later
    daemon.file_workers.run_until_idle(timeout=PATIENCE)  # once the new files are checked
    assert daemon.workers.busy("extra")
    configure(daemon.config_path, one)
    daemon.reload()  # the second SIGHUP, before that result
    daemon.workers.run_until_idle(timeout=PATIENCE)
    assert "extra" not in daemon.unbuilt.pending
    fake.faults.clear()
    for settings in list(daemon.unbuilt.pending.values()):  # what the safety check builds
        daemon._activate(settings)
    daemon.workers.run_until_idle(timeout=PATIENCE)
    assert "extra" not in fake.devices and "extra" not in daemon.pools


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_a_reload_never_builds_a_new_pool_on_a_running_pools_file(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, how: str
) -> None:
    """Item 5: pool a runs on a.data. A reload gives that file to a new pool b (with new
    metadata of its own: the kernel refuses a metadata device in use, not a data device), a
    moved to new paths (or removed from the config: it stays active). b is refused, naming
    the running pool; no second table maps a's data loop."""
    daemon = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")})
    thief = small_pool(tmp_path, "b", data_file=f"{tmp_path}/a.data")
    pools = {"b": thief}
    if how == "moved":
        pools["a"] = small_pool(tmp_path, "a-elsewhere")
    configure(daemon.config_path, pools)
    daemon.reload()
    daemon.workers.run_until_idle(timeout=PATIENCE)
    assert "b" not in fake.devices
    assert "b" not in daemon.pools
    assert not (tmp_path / "b.meta").exists()  # refused before anything was made


def test_a_stalled_lstat_of_a_new_pool_holds_up_no_other_pools_check(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 4: pool b was just built; its first look (an lstat) stalls. Pool a's check, on
    another filesystem's files as far as anyone knows, must not wait for it."""
    daemon = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")})
    release = threading.Event()
    stalled = threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(PATIENCE)

    looks = daemon.extender.backing
    fake.stall("lstat", "b.data", stall)
    done = threading.Event()

    def check_b() -> None:
        looks.watch([f"{tmp_path}/b.data"])  # as a pool just built is
        with contextlib.suppress(KernelError):  # (b.data is not even there)
            looks.new_pass().figures(f"{tmp_path}/b.data")

    def check_a() -> None:
        assert stalled.wait(PATIENCE)
        looks.new_pass().figures(f"{tmp_path}/a.data")
        done.set()

    threads = [threading.Thread(target=check_b), threading.Thread(target=check_a)]
    for t in threads:
        t.start()
    try:
        assert done.wait(2.0), "a's look waited for b's stalled first look"
    finally:
        release.set()
        for t in threads:
            t.join(PATIENCE)


@pytest.fixture
def stalled_files(fake: FakeKernel) -> Iterator[Callable[[str], None]]:
    """Make every lstat and stat of paths containing a text wait (a hard-mounted NFS that
    stopped answering) until the test ends."""
    release = threading.Event()

    def stall(target: str) -> None:
        for op in ("lstat", "stat", "statvfs"):
            fake.stall(op, target, lambda: release.wait(PATIENCE))

    yield stall
    release.set()


def test_a_udev_change_of_a_loop_whose_file_stalls_does_not_stop_the_loop(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    stalled_files: Callable[[str], None],
) -> None:
    """Item 2: each growth's LOOP_SET_CAPACITY sends a udev "change"; checking that the loop
    still backs the pool's file stats that file. On the loop's thread, a stalled filesystem
    stopped every event and the watchdog; now the loop returns at once."""
    from tests.engine.test_growth import FakeMonitor, FakeUdevDevice

    monitor = FakeMonitor()
    config = configure(tmp_path / "config.yaml", {"a": small_pool(tmp_path, "a")})
    d = Daemon(
        config,
        kernel,
        notifier=Notifier(),
        loop=EventLoop(),
        udev_monitor=monitor,
        threads=FILES_IN_THREADS,
    )
    d.start()
    d.loop.add_reader(monitor.fileno(), d._on_udev)
    stalled_files(f"{tmp_path}/a.")
    loop = d.pools["a"].pool.data_loop
    monitor.send(FakeUdevDevice("change", loop.path))
    started_at = time.monotonic()
    d.loop.run_once(max_wait=0.1)
    assert time.monotonic() - started_at < 1.0, "the loop waited for a stalled stat"
    assert d.file_workers.busy(f"check {loop.path}")


def test_a_reload_whose_new_files_stall_does_not_stop_the_loop(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    stalled_files: Callable[[str], None],
) -> None:
    """Item 2: a reload looks at every pool file of the new config (two spellings of one file,
    a running pool's file). On the loop's thread, one stalled filesystem stopped everything."""
    daemon = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")})
    (tmp_path / "nfs").mkdir()
    stalled_files(f"{tmp_path}/nfs")
    configure(
        daemon.config_path,
        {"a": small_pool(tmp_path, "a"), "b": small_pool(tmp_path / "nfs", "b")},
    )
    started_at = time.monotonic()
    daemon.reload()
    assert time.monotonic() - started_at < 1.0, "the reload waited for a stalled stat"


def test_a_pool_our_failed_resume_left_suspended_is_resumed_once_the_kernel_accepts(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 1: a growth's resume fails in pool_preresume (the device stays suspended on the
    new table) and so do the rollback's resumes. The journal must not say the pool was
    resumed; every later check must try again (not take it for an operator's dmsetup
    suspend), and resume it once the kernel accepts."""
    from tests.engine.test_backing import to_mark

    daemon = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")})
    clock = daemon.loop._clock
    fake.fail_preresume("a", errno.EIO, times=10**6)  # the growth's resume, every rollback's
    to_mark(fake, daemon, "a")
    daemon.dm_events.check()
    info = fake.info("a")
    assert info is not None and info.suspended
    failed = [r.getMessage() for r in caplog.records if "SUSPENDED" in r.getMessage()]
    assert len(failed) == 1, caplog.text
    assert "resumed on its previous size" not in caplog.text
    for _ in range(3):  # checks while the kernel still refuses: said no more, never given up
        clock.now += 60  # type: ignore[attr-defined]
        daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
        info = fake.info("a")
        assert info is not None and info.suspended
    assert "suspended by someone else" not in caplog.text
    fake.fail_preresume("a", errno.EIO, times=0)  # the metadata device answers again
    clock.now += 60  # type: ignore[attr-defined]
    daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    info = fake.info("a")
    assert info is not None and not info.suspended
    assert "resumed at last" in caplog.text
    # Each refused preresume of the longer table resized the pool in memory again (the real
    # kernel's accumulating space-map extension): a retry with it would have recorded more
    # blocks than the data device holds, and writes past the device fail.
    pool = fake.devices["a"].pool
    assert pool is not None
    device_blocks = fake.loops[pool.data_loop].capacity // (pool.block_sectors * 512)
    fake.write_blocks("a", 0)  # a write commits what is in memory
    assert pool.metadata.data_total <= device_blocks, (pool.metadata.data_total, device_blocks)
    daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    fake.write_blocks("a", device_blocks - pool.metadata.data_used)
    assert pool.failed_writes == 0


def check_passes(daemon: Daemon, count: int = 1) -> None:
    """Run count safety passes, a minute apart (past any backoff)."""
    clock = daemon.loop._clock
    for _ in range(count):
        clock.now += 60  # type: ignore[attr-defined]
        daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)


def suspended(fake: FakeKernel, name: str) -> bool:
    info = fake.info(name)
    assert info is not None
    return info.suspended


def test_a_restart_still_knows_the_pools_our_failed_resumes_left_suspended(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 1, across a restart: our growth's resume and its rollback are refused, and the
    daemon restarts while the kernel still refuses. The next instance knows the suspend is
    its own (the record in the runtime directory), keeps trying, and resumes the pool once
    the kernel accepts; the record then forgets it."""
    from tests.engine.test_backing import to_mark

    record = tmp_path / "own-suspends"
    first = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")}, own_suspends=record)
    fake.fail_preresume("a", errno.EIO, times=10**6)
    to_mark(fake, first, "a")
    first.dm_events.check()
    assert suspended(fake, "a")
    assert record.read_text() == "a\n"

    second = started(tmp_path, kernel, {"a": small_pool(tmp_path, "a")}, own_suspends=record)
    assert second.pools["a"].state.own_suspend, "the restart forgot whose suspend it is"
    check_passes(second, 3)
    assert suspended(fake, "a")  # the kernel still refuses; tried, not given up
    assert "suspended by someone else" not in caplog.text
    fake.fail_preresume("a", errno.EIO, times=0)
    check_passes(second)
    assert not suspended(fake, "a"), caplog.text
    assert "resumed at last" in caplog.text
    assert record.read_text() == ""


def test_a_restart_leaves_a_pool_someone_else_suspended_alone(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator's dmsetup suspend, then a restart: the new instance does not resume the
    pool (before, start-up resumed any suspended pool), says so once, and does not grow it
    while it stays suspended; once the operator resumes it, it is grown as before."""
    from tests.engine.test_backing import to_mark

    record = tmp_path / "own-suspends"
    pools = {"a": small_pool(tmp_path, "a")}
    first = started(tmp_path, kernel, pools, own_suspends=record)
    size = os.stat(tmp_path / "a.data").st_size
    to_mark(fake, first, "a")
    fake.suspend("a")  # the operator's; the kernel's low-water event is pending

    second = started(tmp_path, kernel, pools, own_suspends=record)
    second.dm_events.check()
    check_passes(second, 2)
    assert suspended(fake, "a"), "a restart resumed an operator's suspend"
    assert os.stat(tmp_path / "a.data").st_size == size, "grown while someone held it suspended"
    said = [r.getMessage() for r in caplog.records if "suspend" in r.getMessage()]
    assert len(said) == 1 and "suspended by someone else" in said[0], caplog.text
    assert "dmsetup resume a" in said[0]
    assert not second.pools["a"].state.own_suspend

    fake.resume("a")  # the operator is done
    check_passes(second)
    assert os.stat(tmp_path / "a.data").st_size > size, caplog.text


def test_a_stopping_daemon_leaves_a_filling_pool_room_for_its_absence(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 10: a restart leaves the pools unwatched (measured 3-9 s in the guest): nobody
    answers the kernel's event meanwhile. A pool filling at 10 MiB/s is grown before the daemon
    exits so that it lasts the absence at that rate; one that does not fill is left alone."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    pool = small_pool(
        tmp_path,
        "a",
        preallocate=False,
        data={"step": "16MiB", "step_percent": "0%", "adaptive_low_water": False},
    )
    daemon = started(tmp_path, kernel, {"a": pool, "idle": small_pool(tmp_path, "idle")})
    clock = daemon.loop._clock
    for _ in range(4):  # 10 MiB/s for 4 s, a check each second
        fake.write_blocks("a", 160)
        clock.now += 1  # type: ignore[attr-defined]
        daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    idle_size = (tmp_path / "idle.data").stat().st_size
    daemon.scheduler.parting_pass(30.0)
    daemon.scheduler.finish()
    status = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    assert status.data_free * 64 * 1024 >= 300 * MiB, status
    assert "to last until the next daemon" in caplog.text
    assert (tmp_path / "idle.data").stat().st_size == idle_size


def test_a_killed_daemon_leaves_a_filling_pool_room_until_the_next_is_up(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 10's SIGKILLs: a daemon that is killed leaves no parting room, and the pools go
    unwatched until systemd has started the next one (RestartSec=, then its start-up). The
    adaptive mark holds that long of filling at all times, so a pool filling at 10 MiB/s,
    killed at the worst moment (at its mark, the event unanswered), does not run out of space
    before the next daemon answers. Without it the mark held 4 growths' worth (34 MiB)."""
    pool = small_pool(
        tmp_path, "a", preallocate=False, data={"step": "16MiB", "step_percent": "0%"}
    )
    daemon = started(tmp_path, kernel, {"a": pool})
    clock = daemon.loop._clock
    now = daemon.loop.time()
    daemon._born, daemon._ready_at = now - 5.5, now  # a start-up as the guest's
    absence = daemon.crash_absence_seconds()
    assert absence == 14.0  # RestartSec= and more (3 s), then twice the start-up
    for _ in range(6):  # 10 MiB/s, a check each second, events answered
        fake.write_blocks("a", 160)
        clock.now += 1  # type: ignore[attr-defined]
        daemon.dm_events.check()
        daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    status = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    mark = daemon.pools["a"].pool.table.low_water_mark
    assert mark * 64 * 1024 >= 10 * MiB * absence, (mark, absence)
    fake.write_blocks("a", status.data_free - mark)  # at the mark: the event comes, and then
    fake.write_blocks("a", math.ceil(10 * MiB * absence / (64 * 1024)))  # nobody answers
    runtime = fake.devices["a"].pool
    assert runtime is not None
    assert runtime.mode != "out_of_data_space" and runtime.queued_blocks == 0, runtime.mode


def test_a_fill_that_has_just_begun_gets_its_mark_from_the_rate_across_its_first_growth(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Found in the guest's SIGKILLs: the first growth of a fill that began after a quiet spell
    measured its rate over that spell (5 MiB/s against 32), and a daemon killed 4 s later left
    the pool a mark for that rate. A check one second after each growth measures the rate
    across it and raises the mark."""
    from tests.engine.test_backing import to_mark
    from thinwatchd.growth.schedule import FOLLOW_UP_BATCH_SECONDS, FOLLOW_UP_SECONDS

    pool = small_pool(
        tmp_path, "a", preallocate=False, data={"step": "16MiB", "step_percent": "0%"}
    )
    daemon = started(tmp_path, kernel, {"a": pool})
    clock = daemon.loop._clock
    now = daemon.loop.time()
    daemon._born, daemon._ready_at = now - 5.5, now  # absence after a kill: 14 s
    # used 0, a quiet 10 s begins
    daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    clock.now += 10  # type: ignore[attr-defined]
    to_mark(fake, daemon, "a")  # the writer's first seconds: the event
    daemon.dm_events.check()  # the growth, from a rate over the quiet spell
    first = daemon.pools["a"].pool.table.low_water_mark
    fake.write_blocks("a", 768)  # 32 MiB/s until the follow-up, 1.5 s later at the most
    clock.now += FOLLOW_UP_SECONDS + FOLLOW_UP_BATCH_SECONDS  # type: ignore[attr-defined]
    daemon.loop.run_once(max_wait=0)  # the follow-up check
    daemon.scheduler.finish()
    mark = daemon.pools["a"].pool.table.low_water_mark
    assert mark * 64 * 1024 >= 32 * MiB * 14, (first, mark)


def test_pools_grown_in_one_event_are_followed_up_in_one_pass(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """The check after a growth is work per burst of growths, not per pool: three filling
    pools grown in one event pass are checked again together, in one pass."""
    from tests.engine.test_backing import to_mark
    from thinwatchd.growth.schedule import FOLLOW_UP_BATCH_SECONDS, FOLLOW_UP_SECONDS

    names = ("a", "b", "c")
    data = {"step": "16MiB", "step_percent": "0%"}
    pools = {n: small_pool(tmp_path, n, preallocate=False, data=data) for n in names}
    daemon = started(tmp_path, kernel, pools)
    clock = daemon.loop._clock
    daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
    clock.now += 2  # type: ignore[attr-defined]
    for name in names:
        to_mark(fake, daemon, name)
    daemon.dm_events.check()  # one pass, three growths
    daemon.scheduler.finish()
    assert all(daemon.pools[n].state.last_growth is not None for n in names)
    passes: list[list[str]] = []
    run_pass = daemon.scheduler.run_pass

    def counted(pools: Iterable[ManagedPool], *args: Any, **kw: Any) -> None:
        pools = list(pools)
        passes.append(sorted(m.pool.name for m in pools))
        run_pass(pools, *args, **kw)

    daemon.scheduler.run_pass = counted  # type: ignore[method-assign]
    clock.now += FOLLOW_UP_SECONDS + FOLLOW_UP_BATCH_SECONDS  # type: ignore[attr-defined]
    daemon.loop.run_once(max_wait=0)
    assert passes == [list(names)], passes


def test_a_pool_being_reconciled_at_the_stop_still_gets_its_parting_room(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 10, found in the systemd guest: a growth (or a check) in flight when SIGTERM came
    made the parting pass skip its pool, and that growth had been decided without the parting
    room: the pool then ran out of space while the daemon was away. Now the parting pass comes
    after what is in flight."""
    pool = small_pool(
        tmp_path,
        "a",
        preallocate=False,
        data={"step": "16MiB", "step_percent": "0%", "adaptive_low_water": False},
    )
    daemon = started(tmp_path, kernel, {"a": pool}, ALL_IN_THREADS)
    clock = daemon.loop._clock
    for _ in range(4):  # 10 MiB/s for 4 s, a check each second
        fake.write_blocks("a", 160)
        clock.now += 1  # type: ignore[attr-defined]
        daemon.scheduler.run_pass(list(daemon.pools.values()), survey=True)
        daemon.scheduler.workers.run_until_idle(timeout=PATIENCE)
    released = threading.Event()
    fake.draining["a"] = lambda: released.wait(0.3)  # the growth's resume, still draining
    status = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    fake.write_blocks("a", status.data_free - daemon.pools["a"].pool.table.low_water_mark)
    daemon.dm_events.check()  # a's growth starts, and waits in its drain: SIGTERM comes now
    assert daemon.scheduler.workers.busy("a")
    try:
        daemon.leave_room()
    finally:
        daemon.scheduler.workers.close()
    needed = 10 * MiB * daemon.absence_seconds()
    status = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    assert status.data_free * 64 * 1024 >= needed, (status, needed)
