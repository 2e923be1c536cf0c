"""A host that is not ours alone: pools changed behind our back, files that are not what the
config says, a backing filesystem running out. Against the fake kernel, with real files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel
from testbed.workers import INLINE
from tests.engine.test_growth import status, write_config
from thinwatchd.base.errors import PoolSetupError
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.logs import MessageId
from thinwatchd.base.notify import Notifier
from thinwatchd.base.units import Bytes, Sectors
from thinwatchd.config.settings import PoolSettings
from thinwatchd.daemon.daemon import Daemon
from thinwatchd.kernel.api import FsSpace, Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.pool.bring_up import activate

MiB = 1024**2
BLOCK = 64 * 1024


def message_ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        getattr(r, "journal_fields", {}).get("MESSAGE_ID", "")
        for r in caplog.records
        if getattr(r, "journal_fields", None)
    ]


def start(tmp_path: Path, kernel: Kernel, clock: Clock, **pool: Any) -> Daemon:
    config = write_config(tmp_path / "config.yaml", tmp_path, **pool)
    daemon = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(clock), threads=INLINE)
    daemon.start()
    return daemon


# -- someone else changes the pool ---------------------------------------------------------


def test_a_pool_grown_by_hand_is_adopted_and_never_shrunk(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    daemon = start(tmp_path, kernel, clock)
    pool = daemon.pools["pool"].pool
    cached = pool.length
    # The old Docker docs' manual growth: truncate, losetup -c, dmsetup reload, dmsetup resume.
    os.truncate(tmp_path / "data", 4 * 64 * MiB)
    fake.set_capacity(pool.data_loop)
    fake.load_table("pool", [pool.target(Sectors(3 * cached))])
    fake.resume("pool")
    # A writer then reaches the (new) mark: the daemon's growth must build on 3x, not on 1x.
    fill_to = status(fake).data_total - 8
    fake.write_blocks("pool", fill_to)
    daemon.dm_events.check()
    info = fake.info("pool")
    assert info is not None and not info.suspended and not info.inactive_present
    assert status(fake).data_total * 128 >= 4 * cached  # grown past the manual length
    assert MessageId.CHANGED_OUTSIDE in message_ids(caplog)
    assert MessageId.GROWTH_FAILED not in message_ids(caplog)


def test_a_retune_after_a_manual_grow_does_not_suspend_the_pool(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """The bug as found: any reload (here: the when_full switch) from the cached length."""
    clock = Clock()
    daemon = start(
        tmp_path, kernel, clock, data={"max_size": "64MiB"}, when_full={"error_after": "5s"}
    )
    pool = daemon.pools["pool"].pool
    os.truncate(tmp_path / "data", 2 * 64 * MiB)
    fake.set_capacity(pool.data_loop)
    fake.load_table("pool", [pool.target(Sectors(2 * pool.length))])
    fake.resume("pool")
    fake.write_blocks("pool", status(fake).data_total)  # full; growth refused by max_size
    daemon.dm_events.check()
    clock.now += 6
    daemon.scheduler.run_pass([daemon.pools["pool"]])  # when_full: reload with error_if_no_space
    info = fake.info("pool")
    assert info is not None and not info.suspended
    assert fake.table("pool")[0].length == 2 * 64 * MiB // 512
    assert status(fake).no_space_policy.value == "error_if_no_space"


def test_a_pool_left_suspended_with_a_short_table_is_resumed_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    fake.write_blocks("pool", 10)
    fake.load_table("pool", [pool.target(Sectors(pool.length // 2))])
    with pytest.raises(Exception, match="too small"):
        fake.resume("pool")
    info = fake.info("pool")
    assert info is not None and info.suspended  # what a stale reload left: writers hang
    again = activate(pool_settings, kernel)
    info = fake.info("pool")
    assert info is not None and not info.suspended
    assert again.length == pool.length and fake.table("pool")[0].length == pool.length
    assert any("suspended" in note for note in again.recovered)


def test_a_table_less_device_left_by_our_creation_is_rebuilt(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    fake.create("pool")  # a crash right after DM_DEV_CREATE
    pool = activate(pool_settings, kernel)
    info = fake.info("pool")
    assert info is not None and info.active_present and not info.suspended
    assert pool.length == 64 * MiB // 512


# -- files that are not what the config says -----------------------------------------------


def test_missing_parent_directories_are_created_private(
    kernel: Kernel, pool_settings: PoolSettings, tmp_path: Path
) -> None:
    from dataclasses import replace

    settings = replace(
        pool_settings,
        data_file=tmp_path / "var" / "lib" / "pool" / "data",
        metadata_file=tmp_path / "var" / "lib" / "pool" / "metadata",
    )
    activate(settings, kernel)
    assert (tmp_path / "var" / "lib" / "pool" / "data").stat().st_size == 64 * MiB
    for directory in ("var", "var/lib", "var/lib/pool"):
        assert (tmp_path / directory).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_file_writable_by_others_is_refused(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings, mode: int
) -> None:
    activate(pool_settings, kernel)
    fake.remove("pool")
    os.chmod(pool_settings.data_file, mode)
    with pytest.raises(PoolSetupError) as caught:
        activate(pool_settings, kernel)
    text = str(caught.value)
    assert "pools.pool.data_file" in text and f"{mode:04o}" in text and "chmod go-w" in text
    assert "\n" not in text


def test_a_file_owned_by_someone_else_is_refused(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    activate(pool_settings, kernel)
    fake.remove("pool")
    os.chown(pool_settings.metadata_file, 65534, 65534)
    with pytest.raises(PoolSetupError, match=r"pools\.pool\.metadata_file.*uid 65534"):
        activate(pool_settings, kernel)


def test_one_file_under_two_spellings_is_refused(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """A symlinked directory makes two paths of one file: one loop would be data and metadata."""
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "pool").write_bytes(b"")
    os.truncate(tmp_path / "real" / "pool", 64 * MiB)
    config = write_config(
        tmp_path / "config.yaml",
        tmp_path,
        data_file=str(tmp_path / "real" / "pool"),
        metadata_file=str(tmp_path / "alias" / "pool"),
    )
    daemon = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(Clock()), threads=INLINE)
    with pytest.raises(PoolSetupError, match="same file"):
        daemon.start()
    assert not fake.loops and not fake.devices


def test_the_same_file_in_two_pools_is_refused(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    import yaml

    (tmp_path / "shared").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path)
    pools = {
        "a": {"data_file": f"{tmp_path}/shared", "metadata_file": f"{tmp_path}/a.meta"},
        "b": {"data_file": f"{tmp_path}/b.data", "metadata_file": f"{tmp_path}/link/shared"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pools": pools}))
    daemon = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(Clock()), threads=INLINE)
    with pytest.raises(PoolSetupError, match=r"pools\.b\.metadata_file.*pools\.a\.data_file"):
        daemon.start()
    assert not fake.devices


def test_preallocated_data_next_to_unused_metadata_is_not_formatted_over(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    """preallocate: true used to switch the guard off: an all-zero metadata file next to used
    data was "created" and the pool's data was gone."""
    from dataclasses import replace

    settings = replace(pool_settings, preallocate=True)
    Files().create(str(settings.data_file), Bytes(64 * MiB), preallocate=True)
    Files().create(str(settings.metadata_file), Bytes(8 * MiB), preallocate=True)
    with open(settings.data_file, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"a thin volume's data")
    with pytest.raises(PoolSetupError, match="holds data"):
        activate(settings, kernel)
    assert not fake.devices
    with open(settings.data_file, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(20) == b"a thin volume's data"


def test_our_own_interrupted_preallocated_creation_is_finished(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    from dataclasses import replace

    settings = replace(pool_settings, preallocate=True)
    Files().create(str(settings.metadata_file), Bytes(8 * MiB), preallocate=True)
    Files().create(str(settings.data_file), Bytes(64 * MiB), preallocate=True)
    pool = activate(settings, kernel)  # both files made, the pool never activated
    assert pool.length == 64 * MiB // 512


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("notdir", "ENOTDIR"),
        ("loop", "ELOOP"),
        ("longname", "ENAMETOOLONG"),
    ],
)
def test_unusable_paths_give_one_line_not_a_traceback(
    kernel: Kernel, pool_settings: PoolSettings, tmp_path: Path, make: str, expected: str
) -> None:
    from dataclasses import replace

    if make == "notdir":
        (tmp_path / "file").write_bytes(b"")
        data = tmp_path / "file" / "data"
    elif make == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        data = tmp_path / "a" / "data"
    else:
        data = tmp_path / ("x" * 300)
    with pytest.raises(PoolSetupError) as caught:
        activate(replace(pool_settings, data_file=data), kernel)
    assert expected in str(caught.value) and "pools.pool.data_file" in str(caught.value)


