"""The growth policy: every rule and refusal, properties, and the fill scenarios of issue 3."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwatchd.base.units import Bytes, DataBlocks, MetaBlocks
from thinwatchd.config.settings import (
    METADATA_MAX_BYTES,
    DataGrowth,
    MetadataGrowth,
    NoSpaceSettings,
    PoolSettings,
)
from thinwatchd.kernel.names import pool_name
from thinwatchd.policy.decide import (
    Decision,
    Grow,
    GrowthTarget,
    NoAction,
    RefusalReason,
    Refuse,
    decide_data,
    decide_metadata,
    describe,
    no_space_mode,
    parting_room,
)
from thinwatchd.policy.forecast import FillHistory, FullIn, full_in, seconds_until
from thinwatchd.policy.fs_room import BackingFs
from thinwatchd.policy.low_water import (
    ADAPTIVE_CAP_BYTES,
    ADAPTIVE_MARGIN_BYTES,
    ASSUMED_GROWTH_SECONDS,
    MAX_PLANNED_GROWTH_SECONDS,
    SAFETY_FACTOR,
    low_water_mark,
)
from thinwatchd.thin.status import (
    DiscardMode,
    NoSpacePolicy,
    PoolMode,
    ThinPoolErrored,
    ThinPoolFailed,
    ThinPoolWorkingStatus,
)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4
BB = 64 * KiB  # default data block: 128 sectors

#: Docker 0.7's loopback pool: 100 GiB sparse data, 2 GiB metadata, mark 32768 blocks (2 GiB).
POOL = PoolSettings(
    pool_name("docker-pool"),
    Path("/var/lib/data"),
    Path("/var/lib/meta"),
    data_size=Bytes(100 * GiB),
    metadata_size=Bytes(2 * GiB),
    low_water_mark=DataBlocks(32768),
    preallocate=False,
)
NO_HISTORY = FillHistory()


def pool(**changes: object) -> PoolSettings:
    return replace(POOL, **changes)  # type: ignore[arg-type]


def status(
    used: int = 0,
    total: int = 1024,
    *,
    meta_used: int = 200,
    meta_total: int = 16384,
    mode: PoolMode = PoolMode.WRITE,
    needs_check: bool = False,
    watermark: int | None = 1024,
) -> ThinPoolWorkingStatus:
    return ThinPoolWorkingStatus(
        transaction_id=1,
        meta_used=MetaBlocks(meta_used),
        meta_total=MetaBlocks(meta_total),
        data_used=DataBlocks(used),
        data_total=DataBlocks(total),
        held_root=None,
        mode=mode,
        discard=DiscardMode.PASSDOWN,
        no_space_policy=NoSpacePolicy.QUEUE,
        needs_check=needs_check,
        metadata_low_watermark=None if watermark is None else MetaBlocks(watermark),
    )


def fs_for(
    size: int, *, free: int = 1 * TiB, allocated: int | None = None, **kw: object
) -> BackingFs:
    """A filesystem holding a file of size bytes (fully written unless allocated says otherwise)."""
    fields: dict[str, object] = {"total_bytes": 2 * TiB, "path": "/var"} | kw
    return BackingFs(
        free_bytes=Bytes(free),
        file_size=Bytes(size),
        file_allocated=Bytes(size if allocated is None else allocated),
        **fields,  # type: ignore[arg-type]
    )


def writer(rate: float, seconds: float = 10.0, growth: float | None = 0.1) -> FillHistory:
    """A history of a writer filling at rate bytes/s for seconds."""
    h = FillHistory(growth_seconds=growth)
    for i in range(11):
        h = h.record(i * seconds / 10, int(i * rate * seconds / 10))
    return h


def grow(d: Decision) -> Grow:
    assert isinstance(d, Grow), describe(d)
    return d


def refuse(d: Decision, reason: RefusalReason) -> Refuse:
    assert isinstance(d, Refuse), describe(d)
    assert d.reason is reason, d
    return d


# --- data: when to act ------------------------------------------------------------------------

GiB_BLOCKS = GiB // BB


@pytest.mark.parametrize(
    ("settings_", "st_", "acts", "why"),
    [
        # Docker defaults (mark 32768 blocks = 2 GiB) on a 64 MiB pool: the mark exceeds the pool.
        (POOL, status(0, 1024), True, "low-water mark 2.0GiB"),
        (POOL, status(0, 3 * GiB_BLOCKS), True, "low-water mark"),  # 3 GiB free > 2 GiB? no: 3
        (POOL, status(0, 10 * GiB_BLOCKS), False, "above the mark of 2.0GiB"),
        (POOL, status(8 * GiB_BLOCKS, 10 * GiB_BLOCKS), True, "usage 80.0% >= 80%"),
        (POOL, status(7 * GiB_BLOCKS, 10 * GiB_BLOCKS), False, "above the mark"),
        (pool(low_water_mark=0), status(81, 100), True, "usage 81.0% >= 80%"),
        (pool(low_water_mark=0), status(79, 100), False, "above the mark"),
        (pool(low_water_mark=0, data=DataGrowth(threshold_percent=0)), status(99, 100), False, ""),
        (pool(low_water_mark=0), status(100, 100, mode=PoolMode.OUT_OF_DATA_SPACE), True, "out of"),
    ],
)
def test_when_data_grows(
    settings_: PoolSettings, st_: ThinPoolWorkingStatus, acts: bool, why: str
) -> None:
    if st_.data_total == 3 * GiB_BLOCKS:  # 3 GiB free is above a 2 GiB mark
        acts, why = False, "above the mark"
    d = decide_data(st_, settings_, fs_for(st_.data_total * BB), NO_HISTORY)
    assert isinstance(d, Grow if acts else NoAction), describe(d)
    assert why in describe(d)


def test_a_spent_event_is_never_ignored() -> None:
    """The kernel sent its one event for this resume at the table's mark: act, or none comes."""
    total = 100 * GiB_BLOCKS
    s = status(total - 42000, total)  # 2.6 GiB free: above the 2 GiB mark, under 99%
    fs = fs_for(total * BB)
    settings_ = pool(data=DataGrowth(threshold_percent=99))
    assert isinstance(decide_data(s, settings_, fs, NO_HISTORY), NoAction)
    d = grow(decide_data(s, settings_, fs, NO_HISTORY, table_mark=DataBlocks(50000)))
    assert "low-water mark 3.1GiB" in d.reason


