"""The page cache's dirty counters (writeback.py) and the marks and early growths they drive."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from thinwatchd.base.errors import StatusParseError
from thinwatchd.base.units import Bytes, DataBlocks, MetaBlocks
from thinwatchd.config.settings import DataGrowth, PoolSettings
from thinwatchd.kernel.names import pool_name
from thinwatchd.policy.decide import Grow, NoAction, decide_data
from thinwatchd.policy.forecast import MAX_AMPLIFICATION, FillHistory
from thinwatchd.policy.fs_room import BackingFs
from thinwatchd.policy.low_water import (
    ADAPTIVE_CAP_BYTES,
    ADAPTIVE_MARGIN_BYTES,
    LULL_WRITEBACK_BYTES,
    low_water_mark,
    writeback_threatens,
)
from thinwatchd.policy.writeback import PAGE_BYTES, WritebackState, parse_writeback
from thinwatchd.thin.status import DiscardMode, NoSpacePolicy, PoolMode, ThinPoolWorkingStatus

MiB, GiB, TiB = 1024**2, 1024**3, 1024**4
BB = 64 * 1024

#: Excerpts of a Debian 6.1 guest's files (3 GiB, vm.dirty_ratio 20), in the kernel's format.
MEMINFO = """\
MemTotal:        3042736 kB
MemFree:         2480124 kB
MemAvailable:    2745020 kB
Buffers:           12188 kB
Cached:           354748 kB
Dirty:            204800 kB
Writeback:         65536 kB
AnonPages:         39004 kB
"""
VMSTAT = """\
nr_free_pages 620031
nr_dirty 51200
nr_writeback 16384
nr_written 1048576
nr_dirty_threshold 135000
nr_dirty_background_threshold 67416
pgpgin 411212
"""

TIGHT = PoolSettings(
    pool_name("p"),
    Path("/var/lib/d"),
    Path("/var/lib/m"),
    low_water_mark=DataBlocks(256),
    data=DataGrowth(step=Bytes(128 * MiB), step_percent=0.0),
)


def sample(dirty: int = 0, writeback: int = 0, limit: int = 512 * MiB) -> WritebackState:
    return WritebackState(dirty=dirty, writeback=writeback, dirty_limit=limit, written=0)


def status(used: int, total: int) -> ThinPoolWorkingStatus:
    return ThinPoolWorkingStatus(
        transaction_id=1,
        meta_used=MetaBlocks(200),
        meta_total=MetaBlocks(16384),
        data_used=DataBlocks(used),
        data_total=DataBlocks(total),
        held_root=None,
        mode=PoolMode.WRITE,
        discard=DiscardMode.PASSDOWN,
        no_space_policy=NoSpacePolicy.QUEUE,
        needs_check=False,
        metadata_low_watermark=MetaBlocks(1024),
    )


def fs_for(size: int) -> BackingFs:
    return BackingFs(
        free_bytes=Bytes(TiB),
        total_bytes=Bytes(2 * TiB),
        file_size=Bytes(size),
        file_allocated=Bytes(size),
    )


def test_parse_the_kernels_format() -> None:
    wb = parse_writeback(MEMINFO, VMSTAT)
    assert wb == WritebackState(
        dirty=204800 * 1024,
        writeback=65536 * 1024,
        dirty_limit=135000 * PAGE_BYTES,
        written=1048576 * PAGE_BYTES,
    )
    assert wb.pending == (204800 + 65536) * 1024
    assert wb.burst() == 135000 * PAGE_BYTES * 9 // 8  # the limit with balance_dirty_pages' slack


def test_parse_the_running_kernel() -> None:
    """This machine's own /proc has the same fields (the guest's are checked in tests/kernel)."""
    wb = parse_writeback(Path("/proc/meminfo").read_text(), Path("/proc/vmstat").read_text())
    assert wb.dirty_limit > 0 and wb.written >= 0 and wb.dirty >= 0


@pytest.mark.parametrize(
    ("meminfo", "vmstat"),
    [("", VMSTAT), (MEMINFO, ""), ("MemTotal: 1 kB\n", VMSTAT), (MEMINFO, "nr_dirty 1\n")],
)
def test_missing_counters_are_a_parse_error(meminfo: str, vmstat: str) -> None:
    with pytest.raises(StatusParseError):
        parse_writeback(meminfo, vmstat)


def test_more_pending_than_the_limit_is_the_burst() -> None:
    """After vm.dirty_ratio was lowered, more may be dirty than the new limit allows."""
    assert sample(dirty=900 * MiB, limit=100 * MiB).burst() == 900 * MiB


def test_mark_holds_the_whole_burst_from_the_start() -> None:
    """No growth measured yet, no fill rate: the mark already covers the dirty limit."""
    wb = sample(limit=512 * MiB)
    expected = -(-(512 * MiB * 9 // 8 + ADAPTIVE_MARGIN_BYTES) // BB)
    assert low_water_mark(TIGHT, DataBlocks(1024), FillHistory(), wb) == expected
    off = replace(TIGHT, data=replace(TIGHT.data, adaptive_low_water=False, threshold_percent=0))
    assert low_water_mark(off, DataBlocks(1024), FillHistory(), wb) == 256
    huge = sample(limit=64 * GiB)
    assert low_water_mark(TIGHT, DataBlocks(1024), FillHistory(), huge) == ADAPTIVE_CAP_BYTES // BB


def test_a_growth_leaves_twice_the_burst_free() -> None:
    """A 64 MiB pool with a 16 MiB configured mark grows at once to hold two bursts."""
    wb = sample(limit=512 * MiB)
    d = decide_data(status(100, 1024), TIGHT, fs_for(64 * MiB), FillHistory(), writeback=wb)
    assert isinstance(d, Grow), d
    assert d.new_size - 100 * BB >= 2 * 512 * MiB
    assert d.low_water_mark * BB >= 512 * MiB


def test_dirty_pages_that_would_cross_the_mark_grow_the_pool_early() -> None:
    wb = sample(limit=256 * MiB)
    total = 40000
    mark = low_water_mark(TIGHT, DataBlocks(total), FillHistory(), wb)
    used = total - (mark + 200 * MiB // BB)  # 200 MiB above the mark

    def decide(
        writeback: WritebackState, used: int = used, settings: PoolSettings = TIGHT
    ) -> object:
        return decide_data(
            status(used, total),
            settings,
            fs_for(total * BB),
            FillHistory(),
            table_mark=mark,
            writeback=writeback,
        )

    assert isinstance(decide(replace(wb, dirty=150 * MiB)), NoAction)
    burst = replace(wb, dirty=200 * MiB, writeback=10 * MiB)
    d = decide(burst)
    assert isinstance(d, Grow), d
    assert "dirty or under writeback" in d.reason
    # The same, with 60 MiB in flight: a growth now would wait for it; the next lull comes.
    draining = replace(burst, dirty=150 * MiB, writeback=60 * MiB)
    assert isinstance(decide(draining), NoAction)
    # At the mark itself nothing waits: the kernel's event came, the burst must fit now.
    assert isinstance(decide(draining, used=total - mark), Grow)
    # Off with the adaptive mark: only the configured mark and the kernel's event count.
    off = replace(TIGHT, data=replace(TIGHT.data, adaptive_low_water=False))
    assert isinstance(decide(burst, settings=off), NoAction)


def test_writeback_threatens() -> None:
    wb = sample(dirty=100 * MiB, writeback=LULL_WRITEBACK_BYTES)
    pending = 100 * MiB + LULL_WRITEBACK_BYTES
    assert writeback_threatens(Bytes(480 * MiB + pending), Bytes(480 * MiB), wb)
    assert not writeback_threatens(Bytes(480 * MiB + pending + 1), Bytes(480 * MiB), wb)
    assert not writeback_threatens(Bytes(10 * MiB), Bytes(480 * MiB), sample())  # nothing pending
    in_flight = replace(wb, writeback=LULL_WRITEBACK_BYTES + 1)
    assert not writeback_threatens(Bytes(480 * MiB), Bytes(480 * MiB), in_flight)  # wait for a lull


def test_amplification_is_measured_from_what_landed() -> None:
    """Small files allocate whole pool blocks: 24 MiB written back became 36 MiB of pool."""
    h = FillHistory().record_landing(100 * MiB, 1000 * MiB)
    assert h.amplification == 1.0
    assert h.record_landing(110 * MiB, 1008 * MiB) == h  # under 16 MiB landed: keep counting
    h = h.record_landing(136 * MiB, 1024 * MiB)
    assert h.amplification == (1.0 + 1.5) / 2 and h.landing == (136 * MiB, 1024 * MiB)
    # Other filesystems' writeback makes it read below 1: never below 1.
    assert h.record_landing(137 * MiB, 2024 * MiB).amplification >= 1.0
    # A direct writer beside the page cache makes it read high: capped.
    assert h.record_landing(10 * GiB, 1040 * MiB).amplification <= MAX_AMPLIFICATION
    # fstrim or a restart of the counters: start again.
    assert h.record_landing(50 * MiB, 2000 * MiB).landing == (50 * MiB, 2000 * MiB)


def test_amplified_writeback_threatens_earlier() -> None:
    wb = sample(dirty=100 * MiB)
    assert not writeback_threatens(Bytes(600 * MiB), Bytes(480 * MiB), wb)
    assert writeback_threatens(Bytes(600 * MiB), Bytes(480 * MiB), wb, amplification=1.25)