def test_eacces_on_a_path_is_a_setup_error(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    fake.fail("lstat", 13, target=str(pool_settings.data_file))  # EACCES
    with pytest.raises(PoolSetupError, match=r"pools\.pool\.data_file.*EACCES"):
        activate(pool_settings, kernel)


# -- the backing filesystem ---------------------------------------------------------------


class TinyFilesystem(Files):
    """Files whose statvfs says the filesystem has `free` bytes left."""

    def __init__(self, inner: Files, free: int) -> None:
        super().__init__(inner.sys)
        self.free = free

    def space(self, path: str) -> FsSpace:
        return FsSpace(Bytes(self.free), Bytes(10 * MiB))


def test_a_filesystem_at_its_reserve_is_said_once_and_when_full_applies(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 64 MiB sparse pool on a nearly full filesystem: said before the loop returns EIO."""
    tiny = TinyFilesystem(kernel.files, free=200 * MiB)  # type: ignore[arg-type]
    kernel.files = tiny
    clock = Clock()
    daemon = start(
        tmp_path,
        kernel,
        clock,
        reserve="1MiB",
        preallocate=False,
        when_full={"error_after": "5s"},
    )
    assert MessageId.BACKING_FS_LOW not in message_ids(caplog)
    tiny.free = 512 * 1024  # below the reserve; the pool still has ~all its blocks in holes
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert message_ids(caplog).count(MessageId.BACKING_FS_LOW) == 1
    record = next(
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.BACKING_FS_LOW
    )
    assert record.levelno == logging.ERROR and "reserve" in record.getMessage()
    clock.now += 6
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert status(fake).no_space_policy.value == "error_if_no_space"
    tiny.free = 200 * MiB
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert status(fake).no_space_policy.value == "queue_if_no_space"


# -- blocking work off the loop ------------------------------------------------------------


class CountingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__()
        self.watchdog_interval = 0.05
        self.pets = 0

    def watchdog(self) -> bool:
        self.pets += 1
        return True


def test_a_slow_thin_check_stalls_neither_the_watchdog_nor_another_pools_growth(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Pool b is rebuilt over its metadata and its thin_check hangs; pool a must still grow."""
    import threading
    import time

    import yaml

    pools = {
        name: {
            "data_file": f"{tmp_path}/{name}.data",
            "metadata_file": f"{tmp_path}/{name}.meta",
            "data_size": "64MiB",
            "metadata_size": "8MiB",
            "low_water_mark": 16,
            "reserve": 0,
        }
        for name in ("a", "b")
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"daemon": {"check_interval": "1h"}, "pools": pools}))
    checking, release = threading.Event(), threading.Event()

    def slow_thin_check(metadata_path: str) -> str | None:
        checking.set()
        assert release.wait(30), "never released"
        return None

    notifier = CountingNotifier()
    daemon = Daemon(
        config,
        kernel,
        notifier=notifier,
        loop=EventLoop(),
        check_metadata=slow_thin_check,
        threads=INLINE,
    )
    daemon.start()  # both new: no thin_check
    daemon.loop.add_reader(fake.fileno(), daemon.dm_events.check)
    fake.remove("b")
    daemon.dm_events.check()  # b lost: rebuilt in a worker, blocked in thin_check
    assert checking.wait(10)
    pets = notifier.pets
    total = daemon.pools["a"].state.seen.status.data_total  # type: ignore[union-attr]
    fake.write_blocks("a", total - 8)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        daemon.loop.run_once(max_wait=0.05)
    grown = fake.devices["a"].pool
    assert grown is not None and grown.metadata.data_total > total, "a waited behind b"
    assert notifier.pets >= pets + 3, "the watchdog waited behind thin_check"
    assert "b" not in fake.devices or not fake.devices["b"].active
    release.set()
    daemon.workers.run_until_idle(timeout=10)
    info = fake.info("b")
    assert info is not None and info.active_present and not info.suspended
    daemon.workers.close()


