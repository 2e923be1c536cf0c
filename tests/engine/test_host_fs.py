"""Issue 18: the host's filesystem fills, and no pool breaks. Nothing the pool may write to is
left for a neighbour to take: metadata files allocated whole, data growths allocated, holes
(discards, sparse growths, adopted sparse files) claimed before the filesystem's free space
falls below what they promise. On the real kernel: tests/kernel/test_host_fs_full.py.

The pool files are real files; their filesystem's free space is what the tests set
(test_backing.SharedFilesystem: capacity less what the pool files allocate, plus `extra`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from pathlib import Path

import pytest

from testbed.fake_kernel import FakeKernel, Fault
from testbed.workers import INLINE
from tests.engine.test_backing import SharedFilesystem, start, to_mark
from thinwatchd.base.errors import KernelError
from thinwatchd.base.logs import MessageId
from thinwatchd.base.units import Bytes
from thinwatchd.daemon.daemon import Daemon
from thinwatchd.growth.space_watch import pool_files_by_fs
from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.fs import Files

MiB = 1024**2
GiB = 1024**3
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch(path: Path, offset: int, length: int) -> None:
    """What the loop device does on a discard: a hole in the file, its size unchanged."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(path, os.O_RDWR)
    try:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert libc.fallocate(fd, mode, offset, length) == 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def holes(path: Path) -> int:
    """What the file may still take: its size less its blocks (an extent block counts too)."""
    return max(0, os.stat(path).st_size - allocated(path))


def message_ids(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "journal_fields", {}).get("MESSAGE_ID", "") for r in caplog.records]


def look(d: Daemon) -> list[bool]:
    """One look of the space watch at every filesystem, as its tick does (inline here)."""
    watch = d.space_watch
    by_fs = pool_files_by_fs(list(d.pools.values()), watch.backing)
    return [watch.look(dev, by_fs.get(dev, [])) for dev in watch.backing.filesystems()]


# -- allocated, not promised ---------------------------------------------------------------


def test_metadata_is_allocated_whole_when_created_and_grown_even_for_a_sparse_pool(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 2: a metadata write never meets a full filesystem, whatever preallocate says."""
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool={"preallocate": False})
    meta = tmp_path / "a.meta"
    assert holes(meta) == 0 and allocated(meta) == 8 * MiB
    assert holes(tmp_path / "a.data") == 64 * MiB  # the data stays sparse, as asked
    fake.devices["a"].pool.metadata.meta_used = 1800  # type: ignore[union-attr]  # 7 MiB of 8
    d.dm_events.check()
    d.scheduler.run_pass(list(d.pools.values()))
    assert os.stat(meta).st_size > 8 * MiB
    assert holes(meta) == 0


def test_a_preallocated_growth_leaves_no_hole(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 3: the default allocates each growth's range: the pool's free blocks are backed."""
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool={"preallocate": True})
    to_mark(fake, d, "a")
    d.dm_events.check()
    data = tmp_path / "a.data"
    assert os.stat(data).st_size > 64 * MiB
    assert holes(data) == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failed_allocation_leaves_the_file_as_it_was_and_is_said_once_and_retried(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    """fallocate fails (the filesystem filled after the decision; a disk error): the file keeps
    its size and takes nothing more, the pool is not grown, the failure is said once, and the
    retry grows it once the filesystem allocates again."""
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool={"preallocate": True})
    data = tmp_path / "a.data"
    before = os.stat(data)
    fake.faults.append(Fault("fallocate", code, times=2))
    to_mark(fake, d, "a")
    d.dm_events.check()
    after = os.stat(data)
    assert (after.st_size, after.st_blocks) == (before.st_size, before.st_blocks)
    assert message_ids(caplog).count(MessageId.GROWTH_FAILED) == 1
    clock = d.loop._clock
    clock.now += 1  # type: ignore[attr-defined]  # its backoff is over
    d.scheduler.run_pass(list(d.pools.values()))  # the retry, failing again: not said again
    assert message_ids(caplog).count(MessageId.GROWTH_FAILED) == 1
    clock.now += 1  # type: ignore[attr-defined]
    d.scheduler.run_pass(list(d.pools.values()))
    assert os.stat(data).st_size > before.st_size and holes(data) == 0


def test_a_filesystem_that_cannot_fallocate_gets_the_new_range_written_with_zeros(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """EOPNOTSUPP (NFS before 4.2, ext4 without extents): a growth is still backed; its range,
    past the old EOF, is written with zeros, as posix_fallocate does."""
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool={"preallocate": True})
    fake.faults.append(Fault("fallocate", errno.EOPNOTSUPP, times=None, target=""))
    to_mark(fake, d, "a")
    d.dm_events.check()
    data = tmp_path / "a.data"
    assert os.stat(data).st_size > 64 * MiB and holes(data) == 0
    assert MessageId.GROWTH_FAILED not in message_ids(caplog)
    assert any(c.startswith("pwrite") for c in fake.calls)