# --- data: how much ---------------------------------------------------------------------------


def test_docker_defaults_first_growth_leaves_twice_the_mark() -> None:
    d = grow(decide_data(status(0, 1024), POOL, fs_for(64 * MiB), NO_HISTORY))
    assert (d.target, d.old_size, d.new_size, d.low_water_mark) == (
        "data",
        64 * MiB,
        4 * GiB,
        32768,
    )
    assert d.limited_by is None


def test_step_and_step_percent() -> None:
    small = pool(low_water_mark=0)
    d = grow(decide_data(status(81, 100), small, fs_for(100 * BB), NO_HISTORY))
    assert d.new_size == 100 * BB + GiB  # step (1 GiB) beats 20% and the threshold margin
    big = status(80 * 16384, 100 * 16384)  # 100 GiB pool at 80%
    d = grow(decide_data(big, small, fs_for(100 * GiB), NO_HISTORY))
    # 20% would give 120 GiB (66.7% used); twice the threshold's 20% free needs <= 60% used.
    assert d.new_size == pytest.approx(80 * GiB / 0.6, abs=BB)
    wide = pool(low_water_mark=0, data=DataGrowth(step_percent=50))
    d = grow(decide_data(big, wide, fs_for(100 * GiB), NO_HISTORY))
    assert d.new_size == 150 * GiB


def test_fill_during_growth_is_added() -> None:
    h = writer(rate=500 * MiB, growth=2.0)
    settings_ = pool(data=DataGrowth(adaptive_low_water=False))
    d = grow(decide_data(status(0, 1024), settings_, fs_for(64 * MiB), h))
    assert d.new_size >= 4 * GiB + 1000 * MiB


def test_interrupted_growth_file_already_larger() -> None:
    d = grow(decide_data(status(0, 1024), POOL, fs_for(5 * GiB, allocated=0), NO_HISTORY))
    assert d.old_size == 5 * GiB
    assert d.new_size > 5 * GiB


def test_odd_file_size_rounds_to_blocks() -> None:
    d = grow(decide_data(status(0, 1024), POOL, fs_for(64 * MiB + 1), NO_HISTORY))
    assert d.new_size % BB == 0
    assert d.new_size > 64 * MiB + 1


# --- data: limits ----------------------------------------------------------------------------


def test_max_size_clamps_then_refuses() -> None:
    capped = pool(data=DataGrowth(max_size=Bytes(1 * GiB + 1000)))
    d = grow(decide_data(status(0, 1024), capped, fs_for(64 * MiB), NO_HISTORY))
    assert (d.new_size, d.limited_by) == (GiB, RefusalReason.AT_MAX_SIZE)
    assert "limited by its maximum size" in describe(d)
    full = status(GiB_BLOCKS - 10, GiB_BLOCKS)
    r = refuse(decide_data(full, capped, fs_for(GiB), NO_HISTORY), RefusalReason.AT_MAX_SIZE)
    assert r.is_capacity
    assert describe(r) == "cannot grow data of docker-pool: data is 1.0GiB, at its limit of 1.0GiB"