def test_a_sighup_during_start_up_is_applied_after_it_not_fatal(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    import signal

    class Recording(Notifier):
        def __init__(self) -> None:
            super().__init__()
            self.sent: list[str] = []

        def ready(self, status: str = "") -> bool:
            self.sent.append("READY")
            return True

        def reloading(self) -> bool:
            self.sent.append("RELOADING")
            return True

    config = write_config(tmp_path / "config.yaml", tmp_path)
    notifier = Recording()
    daemon = Daemon(config, kernel, notifier=notifier, loop=EventLoop(Clock()), threads=INLINE)
    original = fake.attach

    def attach_and_hup(path: str, *, direct_io: bool = False):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGHUP)  # arrives while the pool is being built
        return original(path, direct_io=direct_io)

    fake.attach = attach_and_hup  # type: ignore[method-assign]
    try:
        daemon.start()
    finally:
        daemon.loop.close()
    assert "pool" in daemon.pools
    assert notifier.sent == ["RELOADING", "READY"]  # the reload ran after start-up, once


def test_a_data_file_replaced_under_its_name_is_never_grown_in_its_place(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    daemon = start(tmp_path, kernel, clock)
    os.rename(tmp_path / "data", tmp_path / "data.moved")  # the loop keeps the old inode
    (tmp_path / "data").write_bytes(b"someone else's file")
    fake.write_blocks("pool", status(fake).data_total - 8)
    daemon.dm_events.check()
    assert (tmp_path / "data").read_bytes() == b"someone else's file"
    assert message_ids(caplog).count(MessageId.GROWTH_FAILED) == 1
    assert "ESTALE" in caplog.text
    info = fake.info("pool")
    assert info is not None and not info.suspended


def test_a_failed_growth_no_longer_wanted_leaves_no_retry_spinning(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Found on the real kernel: a growth failed, then the pool could not grow at all (the
    backing filesystem full): the retry timer, due in the past, rescheduled itself forever and
    the loop never saw SIGTERM again."""
    import signal

    clock = Clock()
    daemon = start(tmp_path, kernel, clock, data={"max_size": "96MiB"})
    fake.fail("ftruncate", 5)  # EIO, once
    fake.write_blocks("pool", status(fake).data_total - 8)
    daemon.dm_events.check()
    managed = daemon.pools["pool"]
    assert managed.state.retry_at is not None
    os.truncate(tmp_path / "data", 96 * MiB)  # someone else grows it to the cap meanwhile
    clock.now += 60

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError("the event loop spins on a retry timer")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        daemon.loop.run_once(max_wait=0)
        daemon.loop.run_once(max_wait=0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert managed.state.retry_at is None
    info = fake.info("pool")
    assert info is not None and not info.suspended


def test_a_pool_stuck_on_someone_elses_refused_resume_is_resumed(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator reloads a stale, shorter length and resumes: the kernel refuses it at
    preresume and leaves the pool suspended on that table. The next check resumes it."""
    clock = Clock()
    daemon = start(tmp_path, kernel, clock)
    pool = daemon.pools["pool"].pool
    fake.load_table("pool", [pool.target(Sectors(pool.length // 2))])
    with pytest.raises(Exception, match="too small"):
        fake.resume("pool")
    info = fake.info("pool")
    assert info is not None and info.suspended
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    info = fake.info("pool")
    assert info is not None and not info.suspended and not info.inactive_present
    assert fake.table("pool")[0].length == pool.length == 64 * MiB // 512
    assert "refused" in caplog.text


# -- found in review -----------------------------------------------------------------------


def test_a_deliberate_suspend_is_not_undone_by_a_growth(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    daemon = start(tmp_path, kernel, clock)
    fake.write_blocks("pool", status(fake).data_total - 8)  # a growth is due...
    fake.suspend("pool")  # ...but the operator has the pool suspended (a backup, say)
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    info = fake.info("pool")
    assert info is not None and info.suspended, "the operator's suspend was undone"
    assert caplog.text.count("suspended by someone else") == 1
    fake.resume("pool")
    daemon.scheduler.run_pass([daemon.pools["pool"]])
    assert status(fake).data_total > 1024  # grown once the operator resumed it


def test_a_suspended_pool_is_resumed_even_if_a_size_read_fails_once(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    from thinwatchd.pool.running import ensure_resumed

    pool = activate(pool_settings, kernel)
    fake.load_table("pool", [pool.target(Sectors(pool.length // 2))])
    with pytest.raises(Exception, match="too small"):
        fake.resume("pool")
    fake.fail("BLKGETSIZE64", 4)  # EINTR, once
    ensure_resumed(kernel, pool)
    info = fake.info("pool")
    assert info is not None and not info.suspended


def test_a_reload_while_a_pool_is_being_built_applies_to_it(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    clock = Clock()
    daemon = start(tmp_path, kernel, clock)
    fake.remove("pool")
    original = daemon.workers.submit

    def submit_then_reload(
        key: str,
        job: Callable[[], Any],
        done: Callable[[Any, BaseException | None], None],
        *,
        background: bool = False,
    ) -> bool:
        accepted = original(key, job, done, background=background)
        write_config(daemon.config_path, tmp_path, data={"max_size": "128MiB"})
        daemon.reload()  # SIGHUP while the rebuild runs
        return accepted

    daemon.workers.submit = submit_then_reload  # type: ignore[method-assign]
    daemon.dm_events.check()
    daemon.workers.run_until_idle()
    assert daemon.pools["pool"].pool.settings.data.max_size == 128 * MiB


def test_two_spellings_of_one_new_file_are_refused_before_anything_is_built(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    import yaml

    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    pools = {
        "a": {"data_file": f"{tmp_path}/real/new", "metadata_file": f"{tmp_path}/a.meta"},
        "b": {"data_file": f"{tmp_path}/b.data", "metadata_file": f"{tmp_path}/alias/new"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pools": pools}))
    daemon = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(Clock()), threads=INLINE)
    with pytest.raises(PoolSetupError, match=r"pools\.b\.metadata_file.*pools\.a\.data_file"):
        daemon.start()
    assert not fake.devices and not (tmp_path / "real" / "new").exists()


def test_a_new_pool_under_a_symlinked_directory_is_built(
    kernel: Kernel, pool_settings: PoolSettings, tmp_path: Path
) -> None:
    from dataclasses import replace

    (tmp_path / "bigdisk").mkdir()
    (tmp_path / "lib").symlink_to(tmp_path / "bigdisk")  # /var/lib/thinwatchd -> /srv, say
    settings = replace(
        pool_settings,
        data_file=tmp_path / "lib" / "pool" / "data",
        metadata_file=tmp_path / "lib" / "pool" / "metadata",
    )
    activate(settings, kernel)
    assert (tmp_path / "bigdisk" / "pool" / "data").stat().st_size == 64 * MiB