def test_a_new_pool_that_would_take_the_reserve_is_not_created(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Nothing is allocated for a pool whose files do not fit above the reserve: the start
    fails with ENOSPC (transient: the unit retries), naming the figures and the keys."""
    shared = SharedFilesystem(kernel.files, tmp_path, 2 * GiB)  # type: ignore[arg-type]
    kernel.files = shared
    config = tmp_path / "config.yaml"
    config.write_text(
        f"pools:\n  a:\n    data_file: {tmp_path}/a.data\n    metadata_file: {tmp_path}/a.meta\n"
    )
    from thinwatchd.base.event_loop import EventLoop
    from thinwatchd.base.notify import Notifier

    d = Daemon(config, kernel, notifier=Notifier(), loop=EventLoop(), threads=INLINE)
    with pytest.raises(KernelError) as raised:
        d.start()  # 1 GiB + 128 MiB into 2 GiB with a 1 GiB reserve
    assert raised.value.errno == errno.ENOSPC
    assert "reserve" in str(raised.value) and "pools.a" in str(raised.value)
    assert not (tmp_path / "a.data").exists()
    d.workers.close()


# -- holes claimed before a neighbour takes them --------------------------------------------


def test_discarded_blocks_go_back_to_a_roomy_host_and_are_claimed_when_it_gets_tight(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 4: fstrim punches 40 MiB of holes in a's preallocated file. With 60 GiB to spare
    the host keeps them; a neighbour then fills the filesystem to within 1 GiB of what the
    holes promise, and the next look claims them all before it can take that space."""
    pool: dict[str, object] = {"preallocate": True, "reserve": "256MiB"}
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool=pool)
    data = tmp_path / "a.data"
    punch(data, 8 * MiB, 40 * MiB)
    look(d)
    assert holes(data) == 40 * MiB  # roomy: the host has them
    assert MessageId.HOLES_CLAIMED not in message_ids(caplog)
    shared.extra = -(shared.free() - 40 * MiB - 700 * MiB)  # 700 MiB beyond the promise
    look(d)
    assert holes(data) == 0
    claimed = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.HOLES_CLAIMED
    ]
    assert len(claimed) == 1 and claimed[0].levelno == logging.WARNING
    assert claimed[0].journal_fields["CLAIMED_BYTES"] == str(40 * MiB)  # type: ignore[attr-defined]
    assert shared.free() == 700 * MiB  # taken from the host, for the pool: the same headroom