def test_backing_filesystem_full() -> None:
    fs = fs_for(64 * MiB, free=int(1.2 * GiB), promised_elsewhere=int(0.2 * GiB))
    r = refuse(decide_data(status(1000, 1024), POOL, fs, NO_HISTORY), RefusalReason.BACKING_FS_FULL)
    assert r.is_capacity
    assert describe(r) == (
        "cannot grow data of docker-pool: backing filesystem /var has 1.2GiB free, reserve "
        "1.0GiB, 204.8MiB promised to sparse files: no room for even 64.0KiB more"
    )


def test_partial_growth_when_the_full_one_does_not_fit() -> None:
    fs = fs_for(64 * MiB, free=3 * GiB)
    d = grow(decide_data(status(1000, 1024), POOL, fs, NO_HISTORY))
    assert d.limited_by is RefusalReason.BACKING_FS_FULL
    # Short of room (2 GiB above the 1 GiB reserve): one mark (2 GiB) free, not all there is.
    assert d.new_size == 1000 * BB + 2 * GiB < 64 * MiB + 2 * GiB
    assert "limited by the backing filesystem" in describe(d)


def test_pools_short_of_room_on_one_filesystem_each_get_their_mark_not_the_first_all() -> None:
    """Issue 18's kernel test: room came back (221 MiB) to two pools out of data space, each
    needing about 70 MiB; the first took all of it and the second was switched to
    error_if_no_space, its writers to EIO. Each now takes one mark's worth free."""
    settings = pool(
        low_water_mark=DataBlocks(512),  # 32 MiB
        data=DataGrowth(step=Bytes(128 * MiB), step_percent=0.0, adaptive_low_water=False),
    )
    room = 221 * MiB
    fs = fs_for(336 * MiB, free=1 * GiB + room)
    first = grow(decide_data(status(336 * 16, 336 * 16), settings, fs, NO_HISTORY))
    assert first.limited_by is RefusalReason.BACKING_FS_FULL
    taken = first.new_size - first.old_size
    assert taken == 32 * MiB  # one mark free
    fs = fs_for(336 * MiB, free=1 * GiB + room - taken)
    second = grow(decide_data(status(336 * 16, 336 * 16), settings, fs, NO_HISTORY))
    assert second.new_size - second.old_size == 32 * MiB


def test_sparse_promises_count_as_used() -> None:
    # 10 GiB apparent, 1 GiB written: 9 GiB may still land on a filesystem with 8 GiB free.
    fs = fs_for(10 * GiB, free=8 * GiB, allocated=GiB)
    s = status(9 * GiB_BLOCKS, 10 * GiB_BLOCKS)
    r = refuse(decide_data(s, POOL, fs, NO_HISTORY), RefusalReason.BACKING_FS_FULL)
    assert "9.0GiB promised to sparse files" in r.detail
    # ...and the metadata file's promise on the same filesystem counts too.
    fs = fs_for(10 * GiB, free=12 * GiB, allocated=9 * GiB, promised_elsewhere=11 * GiB)
    refuse(decide_data(s, POOL, fs, NO_HISTORY), RefusalReason.BACKING_FS_FULL)


def test_reserve_percent() -> None:
    settings_ = pool(reserve_percent=5.0)  # 5% of 2 TiB = 102.4 GiB
    fs = fs_for(64 * MiB, free=100 * GiB)
    refuse(
        decide_data(status(1000, 1024), settings_, fs, NO_HISTORY), RefusalReason.BACKING_FS_FULL
    )
    assert fs.reserve(settings_) == pytest.approx(0.05 * 2 * TiB, abs=1)


# --- data: pool states -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("st_", "reason", "detail"),
    [
        (ThinPoolFailed(), RefusalReason.FAILED, "status 'Fail'"),
        (ThinPoolErrored(), RefusalReason.ERRORED, "status 'Error'"),
        (status(1000, 1024, needs_check=True), RefusalReason.NEEDS_CHECK, "thin_check"),
        (status(1000, 1024, mode=PoolMode.READ_ONLY), RefusalReason.READ_ONLY, "read-only"),
        (
            status(1000, 1024, mode=PoolMode.READ_ONLY, meta_used=16384),
            RefusalReason.READ_ONLY,
            "out of metadata space",
        ),
        (
            status(1024, 1024, mode=PoolMode.OUT_OF_DATA_SPACE, needs_check=True),
            RefusalReason.NEEDS_CHECK,
            "needs_check",
        ),
    ],
)
def test_data_refusals(st_: object, reason: RefusalReason, detail: str) -> None:
    r = refuse(decide_data(st_, POOL, fs_for(64 * MiB), NO_HISTORY), reason)  # type: ignore[arg-type]
    assert detail in r.detail
    assert not r.is_capacity


