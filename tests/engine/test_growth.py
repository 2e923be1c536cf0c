"""Growth against the fake kernel: the daemon's reaction to events, refusals, failures, reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel
from testbed.workers import INLINE
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.logs import MessageId
from thinwatchd.base.notify import Notifier
from thinwatchd.daemon.daemon import Daemon
from thinwatchd.growth.state import Topic
from thinwatchd.kernel.api import Kernel
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.thin.status import ThinPoolWorkingStatus

MiB = 1024**2
BLOCK = 64 * 1024


def write_config(
    path: Path, tmp: Path, daemon: dict[str, object] | None = None, **overrides: object
) -> Path:
    """Write a one-pool config: a small pool, with overrides of its keys."""
    pool: dict[str, object] = {
        "data_file": f"{tmp}/data",
        "metadata_file": f"{tmp}/metadata",
        "data_size": "64MiB",
        "metadata_size": "8MiB",
        "low_water_mark": 16,
        "reserve": 0,
    }
    pool.update(overrides)
    daemon_keys: dict[str, object] = {"check_interval": "10s", **(daemon or {})}
    path.write_text(yaml.safe_dump({"daemon": daemon_keys, "pools": {"pool": pool}}))
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def daemon(tmp_path: Path, kernel: Kernel, clock: Clock) -> Daemon:
    config = write_config(tmp_path / "config.yaml", tmp_path)
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    return d


def fill(
    fake: FakeKernel, daemon: Daemon, clock: Clock, total_blocks: int, chunk: int = 16
) -> None:
    """Write like a steady writer: a chunk, then let the daemon react to any event."""
    written = 0
    while written < total_blocks:
        written += fake.write_blocks("pool", chunk)
        clock.now += 0.01
        if fake.events_pending():
            daemon.dm_events.check()


def status(fake: FakeKernel) -> ThinPoolWorkingStatus:
    st = daemon_pool_status(fake)
    assert isinstance(st, ThinPoolWorkingStatus)
    return st


def daemon_pool_status(fake: FakeKernel) -> object:
    from thinwatchd.thin.status import parse_pool_status

    return parse_pool_status(fake.status("pool")[0].params)


def test_writer_never_runs_out_of_space(
    fake: FakeKernel, daemon: Daemon, clock: Clock, tmp_path: Path
) -> None:
    fill(fake, daemon, clock, 600 * MiB // BLOCK)
    st = status(fake)
    assert not any("out-of-data-space" in line for line in fake.kernel_log)
    assert st.data_used == 600 * MiB // BLOCK
    assert os.stat(tmp_path / "data").st_size >= 600 * MiB
    assert st.data_total * BLOCK == os.stat(tmp_path / "data").st_size  # table length = file size
    growths = daemon.pools["pool"].state.growths[GrowthTarget.DATA]
    assert 1 <= growths <= 8  # few, large growths


def test_low_water_event_fires_once_per_resume(fake: FakeKernel, daemon: Daemon) -> None:
    before = fake.devices["pool"].event_nr
    total = status(fake).data_total
    fake.write_blocks("pool", total - 10)  # far below the mark: one event only
    assert fake.devices["pool"].event_nr == before + 1


def test_growth_is_logged_with_fields(
    fake: FakeKernel, daemon: Daemon, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="thinwatchd"):
        fill(fake, daemon, clock, 60 * MiB // BLOCK)
    grown = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.DATA_GROWN
    ]
    assert grown
    fields = grown[0].journal_fields  # type: ignore[attr-defined]
    for key in (
        "POOL",
        "OLD_SIZE_BYTES",
        "NEW_SIZE_BYTES",
        "GROWTH_MS",
        "DATA_USED_BYTES",
        "POOL_MODE",
    ):
        assert key in fields
    assert int(fields["NEW_SIZE_BYTES"]) > int(fields["OLD_SIZE_BYTES"])


def test_cap_refuses_once_and_switches_to_error_after_grace(
    tmp_path: Path, kernel: Kernel, fake: FakeKernel, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(
        tmp_path / "c.yaml", tmp_path, data={"max_size": "64MiB"}, when_full={"error_after": "30s"}
    )
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    with caplog.at_level(logging.INFO, logger="thinwatchd"):
        d.start()
        fill(fake, d, clock, 60 * MiB // BLOCK)
        for _ in range(3):
            d.scheduler.run_pass([d.pools["pool"]])
    refused = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.GROWTH_REFUSED
    ]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "limit" in refused[0].getMessage()
    assert status(fake).no_space_policy.value == "queue_if_no_space"
    clock.now += 31
    d.scheduler.run_pass([d.pools["pool"]])
    assert status(fake).no_space_policy.value == "error_if_no_space"
    assert os.stat(tmp_path / "data").st_size == 64 * MiB  # never past max_size


def test_metrics_say_when_growth_is_refused_and_the_cap(
    tmp_path: Path, kernel: Kernel, fake: FakeKernel, clock: Clock
) -> None:
    """What the shipped alert rules (monitoring/) watch: the cap, and a refused growth."""
    config = write_config(
        tmp_path / "c.yaml",
        tmp_path,
        daemon={"metrics_file": f"{tmp_path}/m.prom"},
        data={"max_size": "128MiB"},
    )
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    refused = 'thinwatchd_growth_refused{pool="pool",target="data"}'
    assert f"{refused} 0" in (tmp_path / "m.prom").read_text()
    fill(fake, d, clock, 120 * MiB // BLOCK)  # past the mark of the capped 128 MiB
    d.scheduler.run_pass([d.pools["pool"]])
    d.publications.flush()  # what the pass publishes, at once (not up to PUBLISH_SECONDS later)
    metrics = (tmp_path / "m.prom").read_text()
    assert f"{refused} 1" in metrics
    assert 'thinwatchd_growth_refused{pool="pool",target="metadata"} 0' in metrics
    assert f'thinwatchd_data_max_bytes{{pool="pool"}} {128 * MiB}' in metrics


def test_failed_resume_leaves_pool_resumed_on_old_size(
    fake: FakeKernel, daemon: Daemon, clock: Clock, tmp_path: Path
) -> None:
    fake.fail_next["DM_DEV_RESUME"] = 5
    total = status(fake).data_total
    fake.write_blocks("pool", total - 8)
    daemon.dm_events.check()
    info = fake.info("pool")
    assert info is not None and not info.suspended and not info.inactive_present
    assert daemon.pools["pool"].state.failures == 1
    # the file grew and the loop too; a retry within the backoff does nothing...
    loads = fake.calls.count("DM_TABLE_LOAD pool")
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert fake.calls.count("DM_TABLE_LOAD pool") == loads
    # ...and the retry after it finishes the job
    clock.now += 1
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert status(fake).data_total > total


def test_needs_check_refuses_growth(fake: FakeKernel, daemon: Daemon) -> None:
    meta = fake.devices["pool"].pool
    assert meta is not None
    meta.metadata.needs_check = True
    total = status(fake).data_total
    fake.write_blocks("pool", total - 8)
    daemon.dm_events.check()
    assert status(fake).data_total == total
    assert daemon.pools["pool"].state.said.get(Topic.DATA_REFUSED) == "needs_check"
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert daemon.pools["pool"].state.said.get(Topic.DATA_REFUSED) == "needs_check"  # logged once


def test_metadata_grows_when_it_runs_low(
    tmp_path: Path, kernel: Kernel, fake: FakeKernel, clock: Clock
) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path, metadata_size="2MiB", data_size="4GiB")
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    fill(fake, d, clock, 30000, chunk=64)  # the fake costs 1 metadata block per 64 data blocks
    assert os.stat(tmp_path / "metadata").st_size > 2 * MiB
    assert d.pools["pool"].state.growths[GrowthTarget.METADATA] >= 1


def test_reload_applies_new_step_and_survives_a_broken_file(
    tmp_path: Path, daemon: Daemon, fake: FakeKernel, clock: Clock
) -> None:
    config = daemon.config_path
    write_config(config, tmp_path, data={"step": "3GiB", "step_percent": "0%"}, low_water_mark=1)
    daemon.reload()
    assert daemon.pools["pool"].pool.settings.data.step == 3 * 1024**3
    config.write_text(config.read_text().replace("3GiB", "3 gigs"))
    daemon.reload()
    assert daemon.config_error is not None and "pools.pool.data.step" in daemon.config_error
    assert "config rejected" in daemon.summary_line()
    fill(fake, daemon, clock, 60 * MiB // BLOCK)
    assert os.stat(tmp_path / "data").st_size >= 64 * MiB + 3 * 1024**3  # the old (valid) policy


def test_pool_removed_behind_our_back_is_rebuilt(fake: FakeKernel, daemon: Daemon) -> None:
    fake.write_blocks("pool", 10)
    state = daemon.pools["pool"].state
    fake.remove("pool")
    daemon.dm_events.check()
    daemon.workers.run_until_idle()  # the rebuild runs in a worker thread
    assert "pool" in fake.devices
    assert daemon.pools["pool"].state is state  # its history and counters survive
    st = status(fake)
    assert st.data_used == 10  # rebuilt over the same metadata: nothing lost


def test_event_loop_wakes_on_the_control_fd(fake: FakeKernel, daemon: Daemon, clock: Clock) -> None:
    loop = daemon.loop
    loop.add_reader(fake.fileno(), daemon.dm_events.check)
    total = status(fake).data_total
    fake.write_blocks("pool", total - 8)
    loop.run_once(max_wait=1.0)
    assert status(fake).data_total > total


def test_metrics_file_agrees_with_the_kernel(
    tmp_path: Path, kernel: Kernel, fake: FakeKernel, clock: Clock
) -> None:
    config = write_config(
        tmp_path / "c.yaml", tmp_path, daemon={"metrics_file": f"{tmp_path}/m.prom"}
    )
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    fill(fake, d, clock, 60 * MiB // BLOCK)
    d.scheduler.run_pass([d.pools["pool"]])  # what the safety timer does
    d.publications.flush()
    metrics = (tmp_path / "m.prom").read_text()
    st = status(fake)
    assert f'thinwatchd_data_used_bytes{{pool="pool"}} {st.data_used * BLOCK}' in metrics
    assert f'thinwatchd_data_total_bytes{{pool="pool"}} {st.data_total * BLOCK}' in metrics
    assert 'thinwatchd_pool_mode{pool="pool",mode="rw"} 1' in metrics
    assert 'thinwatchd_growths_total{pool="pool",target="data"} 1' in metrics
    assert metrics.count("# TYPE thinwatchd_pool_mode gauge") == 1


class FakeUdevDevice(dict[str, str]):
    def __init__(self, action: str, node: str | None = None, **props: str) -> None:
        super().__init__(props)
        self.action = action
        self.device_node = node


class FakeMonitor:
    """A selectable stand-in for pyudev.Monitor (os.pipe behind fileno, like pyudev's tests)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.queue: list[FakeUdevDevice] = []

    def fileno(self) -> int:
        return self.r

    def send(self, device: FakeUdevDevice) -> None:
        self.queue.append(device)
        os.write(self.w, b"!")

    def poll(self, timeout: float = 0) -> FakeUdevDevice | None:
        if not self.queue:
            return None
        os.read(self.r, 1)
        return self.queue.pop(0)


@pytest.fixture
def watched(tmp_path: Path, kernel: Kernel, clock: Clock) -> tuple[Daemon, FakeMonitor]:
    """A started daemon whose loop also watches a fake udev monitor."""
    monitor = FakeMonitor()
    config = write_config(tmp_path / "c.yaml", tmp_path)
    d = Daemon(
        config,
        kernel,
        notifier=Notifier(),
        loop=EventLoop(clock),
        udev_monitor=monitor,
        threads=INLINE,
    )
    d.start()
    d.loop.add_reader(monitor.fileno(), d._on_udev)
    return d, monitor


def test_udev_remove_of_the_pool_rebuilds_it(
    watched: tuple[Daemon, FakeMonitor], fake: FakeKernel
) -> None:
    d, monitor = watched
    fake.write_blocks("pool", 7)
    fake.remove("pool")
    monitor.send(FakeUdevDevice("remove", "/dev/dm-0", DM_NAME="pool"))
    d.loop.run_once(max_wait=1)
    d.workers.run_until_idle()
    assert status(fake).data_used == 7


def test_udev_change_of_our_own_growth_does_no_work(
    watched: tuple[Daemon, FakeMonitor], fake: FakeKernel
) -> None:
    d, monitor = watched
    fake.calls.clear()
    monitor.send(FakeUdevDevice("change", "/dev/dm-0", DM_NAME="pool", RESIZE="1"))
    d.loop.run_once(max_wait=1)
    assert fake.calls == []


def test_udev_change_of_a_loop_that_still_backs_its_file_is_two_calls(
    watched: tuple[Daemon, FakeMonitor], fake: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    d, monitor = watched
    loop = d.pools["pool"].pool.data_loop
    fake.calls.clear()
    monitor.send(FakeUdevDevice("change", loop.path))  # our growth's LOOP_SET_CAPACITY
    d.loop.run_once(max_wait=1)
    assert [c.split()[0] for c in fake.calls] == ["BLKGETSIZE64", "lstat"], fake.calls
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("how", ["detached", "rebound", "file replaced"])
def test_udev_change_of_a_loop_that_no_longer_backs_its_file_is_said(
    watched: tuple[Daemon, FakeMonitor],
    fake: FakeKernel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    d, monitor = watched
    pool = d.pools["pool"].pool
    loop, path = pool.data_loop, pool.settings.data_file
    if how == "file replaced":  # the loop keeps the old inode; the path names a new one
        path.rename(tmp_path / "old-data")
        path.write_bytes(b"")
    else:
        fake.detach(loop)
        if how == "rebound":  # someone else's file on the same loop number
            other = tmp_path / "other"
            other.write_bytes(b"")
            assert fake.attach(str(other)).index == loop.index
    monitor.send(FakeUdevDevice("change", loop.path))
    d.loop.run_once(max_wait=1)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert said == [
        f"pool pool: {loop.path} no longer backs {path} (detached or replaced by someone "
        "else); the pool keeps its device open, but growth will fail until restart"
    ]


def test_start_reconciles_each_pool_once(
    tmp_path: Path, kernel: Kernel, fake: FakeKernel, clock: Clock
) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path)
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    d.start()
    # one status read to log the activation, one for the reconcile
    assert fake.calls.count("DM_TABLE_STATUS pool") == 2, fake.calls
