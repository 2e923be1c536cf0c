"""A filesystem writing through the page cache: marks sized from the dirty limit, pools grown
while the burst is still dirty, on the fake kernel's page cache (FakePageCache).

The same behaviour on the real kernel, with ext4 and xfs: tests/kernel/test_writeback.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel, FakeNodes, FakePageCache
from testbed.workers import INLINE
from tests.engine.test_growth import status, write_config
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.notify import Notifier
from thinwatchd.daemon.daemon import Daemon
from thinwatchd.growth.page_cache import WRITEBACK_WATCH_SECONDS
from thinwatchd.growth.state import Topic
from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.policy.decide import GrowthTarget

MiB = 1024**2
BLOCK = 64 * 1024
LIMIT = 256 * MiB  # the dirty limit: a 1.5 GiB host at vm.dirty_ratio 20
OUT_OF_SPACE = "switching pool to out-of-data-space"
LOW_WATER = "reached low water mark"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(fake: FakeKernel) -> FakePageCache:
    return FakePageCache(fake, dirty_limit=LIMIT)


@pytest.fixture
def wb_daemon(
    tmp_path: Path, fake: FakeKernel, cache: FakePageCache, clock: Clock
) -> Iterator[Daemon]:
    """The tight config (mark 16 blocks, 128 MiB steps) with the page cache watched."""
    kernel = Kernel(fake, fake, FakeNodes(), Files(fake.syscalls), memory=cache)
    config = write_config(
        tmp_path / "config.yaml", tmp_path, data={"step": "128MiB", "step_percent": "0%"}
    )
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    d._schedule_writeback_watch()
    yield d


def tick(daemon: Daemon, clock: Clock, seconds: float = WRITEBACK_WATCH_SECONDS) -> None:
    """Let time pass: the watch timer samples the page cache; a dm event is read."""
    clock.now += seconds
    daemon.loop.run_once(max_wait=0)
    fake = daemon.kernel.dm
    assert isinstance(fake, FakeKernel)
    if fake.events_pending():
        daemon.dm_events.check()


def free_bytes(fake: FakeKernel) -> int:
    st = status(fake)
    return (st.data_total - st.data_used) * BLOCK


def test_the_first_mark_holds_the_dirty_limit(fake: FakeKernel, wb_daemon: Daemon) -> None:
    """No growth measured yet: from start-up on, the mark and the free space cover a burst of
    the whole dirty limit (the configured 16 blocks would be 1 MiB)."""
    table_mark = wb_daemon.pools["pool"].pool.table.low_water_mark * BLOCK
    assert table_mark >= LIMIT * 9 // 8
    assert free_bytes(fake) >= 2 * LIMIT


def test_dirty_pages_grow_the_pool_before_they_are_written_back(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    """cp then sync: the growth comes while the data is dirty, none when the sync lands it."""
    managed = wb_daemon.pools["pool"]
    before = managed.state.growths[GrowthTarget.DATA]
    total = 0
    while total < 3 * free_bytes(fake):
        cache.dirty(16 * MiB)  # the page cache absorbs a cp at memory speed
        total += 16 * MiB
        tick(wb_daemon, clock)
        if cache.dirty_bytes >= LIMIT // 2:  # background writeback starts
            cache.write_back("pool")
            tick(wb_daemon, clock, 0.0)
    grown_while_dirty = managed.state.growths[GrowthTarget.DATA] - before
    assert grown_while_dirty >= 1
    events_before_sync = sum(LOW_WATER in line for line in fake.kernel_log)
    cache.dirty(LIMIT // 2)
    tick(wb_daemon, clock)
    cache.write_back("pool")  # sync
    tick(wb_daemon, clock, 0.0)
    assert not any(OUT_OF_SPACE in line for line in fake.kernel_log)
    assert sum(LOW_WATER in line for line in fake.kernel_log) == events_before_sync
    assert status(fake).data_used * BLOCK == total + LIMIT // 2


def test_early_growths_say_why(
    fake: FakeKernel,
    cache: FakePageCache,
    wb_daemon: Daemon,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="thinwatchd")
    mark = wb_daemon.pools["pool"].pool.table.low_water_mark * BLOCK
    cache.dirty(free_bytes(fake) - mark - 8 * MiB)
    cache.write_back("pool")
    cache.dirty(16 * MiB)
    tick(wb_daemon, clock)
    grown = [r for r in caplog.records if "dirty or under writeback" in r.getMessage()]
    assert len(grown) == 1, [r.getMessage() for r in caplog.records]
    fields = grown[0].journal_fields  # type: ignore[attr-defined]
    assert fields["DIRTY_BYTES"] == str(16 * MiB) and fields["WRITEBACK_BYTES"] == "0"
    decided = [
        r.getMessage() for r in caplog.records if "growth decided with Dirty" in r.getMessage()
    ]
    assert decided and f"Dirty {16 * MiB}, Writeback 0 bytes" in decided[0]


def test_an_idle_page_cache_costs_no_pool_syscall(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    """One sample of two procfs files per tick for all pools, and no dm ioctl while nothing
    dirty threatens a pool."""
    cache.dirty(8 * MiB)
    fake.calls.clear()
    reads = cache.reads
    for _ in range(50):
        tick(wb_daemon, clock)
    assert cache.reads - reads == 50
    assert [c for c in fake.calls if not c.startswith("open /proc/")] == []


def test_writeback_landed_since_the_last_status_counts(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    """Free space is known from the last status read less everything written back since: a
    burst that landed unseen (no dm event yet: it stayed above the mark) still counts."""
    managed = wb_daemon.pools["pool"]
    mark = managed.pool.table.low_water_mark * BLOCK
    landed = free_bytes(fake) - mark - 8 * MiB  # leaves 8 MiB above the kernel's mark
    cache.dirty(landed)
    cache.write_back("pool")
    assert not fake.events_pending()
    before = managed.state.growths[GrowthTarget.DATA]
    cache.dirty(16 * MiB)  # now 16 MiB dirty would cross the mark
    tick(wb_daemon, clock)
    assert managed.state.growths[GrowthTarget.DATA] == before + 1


def test_unreadable_counters_are_said_once_and_the_configured_mark_applies(
    tmp_path: Path,
    fake: FakeKernel,
    cache: FakePageCache,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="thinwatchd")
    fake.fail("open", 13, target="/proc/meminfo", times=None)  # EACCES: ProcSubset=pid
    kernel = Kernel(fake, fake, FakeNodes(), Files(fake.syscalls), memory=cache)
    d = Daemon(
        write_config(tmp_path / "c.yaml", tmp_path),
        kernel,
        notifier=Notifier(),
        loop=EventLoop(clock),
        threads=INLINE,
    )
    d.start()
    d._schedule_writeback_watch()
    d._schedule_check()
    for _ in range(20):
        tick(d, clock)
    said = [r for r in caplog.records if "dirty counters" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    # The configured mark (16 blocks) raised only by the threshold (80%), not by writeback.
    assert d.pools["pool"].pool.table.low_water_mark * BLOCK < 64 * MiB
    fake.faults.clear()
    tick(d, clock, 10.0)  # the safety check reads them again
    assert d.pools["pool"].pool.table.low_water_mark * BLOCK >= LIMIT
    assert any("read again" in r.getMessage() for r in caplog.records)


def test_a_pool_at_its_cap_is_not_checked_at_every_tick(
    tmp_path: Path, fake: FakeKernel, cache: FakePageCache, clock: Clock
) -> None:
    kernel = Kernel(fake, fake, FakeNodes(), Files(fake.syscalls), memory=cache)
    config = write_config(tmp_path / "c.yaml", tmp_path, data={"max_size": "64MiB"})
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    d._schedule_writeback_watch()
    cache.dirty(LIMIT)
    tick(d, clock)  # the first tick may look (the refusal is recorded by then)
    fake.calls.clear()
    for _ in range(20):
        tick(d, clock)
    assert [c for c in fake.calls if not c.startswith("open /proc/")] == []


def test_an_early_growth_waits_for_a_lull_in_writeback(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    """A growth while much is in flight waits for it all (the pool's suspend drains the
    worker's backlog): an early growth waits for a tick with little under writeback. Without
    one, the kernel's event at the mark grows the pool regardless."""
    managed = wb_daemon.pools["pool"]
    mark = managed.pool.table.low_water_mark * BLOCK
    cache.dirty(free_bytes(fake) - mark - 8 * MiB)
    cache.write_back("pool")
    before = managed.state.growths[GrowthTarget.DATA]
    cache.dirty(64 * MiB)
    cache.start_writeback(48 * MiB)  # 48 MiB in flight, 16 MiB still dirty
    for _ in range(5):
        tick(wb_daemon, clock)
    assert managed.state.growths[GrowthTarget.DATA] == before
    cache.write_back("pool", 48 * MiB)  # lands: 40 MiB below the mark
    assert fake.events_pending()
    tick(wb_daemon, clock)
    assert managed.state.growths[GrowthTarget.DATA] == before + 1
    assert not any(OUT_OF_SPACE in line for line in fake.kernel_log)


def test_a_lull_lets_the_early_growth_go(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    managed = wb_daemon.pools["pool"]
    mark = managed.pool.table.low_water_mark * BLOCK
    cache.dirty(free_bytes(fake) - mark - 64 * MiB)
    cache.write_back("pool")
    before = managed.state.growths[GrowthTarget.DATA]
    cache.dirty(80 * MiB)  # would take the pool 16 MiB below its mark
    cache.start_writeback(40 * MiB)
    tick(wb_daemon, clock)
    assert managed.state.growths[GrowthTarget.DATA] == before  # 40 MiB in flight: wait
    cache.write_back("pool", 30 * MiB)  # 34 MiB above the mark, 50 MiB pending, 10 in flight
    assert not fake.events_pending()
    tick(wb_daemon, clock)
    assert managed.state.growths[GrowthTarget.DATA] == before + 1
    assert sum(LOW_WATER in line for line in fake.kernel_log) == 0


def test_a_pool_an_operator_suspended_is_not_checked_at_every_tick(
    fake: FakeKernel, cache: FakePageCache, wb_daemon: Daemon, clock: Clock
) -> None:
    managed = wb_daemon.pools["pool"]
    fake.suspend("pool")  # dmsetup suspend
    wb_daemon.scheduler.run_pass([managed])  # a check notices the suspend and says it once
    assert Topic.SUSPENDED in managed.state.said
    cache.dirty(free_bytes(fake))  # would threaten it
    fake.calls.clear()
    for _ in range(10):
        tick(wb_daemon, clock)
    assert [c for c in fake.calls if not c.startswith("open /proc/")] == []
    info = fake.info("pool")
    assert info is not None and info.suspended  # left as it was