def test_broken_pool_with_room_needs_nothing() -> None:
    s = status(0, 100 * GiB_BLOCKS, needs_check=True, mode=PoolMode.READ_ONLY)
    assert isinstance(decide_data(s, POOL, fs_for(100 * GiB), NO_HISTORY), NoAction)


# --- the adaptive mark -----------------------------------------------------------------------


def test_mark_without_history_is_the_configured_one() -> None:
    assert low_water_mark(POOL, DataBlocks(1024)) == 32768
    # 80% threshold: 200 free
    assert low_water_mark(pool(low_water_mark=10), DataBlocks(1000)) == 200
    off = pool(low_water_mark=10, data=DataGrowth(threshold_percent=0))
    assert low_water_mark(off, DataBlocks(1000)) == 10


def test_mark_follows_fill_rate_and_growth_time() -> None:
    settings_ = pool(low_water_mark=0, data=DataGrowth(threshold_percent=0))
    h = writer(rate=200 * MiB, growth=1.5)
    expected = -(-(200 * MiB * 1.5 * SAFETY_FACTOR + ADAPTIVE_MARGIN_BYTES) // BB)
    assert low_water_mark(settings_, DataBlocks(1024), h) == expected
    unmeasured = replace(h, growth_seconds=None)
    assert low_water_mark(settings_, DataBlocks(1024), unmeasured) == -(
        -(200 * MiB * ASSUMED_GROWTH_SECONDS * SAFETY_FACTOR + ADAPTIVE_MARGIN_BYTES) // BB
    )
    # The configured mark stays the floor; adaptive can be switched off.
    assert low_water_mark(pool(data=DataGrowth(threshold_percent=0)), DataBlocks(1024), h) == 32768
    off = pool(low_water_mark=5, data=DataGrowth(threshold_percent=0, adaptive_low_water=False))
    assert low_water_mark(off, DataBlocks(1024), h) == 5


def test_mark_holds_the_filling_while_no_daemon_watches() -> None:
    """A daemon killed (SIGKILL, OOM) leaves a filling pool unwatched until the next one is up:
    the mark holds that long at the measured rate, when longer than the growths' cover."""
    settings_ = pool(low_water_mark=0, data=DataGrowth(threshold_percent=0))
    h = writer(rate=200 * MiB, growth=0.1)
    covered = low_water_mark(settings_, DataBlocks(1024), h)
    assert low_water_mark(settings_, DataBlocks(1024), h, unwatched_seconds=0.2) == covered
    crash = low_water_mark(settings_, DataBlocks(1024), h, unwatched_seconds=3.6)
    assert crash == -(-(200 * MiB * 3.6 + ADAPTIVE_MARGIN_BYTES) // BB)
    # No rate measured, or adaptive off: nothing to hold.
    assert low_water_mark(settings_, DataBlocks(1024), NO_HISTORY, unwatched_seconds=60) == 0
    off = pool(low_water_mark=5, data=DataGrowth(threshold_percent=0, adaptive_low_water=False))
    assert low_water_mark(off, DataBlocks(1024), h, unwatched_seconds=60) == 5
    # decide_data carries it into the table and the growth's size.
    d = grow(
        decide_data(status(1000, 1024), settings_, fs_for(1024 * BB), h, unwatched_seconds=3.6)
    )
    assert d.low_water_mark >= crash


def test_adaptive_mark_is_capped() -> None:
    settings_ = pool(low_water_mark=0)
    h = writer(rate=100 * GiB, growth=30.0)  # a glitch: a growth stalled for 30 s
    assert low_water_mark(settings_, DataBlocks(1024), h) == ADAPTIVE_CAP_BYTES // BB
    # the floor is the user's
    assert low_water_mark(pool(low_water_mark=10**9), DataBlocks(1024), h) == 10**9


def test_a_stalled_growth_does_not_balloon_the_next() -> None:
    """A growth that waited 60 s behind a frozen filesystem plans the next one as if it had
    taken MAX_PLANNED_GROWTH_SECONDS: seen once as 64 MiB -> 7.8 GiB at 100 MiB/s."""
    settings_ = pool(
        low_water_mark=16, data=DataGrowth(step=Bytes(64 * MiB), adaptive_low_water=False)
    )
    stalled = writer(100 * MiB, growth=60.0)
    capped = replace(stalled, growth_seconds=MAX_PLANNED_GROWTH_SECONDS)
    now = status(1020, 1024)
    d = grow(decide_data(now, settings_, fs_for(64 * MiB), stalled))
    assert d == grow(decide_data(now, settings_, fs_for(64 * MiB), capped))
    assert d.new_size <= 64 * MiB + 100 * MiB * MAX_PLANNED_GROWTH_SECONDS + 64 * MiB


def test_fast_writer_gets_a_bigger_growth() -> None:
    settings_ = pool(low_water_mark=0)
    d = grow(
        decide_data(status(900, 1024), settings_, fs_for(64 * MiB), writer(2 * GiB, growth=1.0))
    )
    assert d.new_size > 16 * GiB  # twice a mark covering 4 growths of 1 s at 2 GiB/s
    assert d.low_water_mark * BB > 8 * GiB


# --- fill history ----------------------------------------------------------------------------


def test_fill_rate() -> None:
    assert FillHistory().fill_rate() is None
    assert FillHistory().record(0.0, 0).fill_rate() is None
    assert FillHistory().record(0.0, 0).record(0.1, 10 * MiB).fill_rate() is None  # too short
    assert FillHistory().record(0.0, 0).record(1.0, 10 * MiB).fill_rate() == 10 * MiB
    assert FillHistory().record(0.0, 10 * MiB).record(1.0, 0).fill_rate() == 0.0  # discards
    # A burst that just started shows at once, not averaged over the window.
    h = FillHistory().record(0.0, 0).record(30.0, 0).record(31.0, 100 * MiB)
    assert h.fill_rate() == 100 * MiB


def test_history_window() -> None:
    h = FillHistory()
    for t in range(200):
        h = h.record(float(t), t * MiB)
    assert h.samples[0][0] >= 199 - 60
    assert len(h.samples) <= 64
    h = h.record(10.0, 0)  # the clock went backwards: nothing later than now is kept
    assert h.samples == ((10.0, 0),)
    assert h.record_growth(0.09).growth_seconds == 0.09


# --- metadata --------------------------------------------------------------------------------


def test_metadata_idle() -> None:
    d = decide_metadata(status(meta_used=200), POOL, fs_for(64 * MiB), NO_HISTORY)
    assert isinstance(d, NoAction)
    assert "metadata free of 64.0MiB" in describe(d)


@pytest.mark.parametrize(
    ("st_", "why"),
    [
        (status(meta_used=15500, meta_total=16384, watermark=1024), "<= 4.0MiB"),
        (status(meta_used=12300, meta_total=16384), "metadata usage 75.1% >= 75%"),
        (status(meta_used=60, meta_total=64, watermark=None), "<= 64.0KiB"),  # a quarter of 64
        (status(meta_used=16384, meta_total=16384, mode=PoolMode.READ_ONLY), "0B metadata free"),
    ],
)
def test_metadata_grows(st_: ThinPoolWorkingStatus, why: str) -> None:
    size = st_.meta_total * 4096
    d = grow(decide_metadata(st_, POOL, fs_for(size), NO_HISTORY))
    assert why in d.reason
    assert d.new_size == size + max(256 * MiB, size // 2)
    assert d.low_water_mark == low_water_mark(POOL, st_.data_total)


def test_metadata_kernel_maximum() -> None:
    near = METADATA_MAX_BYTES // 4096 - 100
    s = status(meta_used=near - 50, meta_total=near)
    d = grow(decide_metadata(s, POOL, fs_for(near * 4096), NO_HISTORY))
    assert (d.new_size, d.limited_by) == (METADATA_MAX_BYTES, RefusalReason.AT_MAX_SIZE)
    at = METADATA_MAX_BYTES // 4096
    s = status(meta_used=at - 50, meta_total=at)
    r = refuse(decide_metadata(s, POOL, fs_for(at * 4096), NO_HISTORY), RefusalReason.AT_MAX_SIZE)
    assert "the most the kernel can use" in r.detail


def test_metadata_max_size_and_filesystem() -> None:
    s = status(meta_used=16000, meta_total=16384)
    capped = pool(metadata=MetadataGrowth(max_size=Bytes(64 * MiB)))
    refuse(decide_metadata(s, capped, fs_for(64 * MiB), NO_HISTORY), RefusalReason.AT_MAX_SIZE)
    r = decide_metadata(s, POOL, fs_for(64 * MiB, free=GiB), NO_HISTORY)
    refuse(r, RefusalReason.BACKING_FS_FULL)


@pytest.mark.parametrize(
    ("st_", "reason"),
    [
        (ThinPoolFailed(), RefusalReason.FAILED),
        (ThinPoolErrored(), RefusalReason.ERRORED),
        (status(meta_used=16000, meta_total=16384, needs_check=True), RefusalReason.NEEDS_CHECK),
        (
            status(meta_used=16000, meta_total=16384, mode=PoolMode.READ_ONLY),
            RefusalReason.READ_ONLY,
        ),
    ],
)
def test_metadata_refusals(st_: object, reason: RefusalReason) -> None:
    refuse(decide_metadata(st_, POOL, fs_for(64 * MiB), NO_HISTORY), reason)  # type: ignore[arg-type]


# --- no-space mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings_", "since", "now", "expected"),
    [
        (POOL, None, 100.0, NoSpacePolicy.QUEUE),
        (POOL, 50.0, 100.0, NoSpacePolicy.QUEUE),
        (POOL, 40.0, 100.0, NoSpacePolicy.ERROR),
        (pool(when_full=NoSpaceSettings(error_after=None)), 0.0, 1e9, NoSpacePolicy.QUEUE),
        (pool(when_full=NoSpaceSettings(error_after=0)), 5.0, 5.0, NoSpacePolicy.ERROR),
        (pool(features=("error_if_no_space",)), None, 0.0, NoSpacePolicy.ERROR),
    ],
)
def test_no_space_mode(
    settings_: PoolSettings, since: float | None, now: float, expected: NoSpacePolicy
) -> None:
    assert no_space_mode(settings_, since, now) is expected


# --- describe --------------------------------------------------------------------------------


def test_describe() -> None:
    assert describe(NoAction("p", GrowthTarget.DATA, "fine")) == "data of p needs no growth: fine"
    g = Grow(
        "p", GrowthTarget.METADATA, Bytes(64 * MiB), Bytes(320 * MiB), DataBlocks(32768), "why"
    )
    assert describe(g) == (
        "growing metadata of p from 64.0MiB to 320.0MiB (+256.0MiB): why; "
        "low-water mark 32768 blocks"
    )
    r = Refuse("p", GrowthTarget.DATA, RefusalReason.FAILED, "broken")
    assert describe(r) == "cannot grow data of p: broken"


# --- properties ------------------------------------------------------------------------------

blocks = st.sampled_from([128, 256, 1024, 2048])


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[ThinPoolWorkingStatus, PoolSettings, BackingFs, FillHistory, int]:
    bs = draw(blocks)
    bb = bs * 512
    total = draw(st.integers(1, 2**24))
    used = draw(st.integers(0, total))
    meta_total = draw(st.integers(1, METADATA_MAX_BYTES // 4096))
    mode = draw(st.sampled_from([PoolMode.WRITE, PoolMode.OUT_OF_DATA_SPACE, PoolMode.READ_ONLY]))
    s = replace(
        status(used, total, meta_used=draw(st.integers(0, meta_total)), meta_total=meta_total),
        mode=mode,
        needs_check=draw(st.booleans()),
        metadata_low_watermark=draw(st.none() | st.integers(0, 1024).map(MetaBlocks)),
    )
    pct = st.floats(0, 100)
    settings_ = pool(
        data_block_size=bs,
        low_water_mark=draw(st.integers(0, 2**20)),
        reserve=draw(st.integers(0, 4 * GiB)),
        reserve_percent=draw(pct),
        data=DataGrowth(
            threshold_percent=draw(pct),
            step=Bytes(draw(st.integers(0, 8 * GiB))),
            step_percent=draw(pct),
            max_size=draw(st.none() | st.integers(0, 2**50).map(Bytes)),
            adaptive_low_water=draw(st.booleans()),
        ),
        metadata=MetadataGrowth(
            threshold_percent=draw(pct),
            step=Bytes(draw(st.integers(0, GiB))),
            step_percent=draw(pct),
            max_size=Bytes(draw(st.integers(0, 2 * METADATA_MAX_BYTES))),
        ),
    )
    data_size = total * bb + draw(st.integers(0, 2 * bb))
    fs = BackingFs(
        free_bytes=Bytes(draw(st.integers(0, 2**50))),
        total_bytes=Bytes(draw(st.integers(0, 2**51))),
        file_size=Bytes(data_size),
        file_allocated=Bytes(draw(st.integers(0, data_size + bb))),
        promised_elsewhere=Bytes(draw(st.integers(0, 2**40))),
    )
    h = FillHistory(growth_seconds=draw(st.none() | st.floats(0, 60)))
    for t in sorted(draw(st.lists(st.floats(0, 120), max_size=5))):
        h = h.record(t, draw(st.integers(0, used * bb)))
    return s, settings_, fs, h, draw(st.integers(0, 2**24))


def check_grow(d: Grow, fs: BackingFs, settings_: PoolSettings, unit: int, cap: int | None) -> None:
    assert d.new_size > d.old_size >= fs.file_size - unit  # never shrinks
    assert d.new_size > fs.file_size
    assert d.new_size % unit == 0
    if cap is not None:
        assert d.new_size <= cap
    growth = d.new_size - fs.file_size
    assert fs.promised() + growth <= fs.free_bytes - fs.reserve(settings_)


@settings(max_examples=400)
@given(situations())
def test_data_policy_properties(
    case: tuple[ThinPoolWorkingStatus, PoolSettings, BackingFs, FillHistory, int],
) -> None:
    s, settings_, fs, h, table_mark = case
    bb = settings_.data_block_size * 512
    d = decide_data(s, settings_, fs, h, DataBlocks(table_mark))
    if isinstance(d, Grow):
        assert d.old_size >= s.data_total * bb
        check_grow(d, fs, settings_, bb, settings_.data.max_size)
        new_blocks = d.new_size // bb
        assert d.low_water_mark == low_water_mark(settings_, DataBlocks(new_blocks), h)
        assert d.low_water_mark >= settings_.low_water_mark
        if d.limited_by is None:
            # Room allowed: the event stays quiet and the re-check after the resume is content.
            assert new_blocks - s.data_used > d.low_water_mark
            after = replace(s, data_total=DataBlocks(new_blocks), mode=PoolMode.WRITE)
            again = decide_data(
                after, settings_, replace(fs, file_size=d.new_size), h, d.low_water_mark
            )
            assert isinstance(again, NoAction), describe(again)
    if s.needs_check or s.mode is PoolMode.READ_ONLY:
        assert not isinstance(d, Grow)
    assert describe(d)


@settings(max_examples=400)
@given(situations())
def test_metadata_policy_properties(
    case: tuple[ThinPoolWorkingStatus, PoolSettings, BackingFs, FillHistory, int],
) -> None:
    s, settings_, fs, h, _ = case
    fs = replace(fs, file_size=Bytes(s.meta_total * 4096))
    d = decide_metadata(s, settings_, fs, h)
    if isinstance(d, Grow):
        cap = min(settings_.metadata.max_size, METADATA_MAX_BYTES)
        check_grow(d, fs, settings_, 4096, cap)
        assert not s.needs_check
        assert s.mode is not PoolMode.READ_ONLY or s.out_of_metadata_space
    assert describe(d)


# --- the fill scenarios (issue 3, "Done when") -----------------------------------------------


def simulate(
    write: int,
    settings_: PoolSettings = POOL,
    *,
    initial: int = 64 * MiB,
    rate: float = 175 * MiB,
    growth: float = 0.093,
    react: float = 0.002,
) -> tuple[list[str], list[int]]:
    """Run a direct writer against a model of dm-thin and a daemon driven by the policy.

    The kernel: one event per resume when free <= the table's mark; out of space at 0 free. The
    daemon: checks at startup (before the writer starts: it reports ready after), on each event,
    every 10 s and after every resume; a growth takes `growth` seconds with the writer running on.
    Return the decision log and, per out-of-space episode, how many growths had completed since
    the writer started.
    """
    bb = settings_.data_block_size * 512
    per_block = bb / rate
    total, used, t, grown = initial // bb, 0, 0.0, 0
    episodes: list[int] = []
    log: list[str] = []
    h, size = FillHistory(), initial
    mark = low_water_mark(settings_, DataBlocks(total), h)
    armed, event_at, next_check = True, None, 10.0

    def check() -> Decision:
        nonlocal h
        h = h.record(t, used * bb)
        fs = BackingFs(Bytes(1 * TiB), Bytes(2 * TiB), Bytes(size), Bytes(used * bb))
        mode = PoolMode.OUT_OF_DATA_SPACE if used >= total else PoolMode.WRITE
        d = decide_data(replace(status(used, total), mode=mode), settings_, fs, h, mark)
        log.append(f"{t:7.3f}s {used * bb / MiB:7.1f}MiB written: {describe(d)}")
        return d

    def resume(d: Grow) -> None:
        nonlocal size, total, mark, armed, h, grown
        size, total, mark, armed = d.new_size, d.new_size // bb, d.low_water_mark, True
        h, grown = h.record_growth(growth), grown + 1

    d: Decision | None = check()
    while isinstance(d, Grow):  # startup: the writer waits for the daemon to be ready
        t += growth
        resume(d)
        d = check()
    grown = 0  # count growths while writing
    while True:
        if isinstance(d, Grow):
            end = t + growth
            while used < write // bb and t + per_block <= end:
                if used >= total:
                    episodes.append(grown)
                    break
                used, t = used + 1, t + per_block
            t = max(t, end)
            resume(d)
            d = check()  # re-read the status after every resume
            continue
        d = None
        if used >= write // bb:
            return log, episodes
        if used >= total:
            episodes.append(grown)
            t = event_at if event_at is not None else next_check
        else:
            used, t = used + 1, t + per_block
            if armed and total - used <= mark:
                armed, event_at = False, t + react
        if event_at is not None and t >= event_at:
            event_at, d = None, check()
        elif t >= next_check:
            next_check, d = next_check + 10.0, check()


def growths(log: list[str]) -> int:
    return sum(" growing data " in line for line in log)


def test_fill_600MiB_from_64MiB() -> None:
    log, episodes = simulate(600 * MiB)
    assert episodes == [], log
    assert growths(log) == 1, log  # at startup, to 4 GiB: the writer never waits for one


def test_fill_4GiB_from_64MiB() -> None:
    log, episodes = simulate(4 * GiB)
    assert episodes == [], log
    assert growths(log) == 2, log


def test_fill_slow_growth_adapts() -> None:
    """Growth 10x slower than measured in the VM: the defaults still never run dry."""
    log, episodes = simulate(4 * GiB, growth=1.0)
    assert episodes == [], log
    assert growths(log) <= 3, log


@pytest.mark.parametrize(
    "settings_",
    [
        pool(low_water_mark=0),
        pool(low_water_mark=1024, data=DataGrowth(step=Bytes(64 * MiB), step_percent=0)),
        pool(
            low_water_mark=0, data=DataGrowth(threshold_percent=70, step=Bytes(0), step_percent=20)
        ),
    ],
)
def test_fill_with_small_marks_adapts(settings_: PoolSettings) -> None:
    """With a small configured mark only the first growth, before any rate is known, may be late."""
    log, episodes = simulate(2 * GiB, settings_, growth=0.5)
    assert all(grown == 0 for grown in episodes), log
    assert growths(log) <= 8, log


# --- time to full --------------------------------------------------------------------------------


def test_time_to_the_cap_and_to_the_filesystems_reserve() -> None:
    capped = pool(data=DataGrowth(max_size=Bytes(100 * GiB)), reserve=1 * GiB)
    full = full_in(capped, 60 * GiB, 10 * MiB, 30 * GiB, 1024 * GiB, 20 * MiB)
    assert full == FullIn(cap=40 * GiB / (10 * MiB), backing_fs=29 * GiB / (20 * MiB))
    # reserve_percent: 5 % of 1 TiB is more than 1 GiB
    share = full_in(replace(capped, reserve_percent=5.0), 0, None, 60 * GiB, 1024 * GiB, MiB)
    assert share.backing_fs == pytest.approx((60 - 51.2) * GiB / MiB)


def test_time_to_full_when_already_there_or_not_filling() -> None:
    capped = pool(data=DataGrowth(max_size=Bytes(100 * GiB)), reserve=1 * GiB)
    assert full_in(capped, 100 * GiB, None, GiB // 2, TiB, None) == FullIn(0.0, 0.0)
    assert full_in(capped, 1 * GiB, 0.0, 10 * GiB, TiB, None) == FullIn(None, None)
    assert full_in(pool(), 1 * GiB, MiB, None, 0, None) == FullIn(None, None)  # no cap, fs unseen
    assert seconds_until(10, 4, 2.0) == 3.0


def test_parting_room_is_what_the_pool_fills_while_unwatched() -> None:
    history = FillHistory().record(0.0, 0).record(10.0, 100 * MiB)  # 10 MiB/s
    assert parting_room(history, 30.0) == 300 * MiB
    assert parting_room(NO_HISTORY, 30.0) == 0


def test_a_pool_short_of_its_parting_room_grows_to_hold_it() -> None:
    """keep_free: act while less is free, and leave at least that much free."""
    settings = pool(
        low_water_mark=DataBlocks(16),
        data=DataGrowth(step=Bytes(64 * MiB), step_percent=0.0, adaptive_low_water=False),
    )
    st = status(used=100, total=1024)  # 924 blocks (57.75 MiB) free, far above the mark
    fs = fs_for(1024 * BB)
    assert isinstance(decide_data(st, settings, fs, NO_HISTORY), NoAction)
    d = grow(decide_data(st, settings, fs, NO_HISTORY, keep_free=Bytes(300 * MiB)))
    assert d.new_size - 100 * BB >= 300 * MiB
    assert "to last until the next daemon" in d.reason