def test_metadata_holes_are_claimed_at_the_first_look(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """Item 6, metadata: an adopted sparse metadata file (Docker's 2 GiB) is allocated whole
    as soon as the watch sees it, however roomy the filesystem."""
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",))
    meta = tmp_path / "a.meta"
    punch(meta, 4 * MiB, 4 * MiB)  # as if the file had been made sparse
    d.space_watch.backing.changed(str(meta))
    look(d)
    assert holes(meta) == 0


def test_an_adopted_sparse_data_file_is_said_once_with_the_figures(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 6, data: a 2 GiB sparse data file (Docker's files, adopted as they are) is left
    sparse on a roomy filesystem, and said once: its holes, the free space, the margin."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    pool: dict[str, object] = {"preallocate": False, "data_size": "2GiB"}
    d, _ = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool=pool)
    look(d)
    look(d)
    said = [
        r
        for r in caplog.records
        if getattr(r, "journal_fields", {}).get("MESSAGE_ID") == MessageId.HOLES_LEFT
    ]
    assert len(said) == 1
    fields = said[0].journal_fields  # type: ignore[attr-defined]
    assert fields["HOLES_BYTES"] == str(2 * GiB) and "leaves them" in said[0].getMessage()
    assert holes(tmp_path / "a.data") == 2 * GiB


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EOPNOTSUPP])
def test_a_claim_that_fails_is_said_once_and_tried_again(
    fake: FakeKernel,
    kernel: Kernel,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    """A neighbour faster than the claim (ENOSPC), or a filesystem that cannot allocate: said
    once at err, with what the pool's writes there risk; tried again when the free space rises
    (not at every tick: that would look at every file there each time, and change nothing)."""
    pool: dict[str, object] = {"preallocate": False, "reserve": "64MiB"}
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool=pool)
    shared.extra = -(shared.free() - 100 * MiB)  # less free than the 64 MiB of holes + margin
    fake.faults.append(Fault("fallocate", code, times=None))
    look(d)
    calls = len(fake.calls)
    look(d)
    assert [c for c in fake.calls[calls:] if not c.startswith("statvfs")] == []  # no full look
    failed = [r for r in caplog.records if "cannot allocate" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert "EIO" in failed[0].getMessage()
    assert holes(tmp_path / "a.data") == 64 * MiB
    fake.faults.clear()
    shared.extra += 1 * MiB  # some room comes back
    look(d)
    assert holes(tmp_path / "a.data") == 0
    assert MessageId.HOLES_CLAIMED in message_ids(caplog)


def test_a_pool_refused_room_grows_as_soon_as_the_neighbour_gives_it_back(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The neighbour fills the filesystem: a's growth is refused (its writers wait). The
    neighbour deletes its file: the watch's next look sees the free space rise, and reports
    it, so the daemon reconciles a then, not at the next safety check."""
    pool: dict[str, object] = {"preallocate": True, "reserve": "64MiB"}
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool=pool)
    shared.extra = -(shared.free() - 32 * MiB)  # full to within the reserve
    to_mark(fake, d, "a")
    d.dm_events.check()
    assert d.pools["a"].state.refused_since is not None
    size = os.stat(tmp_path / "a.data").st_size
    assert look(d) == [False]
    shared.extra = 0  # the neighbour's file is gone
    assert look(d) == [True]
    d.scheduler.run_pass([m for m in d.pools.values() if m.state.refused_since is not None])
    assert os.stat(tmp_path / "a.data").st_size > size
    assert d.pools["a"].state.refused_since is None


def test_a_filesystem_with_room_to_spare_is_looked_at_rarely_a_tight_one_every_tick(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """The watch's cost: one statvfs per filesystem per look, and a roomy filesystem is looked
    at only as often as a neighbour at 2 GiB/s could take its headroom (here 10 s)."""
    pool: dict[str, object] = {"preallocate": True}
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a", "b"), pool=pool)
    watch = d.space_watch
    look(d)
    now = d.loop.time()
    assert watch.due(now + 1.0) == []
    assert len(watch.due(now + 10.0)) == 1
    shared.extra = -(shared.free() - 100 * MiB)  # tight
    statvfs = sum(c.startswith("statvfs") for c in fake.calls)
    look(d)
    assert sum(c.startswith("statvfs") for c in fake.calls) - statvfs == 1  # two pools, one fs
    assert len(watch.due(d.loop.time() + 0.2)) == 1


def test_claimed_room_is_never_counted_twice_by_a_growth_decided_meanwhile(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path
) -> None:
    """A claim and a growth on one filesystem: the growth decides on figures from before the
    claim or after it (one decision lock), never on a statvfs from before it and a file look
    from after it, which would count the claimed space as free twice."""
    pool: dict[str, object] = {
        "preallocate": False,
        "reserve": "0",
        "data": {"step": "16MiB", "step_percent": 0},
    }
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a", "b"), pool=pool)
    # 128 MiB of holes promised; 100 MiB beyond them: a claim, and then no room for both steps
    shared.extra = -(shared.free() - 128 * MiB - 24 * MiB)
    look(d)
    assert holes(tmp_path / "a.data") == holes(tmp_path / "b.data") == 0
    assert shared.free() == 24 * MiB
    to_mark(fake, d, "a")
    to_mark(fake, d, "b")
    d.dm_events.check()
    grown = sum(os.stat(tmp_path / f"{n}.data").st_size - 64 * MiB for n in "ab")
    assert grown <= 24 * MiB
    assert Bytes(shared.free()) >= 0


def test_claim_refuses_a_file_that_is_not_the_one_behind_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    os.truncate(path, 4 * MiB)
    st = os.stat(path)
    with pytest.raises(KernelError) as raised:
        Files().claim(str(path), (st.st_dev, st.st_ino + 1))
    assert raised.value.errno == errno.ESTALE
    assert Files().claim(str(path), (st.st_dev, st.st_ino)) == 4 * MiB
    assert holes(path) == 0


def test_an_over_promised_data_file_is_not_claimed_into_the_hosts_last_bytes(
    fake: FakeKernel, kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Docker's 100 GiB sparse file adopted on a /var with less free: claiming what fits would
    take every byte the host has left and still not hold the pool. Left alone, said once."""
    pool: dict[str, object] = {"preallocate": False, "data_size": "2GiB", "reserve": "64MiB"}
    d, shared = start(tmp_path, kernel, capacity=64 * GiB, names=("a",), pool=pool)
    shared.extra = -(shared.free() - 1 * GiB)  # 1 GiB free, 2 GiB of holes
    look(d)
    look(d)
    assert holes(tmp_path / "a.data") == 2 * GiB
    assert shared.free() == 1 * GiB
    said = [r for r in caplog.records if "take the host's last bytes" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
