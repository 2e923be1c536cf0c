"""Cost follows the work (issue 9): what start-up, a safety check and a dm event cost with 1, 10,
100 and 1,000 pools, counted in kernel calls.

FakeKernel.calls records every dm and loop ioctl and every file syscall (FaultySyscalls), so a
count here is what the daemon asks of the real kernel; the fake's loop scan records one
LOOP_GET_STATUS64 per loop, as kernel/loop.py makes one per loop. A 1-pool daemon is the yardstick:
with N pools, a check may cost N times its check, an event on k pools k times its event, each
plus a small constant (SLACK). Besides:

- statvfs once per backing filesystem per pass (every pool here is on tmp_path's), and once more
  after each growth on it (the grown file took space from it);
- the metrics file and STATUS= once per pass, not once per pool (a writeback watch that grows
  several pools before their dirty pages land is one pass too);
- loop devices found through one scan per pass: a restart adopting N pools scans the loops once;
- a check of 1,000 pools well inside systemd's WatchdogSec=30s.

Each size is one daemon (module-scoped) measured once per kind of pass; the tests read those
measurements. The files are made before start-up, sparse: creating 2,000 files with their fsyncs
would time the disk, not the daemon (their creation is tests/engine/test_pool_lifecycle.py's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.scale import Bed, Cost, metrics_writes
from tests.engine.test_growth import FakeUdevDevice
from thinwatchd.base.workers import Workers
from thinwatchd.growth.page_cache import WRITEBACK_WATCH_SECONDS
from thinwatchd.growth.schedule import RECONCILE_THREADS
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.publish.metrics import write_atomically
from thinwatchd.publish.publisher import PUBLISH_SECONDS
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

MiB = 1024**2
SIZES = (1, 10, 100, 1000)
EVENT_SIZES = (1, 10)  # pools a dm event names (those of them a daemon has)
#: Calls a pass may cost beyond N times the 1-pool figure.
SLACK = 8
#: The watchdog is 30 s; a check must leave it most of that.
CHECK_SECONDS = 10.0


@pytest.fixture(scope="module", autouse=True)
def counting_metrics() -> Iterator[None]:
    """Count the metrics file's writes; one worker thread (the beds outlive one_worker's patch)."""
    write = write_atomically

    def counted(path: Path, text: str) -> None:
        metrics_writes[path] += 1
        write(path, text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("thinwatchd.publish.publisher.write_atomically", counted)
        patch.setattr("thinwatchd.base.workers.MAX_THREADS", 1)
        yield


def _bed(tmp_path_factory: pytest.TempPathFactory, n: int, cache: bool = False) -> Iterator[Bed]:
    bed = Bed(tmp_path_factory.mktemp(f"pools{n}-"), n, cache)
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture(scope="module", params=SIZES, ids=lambda n: f"{n}pools")
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    yield from _bed(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """The yardstick: a daemon with one pool."""
    yield from _bed(tmp_path_factory, 1)


# -- a safety check ------------------------------------------------------------------------


def test_a_check_costs_calls_in_proportion_to_the_pools(bed: Bed, one: Bed) -> None:
    limit = len(one.check.calls) * bed.n + SLACK
    assert len(bed.check.calls) <= limit, bed.check.summary()


def test_a_check_looks_at_the_filesystem_once(bed: Bed) -> None:
    assert bed.check.count("statvfs") == 1, bed.check.summary()


def test_a_check_writes_metrics_and_status_once(bed: Bed) -> None:
    assert (bed.check.metrics_writes, bed.check.statuses) == (1, 1)


def test_a_check_finishes_well_inside_the_watchdog(bed: Bed) -> None:
    assert bed.check.seconds < CHECK_SECONDS, bed.check.summary()


def test_a_check_in_the_daemons_threads_costs_the_same(bed: Bed) -> None:
    """The check above, its reconciles in the daemon's own threads as it runs them (the other
    tests run them inline, for exact counts): the same calls, one publication, in time."""
    d, inline = bed.daemon, bed.daemon.scheduler.workers
    inline_calls = len(bed.check.calls)
    d.scheduler.workers = Workers(d.loop, max_threads=RECONCILE_THREADS)
    try:

        def check_threaded() -> None:
            bed._check()
            d.scheduler.workers.run_until_idle(CHECK_SECONDS)

        cost = bed.measure(check_threaded)
    finally:
        d.scheduler.workers.close()
        d.scheduler.workers = inline
    assert len(cost.calls) == inline_calls, cost.summary()
    assert (cost.metrics_writes, cost.statuses) == (1, 1)
    assert cost.seconds < CHECK_SECONDS, cost.summary()


# -- a dm event ----------------------------------------------------------------------------


def test_an_event_costs_calls_in_proportion_to_the_pools_it_names(bed: Bed, one: Bed) -> None:
    for k in (k for k in EVENT_SIZES if k <= bed.n):
        cost = bed.event(k)
        limit = len(one.event(1).calls) * k + SLACK
        assert len(cost.calls) <= limit, f"{k} of {bed.n} pools: {cost.summary()}"


def test_an_event_looks_at_the_filesystem_once_and_after_each_growth(bed: Bed) -> None:
    for k in (k for k in EVENT_SIZES if k <= bed.n):
        cost = bed.event(k)
        assert cost.count("statvfs") <= 1 + k, f"{k} of {bed.n} pools: {cost.summary()}"


def test_an_event_writes_metrics_and_status_once(bed: Bed) -> None:
    for k in (k for k in EVENT_SIZES if k <= bed.n):
        cost = bed.event(k)
        assert (cost.metrics_writes, cost.statuses) == (1, 1), f"{k} of {bed.n} pools"


# -- start-up and restart ------------------------------------------------------------------


def test_start_up_costs_calls_in_proportion_to_the_pools(bed: Bed, one: Bed) -> None:
    limit = len(one.started.calls) * bed.n + SLACK
    assert len(bed.started.calls) <= limit, bed.started.summary()


def test_a_restart_finds_every_loop_through_one_scan(bed: Bed, one: Bed) -> None:
    """Adopting N running pools: one LOOP_GET_STATUS64 per loop, not per loop and lookup."""
    assert bed.adopted.count("LOOP_GET_STATUS64") <= 2 * bed.n, bed.adopted.summary()
    limit = len(one.adopted.calls) * bed.n + SLACK
    assert len(bed.adopted.calls) <= limit, bed.adopted.summary()


# -- udev events ---------------------------------------------------------------------------


class OneUdevEvent:
    """A udev monitor with one event to read (as pyudev.Monitor.poll(timeout=0) gives it)."""

    def __init__(self, device: FakeUdevDevice) -> None:
        self.device: FakeUdevDevice | None = device

    def poll(self, timeout: float = 0) -> FakeUdevDevice | None:
        device, self.device = self.device, None
        return device


def udev_event(bed: Bed, action: str, node: str) -> Cost:
    bed.daemon.udev_monitor = OneUdevEvent(FakeUdevDevice(action, node))
    return bed.measure(bed.daemon._on_udev)


def test_a_change_of_a_pool_loop_costs_the_same_with_any_number_of_pools(
    bed: Bed, one: Bed
) -> None:
    """Each growth's LOOP_SET_CAPACITY (and each attach at start-up) sends a udev "change" of
    the loop: checking it must not scan every loop or walk every pool (with 200 pools that was
    47 s of CPU after READY=1)."""
    node = bed.daemon.pools[bed.names[-1]].pool.data_loop.path
    cost = udev_event(bed, "change", node)
    yardstick = udev_event(one, "change", one.daemon.pools[one.names[0]].pool.data_loop.path)
    assert len(cost.calls) == len(yardstick.calls) <= 2, cost.summary()
    assert cost.count("LOOP_GET_STATUS64") == 0, cost.summary()


def test_a_change_of_another_device_costs_nothing(bed: Bed) -> None:
    assert udev_event(bed, "change", "/dev/sda1").calls == []


# -- the writeback watch -------------------------------------------------------------------


@pytest.fixture
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """10 pools watched with a page cache: each grows to twice the mark that holds the dirty
    limit (tens of MiB, sparse)."""
    yield from _bed(tmp_path_factory, 10, cache=True)


def test_a_writeback_watch_growing_several_pools_is_one_pass(cached: Bed) -> None:
    """Dirty pages that threaten every pool at once: each grows before they land, in one pass."""
    bed, cache = cached, cached.cache
    assert cache is not None
    bed.daemon._schedule_writeback_watch()
    status = parse_pool_status(bed.fake.status(bed.names[0])[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    mark = bed.daemon.pools[bed.names[0]].pool.table.low_water_mark
    cache.dirty((status.data_free - mark) * 64 * 1024 + MiB)  # a cp, all of it still dirty
    grown = {name: bed.daemon.pools[name].state.growths[GrowthTarget.DATA] for name in bed.names}

    def watch() -> None:
        bed.clock.now += WRITEBACK_WATCH_SECONDS
        bed.daemon.loop.run_once(max_wait=0)
        bed.clock.now += PUBLISH_SECONDS  # the pass's publication, due by then
        bed.daemon.loop.run_once(max_wait=0)

    cost = bed.measure(watch)
    for name in bed.names:
        assert bed.daemon.pools[name].state.growths[GrowthTarget.DATA] == grown[name] + 1, name
    assert (cost.metrics_writes, cost.statuses) == (1, 1), cost.summary()
    assert cost.count("statvfs") <= 1 + bed.n, cost.summary()


@pytest.fixture
def hundred(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    yield from _bed(tmp_path_factory, 100)


def test_passes_in_quick_succession_publish_once_a_second_with_the_last_state(
    hundred: Bed,
) -> None:
    """Ten pools reaching their marks 10 ms apart, each grown in a pass of its own: STATUS= and
    the metrics file (O(pools) each) are written for the first pass, then once when
    PUBLISH_SECONDS have passed, with every growth in them; not ten times."""
    bed = hundred
    bed.clock.now += PUBLISH_SECONDS  # the last publication is old
    names = bed.names[:10]

    def growths() -> None:
        for name in names:
            status = parse_pool_status(bed.fake.status(name)[0].params)
            assert isinstance(status, ThinPoolWorkingStatus)
            bed.fake.write_blocks(
                name, status.data_free - bed.daemon.pools[name].pool.table.low_water_mark
            )
            bed.clock.now += 0.01
            bed.daemon.dm_events.check()

    passes = bed.measure(growths)
    assert (passes.metrics_writes, passes.statuses) == (1, 1), passes.summary()
    assert all(bed.daemon.pools[n].state.growths[GrowthTarget.DATA] == 1 for n in names)
    bed.clock.now += PUBLISH_SECONDS
    later = bed.measure(lambda: bed.daemon.loop.run_once(max_wait=0))
    assert (later.metrics_writes, later.statuses) == (1, 1), later.summary()
    metrics = bed.metrics.read_text()
    for name in names:
        status = parse_pool_status(bed.fake.status(name)[0].params)
        assert isinstance(status, ThinPoolWorkingStatus)
        total = status.data_total * 64 * 1024
        assert f'thinwatchd_data_total_bytes{{pool="{name}"}} {total}' in metrics, name
