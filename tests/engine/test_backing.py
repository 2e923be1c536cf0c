"""Each backing file and filesystem looked at once per pass (backing.py), and no decision taken
on a figure that is stale: what other pools promise, what a growth earlier in the pass took.

Two pools share one filesystem whose free space the tests set (the fake kernel's files are
real, their filesystem is not theirs alone).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel
from testbed.workers import INLINE
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.logs import MessageId
from thinwatchd.base.notify import Notifier
from thinwatchd.base.units import Bytes
from thinwatchd.daemon.daemon import Daemon, Threads
from thinwatchd.growth.backing import BackingFiles
from thinwatchd.kernel.api import FsSpace, Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.publish.estimates import read_estimates
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

MiB = 1024**2
GiB = 1024**3
#: Long enough for anything here many times over; a test that waits this long has failed.
PATIENCE = 5.0


class SharedFilesystem(Files):
    """Files whose statvfs says: `capacity` bytes, less what the pool files allocated, plus
    `extra` (what the rest of the filesystem holds or frees)."""

    def __init__(self, inner: Files, root: Path, capacity: int) -> None:
        super().__init__(inner.sys)
        self.root = root
        self.capacity = capacity
        self.extra = 0

    def free(self) -> int:
        files = [*self.root.glob("*.data"), *self.root.glob("*.meta")]
        return self.capacity - sum(os.stat(p).st_blocks * 512 for p in files) + self.extra

    def space(self, path: str) -> FsSpace:
        self.sys.statvfs(path)  # counted, and failable, as the real one
        return FsSpace(Bytes(self.free()), Bytes(self.capacity))


def start(
    tmp_path: Path,
    kernel: Kernel,
    capacity: int,
    names: tuple[str, ...] = ("a", "b"),
    pool: dict[str, object] | None = None,
    threads: Threads = INLINE,
) -> tuple[Daemon, SharedFilesystem]:
    shared = SharedFilesystem(kernel.files, tmp_path, capacity)  # type: ignore[arg-type]
    kernel.files = shared
    pools = {
        name: {
            "data_file": f"{tmp_path}/{name}.data",
            "metadata_file": f"{tmp_path}/{name}.meta",
            "data_size": "64MiB",
            "metadata_size": "8MiB",
            "low_water_mark": 16,
            "reserve": 0,
            "preallocate": False,  # sparse data files: their holes are promises
            **(pool or {}),
        }
        for name in names
    }
    config = tmp_path / "config.yaml"
    daemon = {"check_interval": "1h", "metrics_file": f"{tmp_path}/metrics.prom"}
    config.write_text(yaml.safe_dump({"daemon": daemon, "pools": pools}))
    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(Clock()), threads=threads)
    d.start()
    return d, shared


def to_mark(fake: FakeKernel, d: Daemon, name: str) -> None:
    """Write pool name down to its low-water mark: the kernel's event is pending."""
    status = parse_pool_status(fake.status(name)[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    fake.write_blocks(name, status.data_free - d.pools[name].pool.table.low_water_mark)


def test_an_event_decides_on_fresh_promises_when_room_is_short(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Pool b's holes were last looked at by start-up; since, 16 MiB were written into them.
    When the room left decides a's growth, b is looked at again: a grows by its whole step."""
    d, shared = start(tmp_path, kernel, capacity=8 * 1024 * MiB)
    with open(tmp_path / "b.data", "r+b") as f:  # what b's loop writes into its holes
        f.write(b"\1" * 16 * MiB)
    # Room for a's step of 1 GiB (64 MiB -> 1088 MiB) with 8 MiB to spare, beyond what is
    # promised: a's own holes and b's 48 MiB (16 MiB more by b's last look: with that figure,
    # a would grow by 1016 MiB only). The metadata files are allocated whole: no promise.
    promised = 64 * MiB + 48 * MiB
    shared.extra = 1024 * MiB + 8 * MiB + promised - shared.free()
    to_mark(fake, d, "a")
    calls = len(fake.calls)
    d.dm_events.check()
    assert os.stat(tmp_path / "a.data").st_size == 1088 * MiB
    assert f"lstat {tmp_path}/b.data" in fake.calls[calls:]  # looked at again: room was short


def test_an_event_takes_others_promises_from_their_last_look(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """With room to spare, an event on a looks at a's files, not at b's."""
    d, _ = start(tmp_path, kernel, capacity=64 * 1024 * MiB)
    to_mark(fake, d, "a")
    calls = len(fake.calls)
    d.dm_events.check()
    assert os.stat(tmp_path / "a.data").st_size > 64 * MiB
    looked = [c for c in fake.calls[calls:] if c.startswith(("lstat", "statvfs"))]
    assert not [c for c in looked if "/b." in c], looked


PREALLOCATED = {
    "preallocate": True,
    "data_size": "8MiB",
    "metadata_size": "2MiB",
    "data": {"step": "16MiB", "step_percent": "0%", "adaptive_low_water": False},
}


def test_a_growth_earlier_in_a_pass_is_seen_by_the_next_pool(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Two preallocated pools grow in one event pass with room for 24 MiB: the second one
    sees what the first took (statvfs again after a growth), and grows within the 8 MiB left."""
    d, shared = start(tmp_path, kernel, capacity=20 * MiB + 24 * MiB, pool=PREALLOCATED)
    assert shared.free() == 24 * MiB
    to_mark(fake, d, "a")
    to_mark(fake, d, "b")
    d.dm_events.check()
    sizes = sorted(os.stat(tmp_path / f"{name}.data").st_size for name in ("a", "b"))
    # The first takes its step (16 MiB); the second, short of room, takes what leaves its mark
    # free, out of the 8 MiB left (the rest stays for whoever needs it next), never more.
    assert sizes[1] == 24 * MiB and 8 * MiB < sizes[0] <= 16 * MiB, sizes
    assert shared.free() == 16 * MiB - sizes[0] >= 0


@pytest.mark.parametrize("free", [100 * MiB, 3 * MiB])
def test_metrics_give_the_free_space_the_last_pass_saw(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, free: int
) -> None:
    d, shared = start(tmp_path, kernel, capacity=64 * 1024 * MiB)
    shared.extra = free - shared.free()
    d.scheduler.run_pass([d.pools["a"]])  # a pass of a only: b's filesystem is the same one
    d.publications.flush()  # what the pass publishes, at once (not up to PUBLISH_SECONDS later)
    metrics = (tmp_path / "metrics.prom").read_text()
    for name in ("a", "b"):
        assert f'thinwatchd_backing_fs_free_bytes{{pool="{name}"}} {free}' in metrics


def test_metrics_and_growth_entries_give_the_data_files_allocated_bytes(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What each data file takes on disk, beside the data in use: the difference is what
    discards would give back (issue 10)."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    d, _ = start(tmp_path, kernel, capacity=64 * 1024 * MiB)
    with open(tmp_path / "b.data", "r+b") as f:  # what b's loop wrote: 3 MiB allocated
        f.write(b"\1" * 3 * MiB)
        f.flush()
        os.fsync(f.fileno())
    to_mark(fake, d, "a")
    d.scheduler.run_pass(list(d.pools.values()), survey=True)  # a grows; every file is looked at
    d.publications.flush()
    metrics = (tmp_path / "metrics.prom").read_text()
    for name in ("a", "b"):
        allocated = os.stat(tmp_path / f"{name}.data").st_blocks * 512
        line = f'thinwatchd_data_file_allocated_bytes{{pool="{name}"}} {allocated}'
        assert line in metrics, metrics
    assert os.stat(tmp_path / "b.data").st_blocks * 512 >= 3 * MiB
    (grown,) = [
        r.journal_fields  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.DATA_GROWN
    ]
    assert int(grown["DATA_FILE_ALLOCATED_BYTES"]) == os.stat(tmp_path / "a.data").st_blocks * 512


def survey(d: Daemon) -> None:
    """A safety check's pass, and its publication at once (not up to PUBLISH_SECONDS later)."""
    d.scheduler.run_pass(list(d.pools.values()), survey=True)
    d.publications.flush()


def filling(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> tuple[Daemon, SharedFilesystem, list[str]]:
    """Two pools on one filesystem, a capped at 1,024 MiB, filling at 1 and 3 MiB/s for 30 s;
    1,200 MiB free then (300 s at 4 MiB/s). Return the daemon, its filesystem and STATUS=."""
    d, shared = start(tmp_path, kernel, capacity=64 * 1024 * MiB)
    d.pools["a"].pool.settings = replace(
        d.pools["a"].pool.settings,
        data=replace(d.pools["a"].pool.settings.data, max_size=Bytes(1024 * MiB)),
    )
    lines: list[str] = []

    def status(text: str) -> bool:
        lines.append(text)
        return True

    d.notifier.status = status  # type: ignore[method-assign]
    clock = d.loop._clock
    assert isinstance(clock, Clock)  # the engine tests' Clock
    for _ in range(3):  # ten seconds apart: 10 MiB into a, 30 MiB into b
        fake.write_blocks("a", 10 * MiB // (64 * 1024))
        fake.write_blocks("b", 30 * MiB // (64 * 1024))
        clock.now += 10
        d.scheduler.run_pass(list(d.pools.values()), survey=True)
    shared.extra = 1200 * MiB - shared.free()
    survey(d)
    return d, shared, lines


def test_metrics_and_status_say_when_the_filesystem_reaches_the_reserve(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """It reaches their reserve (0 here) at 4 MiB/s, and STATUS= says when (issue 10)."""
    _, _, lines = filling(fake, kernel, tmp_path)
    metrics = (tmp_path / "metrics.prom").read_text()
    assert f'thinwatchd_fill_rate_bytes_per_second{{pool="b"}} {float(3 * MiB)!r}' in metrics
    for name in ("a", "b"):
        assert f'thinwatchd_seconds_to_backing_fs_reserve{{pool="{name}"}} 300.0' in metrics
    # a: 1,024 MiB cap, 30 MiB used (and whatever start-up wrote), at 1 MiB/s
    used = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(used, ThinPoolWorkingStatus)
    to_cap = (1024 * MiB - used.data_used * 64 * 1024) / MiB
    assert f'thinwatchd_seconds_to_cap{{pool="a"}} {to_cap!r}' in metrics
    assert 'thinwatchd_seconds_to_cap{pool="b"}' not in metrics  # no cap
    assert lines[-1].endswith("; a's filesystem at its reserve in 5 min"), lines[-1]


def test_the_journal_warns_once_when_a_pool_is_full_soon(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """a's cap, once for a; the filesystem both fill, once for it (not once per pool on it),
    naming the pool whose reserve comes first and every pool at risk."""
    caplog.set_level(logging.INFO, logger="thinwatchd")

    def warned() -> list[dict[str, str]]:
        return [
            r.journal_fields  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.FULL_SOON
        ]

    d, shared, _ = filling(fake, kernel, tmp_path)  # within the default hour: a's cap too
    assert sorted((w["POOL"], w["LIMIT"]) for w in warned()) == [
        ("a", "backing_fs"),  # the same reserve (0) for both: the first by name
        ("a", "cap"),
    ]
    (fs,) = [w for w in warned() if w["LIMIT"] == "backing_fs"]
    assert fs["POOLS"] == "a,b" and int(fs["FS_FILL_RATE_BYTES_PER_SECOND"]) == 4 * MiB, fs
    assert int(fs["FILL_RATE_BYTES_PER_SECOND"]) == MiB and int(fs["SECONDS_LEFT"]) == 300, fs
    survey(d)
    assert len(warned()) == 2  # once
    shared.extra += 64 * 1024 * MiB  # room for hours: forgotten...
    survey(d)
    shared.extra -= 64 * 1024 * MiB  # ...and near again: said again
    survey(d)
    assert [(w["POOL"], w["LIMIT"]) for w in warned()[2:]] == [("a", "backing_fs")]


def test_many_pools_filling_one_filesystem_make_one_warning(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """30 pools filling one filesystem: one FULL_SOON about it, naming five in its message and
    all 30 in POOLS; not 30 warnings for one filesystem."""
    caplog.set_level(logging.WARNING, logger="thinwatchd")
    names = tuple(f"p{i:02d}" for i in range(30))
    d, shared = start(tmp_path, kernel, capacity=64 * 1024 * MiB, names=names)
    clock = d.loop._clock
    assert isinstance(clock, Clock)
    for _ in range(3):
        for name in names:
            fake.write_blocks(name, MiB // (64 * 1024))
        clock.now += 10
        survey(d)
    shared.extra = 600 * MiB - shared.free()  # 3 MiB/s together: 200 s to the reserve
    survey(d)
    warnings = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.FULL_SOON
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    fields = warnings[0].journal_fields  # type: ignore[attr-defined]
    assert fields["LIMIT"] == "backing_fs" and fields["POOLS"] == ",".join(names), fields
    assert "30 pools at risk: p00, p01, p02, p03, p04 and 25 more" in warnings[0].getMessage()


def test_the_journal_says_once_how_to_give_back_what_the_data_file_holds_unused(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deletes without discards leave the file's blocks allocated: said once, with the bytes,
    when it is 1 GiB and a tenth of the file; again only after it fell under half of that."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    d, _ = start(tmp_path, kernel, capacity=64 * 1024 * MiB)
    status = parse_pool_status(fake.status("a")[0].params)
    assert isinstance(status, ThinPoolWorkingStatus)
    used = status.data_used * 64 * 1024
    on_disk = {"a": used}
    monkeypatch.setattr(d.extender.backing, "allocated", lambda path: on_disk[Path(path).stem])

    def hinted() -> list[int]:
        return [
            int(r.journal_fields["RECLAIMABLE_BYTES"])  # type: ignore[attr-defined]
            for r in caplog.records
            if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.SPACE_RECLAIMABLE
        ]

    def settle(allocated: int) -> list[int]:
        on_disk["a"] = used + allocated
        on_disk["b"] = 0
        survey(d)
        return hinted()

    assert settle(1024 * MiB - 1) == []  # under the threshold
    assert settle(1024 * MiB) == [1024 * MiB]
    assert settle(3000 * MiB) == [1024 * MiB]  # once
    assert settle(600 * MiB) == [1024 * MiB]  # over half: still in force, not said
    assert settle(1100 * MiB) == [1024 * MiB]
    assert settle(500 * MiB) == [1024 * MiB]  # under half: forgotten...
    assert settle(1100 * MiB) == [1024 * MiB, 1100 * MiB]  # ...so said again


def test_the_estimates_for_status_are_written_after_each_pass(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What `thinwatchd status` shows as CAP IN and FS FULL IN (read in another process)."""
    d, _, _ = filling(fake, kernel, tmp_path)
    d.publisher.estimates_file = tmp_path / "estimates.json"
    survey(d)
    written = d.publisher.estimates_file
    now = os.stat(written).st_mtime
    estimates = read_estimates(written, now, max_age=60)
    assert estimates is not None
    assert estimates["b"].fill_rate_bytes_per_second == 3 * MiB
    assert estimates["b"].seconds_to_backing_fs_reserve == pytest.approx(300, abs=2)
    assert estimates["b"].seconds_to_cap is None  # no cap
    assert estimates["a"].seconds_to_cap is not None
    # A write that fails is said once, not at every pass.
    d.publisher.estimates_file = tmp_path / "gone" / "estimates.json"
    caplog.set_level(logging.WARNING, logger="thinwatchd")
    for _ in range(3):
        survey(d)
    said = [r.getMessage() for r in caplog.records if "cannot write estimates" in r.getMessage()]
    assert len(said) == 1, said


def test_a_preallocated_pool_is_never_told_to_give_space_back(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its file is allocated whole on purpose; fstrim would only undo that."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    d, _ = start(tmp_path, kernel, capacity=64 * 1024 * MiB, pool=PREALLOCATED)
    monkeypatch.setattr(d.extender.backing, "allocated", lambda path: 100 * 1024 * MiB)
    d.scheduler.run_pass(list(d.pools.values()), survey=True)
    said = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.SPACE_RECLAIMABLE
    ]
    assert said == []


def test_a_file_that_could_not_be_looked_at_once_is_counted_again_at_the_next_check(
    fake: FakeKernel, tmp_path: Path
) -> None:
    """q's lstat fails once (EIO) during p's survey: q promises nothing for that pass, and the
    next safety check looks at it again with its filesystem's files (it was surveyed by the
    filesystem it was last seen on), so p's figures count q's unwritten 48 MiB again."""
    p, q = str(tmp_path / "p.data"), str(tmp_path / "q.data")
    for path in (p, q):
        with open(path, "wb") as f:
            f.truncate(48 * MiB)  # sparse: all of it promised
    backing = BackingFiles(Files(fake.syscalls))
    backing.watch([p, q])

    def promised_to_others() -> int:
        return backing.new_pass(survey=True).figures(p).promised_elsewhere

    assert promised_to_others() == 48 * MiB
    fake.fail("lstat", errno.EIO, target=q)
    assert promised_to_others() == 0  # q could not be looked at: it promises nothing
    assert promised_to_others() == 48 * MiB


class SlowStatvfs(Files):
    """A filesystem whose statvfs reads the free space, then takes until released to return
    (a slow syscall), with the free space set by the test."""

    def __init__(self, files: Files) -> None:
        super().__init__(files.sys)
        self.free = 100 * GiB
        self.read = threading.Event()  # a statvfs has read the free space
        self.release = threading.Event()

    def space(self, path: str) -> FsSpace:
        seen = FsSpace(Bytes(self.free), Bytes(200 * GiB))
        self.read.set()
        self.release.wait(PATIENCE)
        return seen


def test_a_growth_during_a_slow_statvfs_is_not_counted_as_free_space(
    fake: FakeKernel, tmp_path: Path
) -> None:
    """q's statvfs reads the free space, then p's preallocated growth takes 10 GiB and says so
    (changed) before that statvfs returns: r's figures, later in the pass, must look again and
    see 90 GiB, not the 100 GiB read before the growth."""
    paths = {name: str(tmp_path / f"{name}.data") for name in ("p", "q", "r")}
    for path in paths.values():
        with open(path, "wb") as f:
            f.write(b"\1" * 4096)  # allocated: promises nothing that matters here
    fs = SlowStatvfs(Files(fake.syscalls))
    backing = BackingFiles(fs)
    backing.watch(paths.values())
    look = backing.new_pass()
    slow = threading.Thread(target=look.figures, args=(paths["q"],))
    slow.start()
    assert fs.read.wait(PATIENCE)
    fs.free -= 10 * GiB  # p's growth took it...
    grown = threading.Thread(target=look.changed, args=(paths["p"],))
    grown.start()  # ...and says so while q's statvfs is still out
    grown.join(0.2)
    fs.release.set()
    slow.join(PATIENCE)
    grown.join(PATIENCE)
    assert look.figures(paths["r"]).free_bytes == 90 * GiB


@pytest.mark.parametrize(
    ("room", "crash_room"), [(400 * MiB, True), (100 * MiB, True), (400 * MiB, False)]
)
def test_room_for_a_killed_daemons_absence_is_only_kept_from_room_to_spare(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, room: int, crash_room: bool
) -> None:
    """Found in the guest: two filling pools on a filesystem a neighbour had filled; the
    first took the room that came back for its mark's room for a killed daemon's absence (its
    fill rate x 14 s), and the second ran out of space into EIO. That room is now kept only
    while the filesystem has four times it to spare (room.crash_room_fits); otherwise the
    mark is what it was without it, as with data.crash_room false."""
    data = {"step": "16MiB", "step_percent": "0%", "crash_room": crash_room}
    adaptive = {**PREALLOCATED, "data": data}
    d, _ = start(tmp_path, kernel, capacity=20 * MiB + room, pool=adaptive)
    now = d.loop.time()
    d._born, d._ready_at = now - 5.5, now  # a start-up as the guest's: absence 14 s
    clock = d.loop._clock
    for _ in range(3):  # both fill at 4 MiB/s, a check each second
        for name in ("a", "b"):
            fake.write_blocks(name, 64)
        clock.now += 1  # type: ignore[attr-defined]
        d.scheduler.run_pass(list(d.pools.values()), survey=True)
    mark = d.pools["a"].pool.table.low_water_mark * 64 * 1024
    absence = 4 * MiB * 14  # 56 MiB: 224 MiB to spare wanted
    if crash_room and room > 4 * absence:
        assert mark >= absence, mark
    else:
        assert mark < absence, mark  # 4 MiB/s x 4 growths of 0.5 s + 32 MiB: 40 MiB
