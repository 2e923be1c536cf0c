"""What the engine relies on from the kernel, checked on the fake AND on the real kernel.

Each scenario runs twice: against FakeKernel (fast, everywhere) and against the real dm-thin
(marked `kernel`: in the VM test bed). If the fake drifts from the kernel, the pair disagrees.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.contract.backends import Backend, backend
from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes, DataBlocks, Sectors
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.names import pool_name
from thinwatchd.pool.bring_up import activate
from thinwatchd.pool.running import Pool, ensure_resumed
from thinwatchd.thin.status import PoolMode, ThinPoolWorkingStatus, parse_pool_status

MiB = 1024**2
BLOCKS = 256  # a 16 MiB pool of 64 KiB blocks


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.kernel)])
def be(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    with backend(request.param, tmp_path) as b:
        yield b


def make_pool(be: Backend, **changes: object) -> Pool:
    name = f"contract-{uuid.uuid4().hex[:6]}"
    settings = PoolSettings(
        name=pool_name(name),
        data_file=be.directory / f"{name}.data",
        metadata_file=be.directory / f"{name}.meta",
        data_size=Bytes(BLOCKS * 64 * 1024),
        metadata_size=Bytes(4 * MiB),
        low_water_mark=DataBlocks(16),
        reserve=Bytes(0),
    )
    settings = replace(settings, **changes)  # type: ignore[arg-type]
    if hasattr(be, "devices"):
        be.devices.append(name)
    pool = activate(settings, be.kernel)
    # activate() puts in the policy's mark; these scenarios want the configured one exactly
    pool.reload(be.kernel, pool.table.with_low_water_mark(DataBlocks(16)))
    be.thin(name)
    return pool


def status(be: Backend, pool: Pool) -> ThinPoolWorkingStatus:
    st = parse_pool_status(be.kernel.dm.status(pool.name)[0].params)
    assert isinstance(st, ThinPoolWorkingStatus)
    return st


def event_nr(be: Backend, pool: Pool) -> int:
    return {d.name: d.event_nr for d in be.kernel.dm.list_devices()}[pool.name]


def settle(be: Backend, pool: Pool, used: int) -> ThinPoolWorkingStatus:
    """Wait until the kernel reports used blocks (its status lags the bio by a little)."""
    deadline = time.monotonic() + 10
    while True:
        st = status(be, pool)
        if st.data_used >= used or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def grow(be: Backend, pool: Pool, new_size: int) -> None:
    os.truncate(pool.settings.data_file, new_size)
    be.kernel.loops.set_capacity(pool.data_loop)
    pool.reload(be.kernel)  # the length comes from the loop device


def test_table_length_is_the_pool_size(be: Backend) -> None:
    pool = make_pool(be)
    assert status(be, pool).data_total == BLOCKS
    (target,) = be.kernel.dm.table(pool.name)
    assert target.length == BLOCKS * 128


def test_low_water_event_fires_once_per_resume(be: Backend) -> None:
    pool = make_pool(be)
    be.kernel.dm.arm_poll()
    start = event_nr(be, pool)
    be.write_blocks(pool.name, 0, BLOCKS - 20)  # 20 free: above the mark of 16
    settle(be, pool, BLOCKS - 20)
    assert event_nr(be, pool) == start
    be.write_blocks(pool.name, BLOCKS - 20, 8)  # 12 free: crosses the mark
    settle(be, pool, BLOCKS - 12)
    assert event_nr(be, pool) == start + 1
    assert be.control_readable(5.0)
    be.kernel.dm.arm_poll()
    assert not be.control_readable(0.2)
    be.write_blocks(pool.name, BLOCKS - 12, 4)  # still below: no second event before a resume
    settle(be, pool, BLOCKS - 8)
    assert event_nr(be, pool) == start + 1
    pool.reload(be.kernel)  # resume re-arms it
    be.write_blocks(pool.name, BLOCKS - 8, 1)
    settle(be, pool, BLOCKS - 7)
    assert event_nr(be, pool) == start + 2
    assert be.control_readable(5.0)


def test_growth_steps_raise_the_total(be: Backend) -> None:
    pool = make_pool(be)
    grow(be, pool, 2 * BLOCKS * 64 * 1024)
    assert status(be, pool).data_total == 2 * BLOCKS
    info = be.kernel.dm.info(pool.name)
    assert info is not None and not info.suspended and not info.inactive_present


def test_a_table_longer_than_the_data_device_is_refused_at_resume(be: Backend) -> None:
    # Not at load: the kernel checks device areas when it swaps tables in (dm_swap_table), and
    # leaves the device suspended on its old table. ensure_resumed must resume it.
    pool = make_pool(be)
    be.kernel.dm.load_table(pool.name, [pool.target(Sectors(pool.length * 2))])
    with pytest.raises(KernelError) as caught:
        be.kernel.dm.resume(pool.name)
    assert caught.value.errno == errno.EINVAL
    assert pool.name in str(caught.value)
    info = be.kernel.dm.info(pool.name)
    assert info is not None and info.suspended and not info.inactive_present
    ensure_resumed(be.kernel, pool)
    info = be.kernel.dm.info(pool.name)
    assert info is not None and not info.suspended
    assert status(be, pool).data_total == BLOCKS
    assert be.write_blocks(pool.name, 0, 1) == 1


def test_a_shrink_is_refused_at_resume_and_the_longest_table_resumes_it(be: Backend) -> None:
    # What a reload from a stale cached length meets after someone else grew the pool: the
    # kernel swaps the short table in, refuses it at preresume ("pool target too small") and
    # leaves the device SUSPENDED with it. Every writer hangs until a valid table is resumed.
    pool = make_pool(be)
    be.write_blocks(pool.name, 0, 10)
    be.kernel.dm.load_table(pool.name, [pool.target(Sectors(pool.length // 2))])
    with pytest.raises(KernelError) as caught:
        be.kernel.dm.resume(pool.name)
    assert caught.value.errno == errno.EINVAL
    info = be.kernel.dm.info(pool.name)
    assert info is not None and info.suspended, "the refused table leaves the pool suspended"
    assert be.kernel.dm.table(pool.name)[0].length == pool.length // 2  # swapped in
    ensure_resumed(be.kernel, pool)
    info = be.kernel.dm.info(pool.name)
    assert info is not None and not info.suspended and not info.inactive_present
    assert be.kernel.dm.table(pool.name)[0].length == pool.length
    assert status(be, pool).data_total == BLOCKS
    assert be.write_blocks(pool.name, 10, 1) == 1


def test_a_plain_resume_of_a_pool_left_suspended_runs_its_preresume_again(be: Backend) -> None:
    # dm_resume() of a suspended device with no inactive table runs the active table's
    # preresume again: a resume "as it is" meets the same refusal, and the pool stays suspended
    # (what a failed growth's rollback meets while the kernel still refuses).
    pool = make_pool(be)
    be.kernel.dm.load_table(pool.name, [pool.target(Sectors(pool.length // 2))])
    with pytest.raises(KernelError):
        be.kernel.dm.resume(pool.name)
    with pytest.raises(KernelError) as caught:
        be.kernel.dm.resume(pool.name)  # no inactive table now: the active one's preresume
    assert caught.value.errno == errno.EINVAL
    info = be.kernel.dm.info(pool.name)
    assert info is not None and info.suspended and not info.inactive_present
    ensure_resumed(be.kernel, pool)
    info = be.kernel.dm.info(pool.name)
    assert info is not None and not info.suspended


def test_a_reload_after_someone_else_grew_the_pool_keeps_their_length(be: Backend) -> None:
    # An operator grows the pool by hand (truncate, losetup -c, dmsetup reload + resume); our
    # cached length is now short. The next reload must build on the live table, not the cache.
    pool = make_pool(be)
    stale = pool.length
    os.truncate(pool.settings.data_file, 3 * BLOCKS * 64 * 1024)
    be.kernel.loops.set_capacity(pool.data_loop)
    be.kernel.dm.load_table(pool.name, [pool.target(Sectors(2 * stale))])
    be.kernel.dm.resume(pool.name)
    assert pool.length == stale
    pool.reload(be.kernel, pool.table.with_low_water_mark(DataBlocks(20)))
    assert pool.length == 3 * stale  # the whole loop device: never shorter than theirs
    info = be.kernel.dm.info(pool.name)
    assert info is not None and not info.suspended
    assert status(be, pool).data_total == 3 * BLOCKS
    assert be.write_blocks(pool.name, 0, 1) == 1


def test_metadata_survives_the_device(be: Backend) -> None:
    pool = make_pool(be)
    be.write_blocks(pool.name, 0, 50)
    settle(be, pool, 50)
    thin = f"{pool.name}-thin"
    be.kernel.dm.remove(thin)
    be.kernel.dm.remove(pool.name)
    if hasattr(be, "devices"):
        be.devices.remove(thin)
    again = activate(pool.settings, be.kernel)
    assert status(be, again).data_used == 50


def test_out_of_data_space_queues_then_growth_resumes_writers(be: Backend) -> None:
    pool = make_pool(be)
    be.kernel.dm.arm_poll()
    writer = be.write_blocks_async(pool.name, 0, BLOCKS + 20)  # 20 more than fit
    deadline = time.monotonic() + 15
    while status(be, pool).mode is not PoolMode.OUT_OF_DATA_SPACE:
        assert time.monotonic() < deadline, status(be, pool)
        time.sleep(0.05)
    before = event_nr(be, pool)
    grow(be, pool, 2 * BLOCKS * 64 * 1024)
    writer.join(15)
    assert not writer.is_alive()
    st = settle(be, pool, BLOCKS + 20)
    assert st.data_used == BLOCKS + 20
    assert st.mode is PoolMode.WRITE
    assert event_nr(be, pool) > before  # the mode change back to write is an event too


def test_error_if_no_space_fails_writes(be: Backend) -> None:
    pool = make_pool(be)
    table = pool.table.with_no_space_policy(pool.table.no_space_policy.ERROR)
    pool.reload(be.kernel, table)
    written = be.write_blocks(pool.name, 0, BLOCKS + 5)
    assert written == BLOCKS
    st = status(be, pool)
    assert st.mode is PoolMode.OUT_OF_DATA_SPACE and st.no_space_policy.value == "error_if_no_space"


def test_metadata_growth_needs_a_reload(be: Backend) -> None:
    pool = make_pool(be)
    before = status(be, pool).meta_total
    os.truncate(pool.settings.metadata_file, 8 * MiB)
    be.kernel.loops.set_capacity(pool.meta_loop)
    assert status(be, pool).meta_total == before  # the kernel reads the size at resume only
    pool.reload(be.kernel)
    assert status(be, pool).meta_total == 8 * MiB // 4096
