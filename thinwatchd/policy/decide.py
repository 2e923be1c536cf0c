"""Growth policy: pure functions from (status, settings, backing filesystem, history) to decisions.

No I/O and no clocks: the caller passes statvfs/stat figures in BackingFs and timestamps in
FillHistory. The executor (growth/extender.py) applies a Grow as: grow the file to new_size,
set the loop capacity, load the same table with the new length and low_water_mark, resume,
re-read the status.

Why few, large growths: every resume drains in-flight I/O and stalls a writer for ~90 ms, so a
growth leaves at least twice the low-water mark free (plus what fills during one growth); the
kernel then stays quiet for a whole mark's worth of writing before the next event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from thinwatchd.base.human import format_bytes
from thinwatchd.base.units import (
    META_BLOCK_BYTES,
    Bytes,
    DataBlocks,
    MetaBlocks,
    bytes_to_data_blocks,
    data_block_bytes,
    data_blocks_to_bytes,
    meta_blocks_to_bytes,
)
from thinwatchd.config.settings import METADATA_MAX_BYTES, PoolSettings
from thinwatchd.policy.forecast import FillHistory
from thinwatchd.policy.fs_room import BackingFs
from thinwatchd.policy.low_water import (
    base_mark,
    growth_seconds,
    low_water_mark,
    writeback_threatens,
)
from thinwatchd.policy.writeback import WritebackState
from thinwatchd.thin.status import (
    NoSpacePolicy,
    PoolMode,
    ThinPoolErrored,
    ThinPoolFailed,
    ThinPoolStatus,
    ThinPoolWorkingStatus,
)
from thinwatchd.thin.table import Feature

__all__ = [
    "Decision",
    "Grow",
    "GrowthTarget",
    "NoAction",
    "RefusalReason",
    "Refuse",
    "decide_data",
    "decide_metadata",
    "describe",
    "no_space_mode",
    "parting_room",
]


class GrowthTarget(StrEnum):
    """What a decision grows: the pool's data or its metadata (their files and devices)."""

    DATA = "data"
    METADATA = "metadata"


#: calc_metadata_threshold(): min(1024 blocks = 4 MiB, a quarter of the metadata device).
_KERNEL_META_WATERMARK = MetaBlocks(1024)


class RefusalReason(StrEnum):
    """Why a needed growth cannot happen."""

    AT_MAX_SIZE = "at_max_size"
    BACKING_FS_FULL = "backing_fs_full"
    NEEDS_CHECK = "needs_check"
    READ_ONLY = "read_only"
    FAILED = "failed"
    ERRORED = "errored"


@dataclass(frozen=True)
class NoAction:
    """Nothing to do for this target."""

    pool: str
    target: GrowthTarget
    reason: str


@dataclass(frozen=True)
class Grow:
    """Grow the target's file to new_size and reload with low_water_mark."""

    pool: str
    target: GrowthTarget
    old_size: Bytes
    new_size: Bytes
    low_water_mark: DataBlocks
    reason: str
    limited_by: RefusalReason | None = None  # AT_MAX_SIZE or BACKING_FS_FULL: less than wanted


@dataclass(frozen=True)
class Refuse:
    """A growth is needed but must not or cannot happen."""

    pool: str
    target: GrowthTarget
    reason: RefusalReason
    detail: str

    @property
    def is_capacity(self) -> bool:
        """Return whether only space is lacking (what no_space_mode's grace period counts)."""
        return self.reason in (RefusalReason.AT_MAX_SIZE, RefusalReason.BACKING_FS_FULL)


Decision = NoAction | Grow | Refuse


def _ceil_to(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def _percent_of(size: int, percent: float) -> int:
    return math.ceil(size * Fraction(percent) / 100)


def _reached(used: int, total: int, percent: float) -> bool:
    """Return whether used/total >= percent, exactly (floats could disagree with the marks)."""
    return percent > 0 and used * 100 >= total * Fraction(percent)


def _min_total_below(used: int, percent: float) -> int:
    """Return the fewest blocks in which used blocks stay under percent (0 when off)."""
    if percent <= 0:
        return 0
    return math.floor(used * 100 / Fraction(percent)) + 1


def _min_total_clear(used: int, percent: float) -> int:
    """Return the fewest blocks leaving twice the threshold's share free (0 when off).

    Usage may reach max(2t - 100, t/2) percent: after a growth at least as much writing as the
    threshold's own margin passes before the next event, so growths stay few and large.
    """
    if percent <= 0:
        return 0
    t = Fraction(percent)
    return max(math.ceil(used * 100 / max(2 * t - 100, t / 2)), _min_total_below(used, percent))


def _blocked(status: ThinPoolStatus, pool: str, target: GrowthTarget) -> Refuse | None:
    if isinstance(status, ThinPoolFailed):
        detail = "the pool has failed (status 'Fail'); it needs thin_check and thin_repair"
        return Refuse(pool, target, RefusalReason.FAILED, detail)
    if isinstance(status, ThinPoolErrored):
        detail = "the kernel could not read the pool metadata (status 'Error')"
        return Refuse(pool, target, RefusalReason.ERRORED, detail)
    return None


def _unfit(
    status: ThinPoolWorkingStatus, pool: str, target: GrowthTarget, meta_ok: bool
) -> Refuse | None:
    if status.needs_check:
        detail = "needs_check is set; the kernel will not grow it before thin_check/thin_repair"
        return Refuse(pool, target, RefusalReason.NEEDS_CHECK, detail)
    if status.mode is PoolMode.READ_ONLY and not (meta_ok and status.out_of_metadata_space):
        detail = "the pool is read-only"
        if status.out_of_metadata_space:
            detail = "the pool is out of metadata space; the metadata must grow first"
        return Refuse(pool, target, RefusalReason.READ_ONLY, detail)
    return None


def _fit(
    settings: PoolSettings,
    target: GrowthTarget,
    fs: BackingFs,
    current: Bytes,
    wanted: int,
    unit: Bytes,
    cap: Bytes | None,
) -> tuple[Bytes, RefusalReason | None] | Refuse:
    """Return (new size, what limited it) or a Refuse: clamp to the cap, then to the filesystem."""
    name = settings.name
    new, limited = _ceil_to(wanted, unit), None
    if cap is not None and new > cap // unit * unit:
        new, limited = cap // unit * unit, RefusalReason.AT_MAX_SIZE
        if new <= current:
            detail = f"{target} is {format_bytes(current)}, at its limit of {format_bytes(cap)}"
            if target is GrowthTarget.METADATA and cap >= METADATA_MAX_BYTES:
                detail += " (the most the kernel can use)"
            return Refuse(name, target, RefusalReason.AT_MAX_SIZE, detail)
    fits = (fs.file_size + fs.room(settings)) // unit * unit
    if new > fits:
        new, limited = fits, RefusalReason.BACKING_FS_FULL
        if new <= current:
            where = f" {fs.path}" if fs.path else ""
            detail = (
                f"backing filesystem{where} has {format_bytes(fs.free_bytes)} free, reserve "
                f"{format_bytes(fs.reserve(settings))}, {format_bytes(fs.promised())} promised "
                f"to sparse files: no room for even {format_bytes(unit)} more"
            )
            return Refuse(name, target, RefusalReason.BACKING_FS_FULL, detail)
    return Bytes(new), limited


def decide_data(
    status: ThinPoolStatus,
    settings: PoolSettings,
    fs: BackingFs,
    history: FillHistory,
    table_mark: DataBlocks = DataBlocks(0),
    writeback: WritebackState | None = None,
    keep_free: Bytes = Bytes(0),
    unwatched_seconds: float = 0.0,
) -> Decision:
    """Return what to do about the pool's data file.

    Act when free blocks <= the low-water mark (usage >= threshold_percent included), <= the
    active table's mark table_mark (the kernel has sent its one event for this resume: doing
    nothing now would leave the pool without another until the next resume), the pool is out
    of data space, or the page cache holds enough to take it below the mark
    (writeback_threatens, with adaptive_low_water). Grow by max(step, step_percent), and
    enough to leave twice the mark free plus one growth's worth of filling; in whole blocks,
    never past max_size nor the filesystem's room (the unwritten part of sparse files counts
    as used). keep_free: act too while less is free, and leave at least that free (what the
    pool needs while no daemon watches it: parting_room). unwatched_seconds: how long the
    pool may go without a daemon at any moment (a crash), held by the mark (marks.base_mark).
    """
    pool = settings.name
    if (refusal := _blocked(status, pool, GrowthTarget.DATA)) is not None:
        return refusal
    assert isinstance(status, ThinPoolWorkingStatus)
    bs = settings.data_block_size
    bb = data_block_bytes(bs)

    def as_bytes(blocks: DataBlocks) -> Bytes:
        return data_blocks_to_bytes(blocks, bs)

    def shown(blocks: DataBlocks) -> str:
        return format_bytes(as_bytes(blocks))

    used, total, free = status.data_used, status.data_total, status.data_free
    mark = low_water_mark(settings, total, history, writeback, unwatched_seconds)
    early = writeback if settings.data.adaptive_low_water else None
    thr = settings.data.threshold_percent
    if status.mode is PoolMode.OUT_OF_DATA_SPACE:
        why = "the pool is out of data space"
    elif _reached(used, total, thr):
        why = f"data usage {status.data_percent:.1f}% >= {thr:g}%"
    elif free <= max(mark, table_mark):
        why = f"{shown(free)} free <= low-water mark {shown(max(mark, table_mark))}"
    elif early is not None and writeback_threatens(
        as_bytes(free), as_bytes(max(mark, table_mark)), early, history.amplification
    ):
        why = f"{shown(free)} free <= low-water mark {shown(mark)} + "
        why += f"{format_bytes(early.pending)} dirty or under writeback, "
        why += f"{format_bytes(early.writeback)} of it in flight"
    elif as_bytes(free) < keep_free:
        why = f"{shown(free)} free < {format_bytes(keep_free)} to last until the next daemon"
    else:
        why = f"{shown(free)} free of {shown(total)}"
        return NoAction(pool, GrowthTarget.DATA, f"{why}, above the mark of {shown(mark)}")
    if (refusal := _unfit(status, pool, GrowthTarget.DATA, meta_ok=False)) is not None:
        return refusal
    base = base_mark(settings, history, writeback, unwatched_seconds)
    filling = math.ceil((history.fill_rate() or 0.0) * growth_seconds(history))
    current = Bytes(max(as_bytes(total), _ceil_to(fs.file_size, bb)))
    step = max(settings.data.step, _percent_of(current, settings.data.step_percent), bb)
    wanted = max(
        current + step,
        as_bytes(DataBlocks(used + 2 * base)) + filling,
        as_bytes(DataBlocks(_min_total_clear(used, thr))) + filling,
        as_bytes(used) + keep_free + filling,
    )
    fitted = _fit(settings, GrowthTarget.DATA, fs, current, wanted, bb, settings.data.max_size)
    if isinstance(fitted, Refuse):
        return fitted
    new, limited = fitted
    if limited is RefusalReason.BACKING_FS_FULL:
        # Short of room: take what leaves one mark free, not the whole step, and leave the rest
        # to the other pools on the filesystem. Taking all of it starved the next pool out of
        # data space into error_if_no_space, and its writers into EIO.
        enough = _ceil_to(as_bytes(DataBlocks(used + base)) + filling + keep_free, bb)
        new = Bytes(max(min(new, enough), min(new, current + bb)))
    return Grow(
        pool,
        GrowthTarget.DATA,
        current,
        new,
        low_water_mark(
            settings, bytes_to_data_blocks(new, bs), history, writeback, unwatched_seconds
        ),
        why,
        limited,
    )


def decide_metadata(
    status: ThinPoolStatus,
    settings: PoolSettings,
    fs: BackingFs,
    history: FillHistory,
    writeback: WritebackState | None = None,
    unwatched_seconds: float = 0.0,
) -> Decision:
    """Return what to do about the pool's metadata file.

    Act when free metadata blocks <= the kernel's metadata low watermark or usage >=
    threshold_percent. Grow by max(step, step_percent), never past MetadataGrowth.max_size nor
    the kernel's usable maximum; same filesystem rules as data. A read-only pool that is out of
    metadata space may grow its metadata: that is what brings it back to write mode.
    """
    pool = settings.name
    if (refusal := _blocked(status, pool, GrowthTarget.METADATA)) is not None:
        return refusal
    assert isinstance(status, ThinPoolWorkingStatus)
    as_bytes = meta_blocks_to_bytes

    def shown(blocks: MetaBlocks) -> str:
        return format_bytes(as_bytes(blocks))

    mb = META_BLOCK_BYTES
    used, total, free = status.meta_used, status.meta_total, status.meta_free
    watermark = status.metadata_low_watermark
    if watermark is None:  # not printed by older kernels: compute it as calc_metadata_threshold()
        watermark = MetaBlocks(min(_KERNEL_META_WATERMARK, total // 4))
    thr = settings.metadata.threshold_percent
    if free <= watermark:
        why = f"{shown(free)} metadata free <= {shown(watermark)}"
    elif _reached(used, total, thr):
        why = f"metadata usage {status.meta_percent:.1f}% >= {thr:g}%"
    else:
        why = f"{shown(free)} metadata free of {shown(total)}"
        return NoAction(pool, GrowthTarget.METADATA, why)
    if (refusal := _unfit(status, pool, GrowthTarget.METADATA, meta_ok=True)) is not None:
        return refusal
    current = Bytes(max(as_bytes(total), _ceil_to(fs.file_size, mb)))
    step = max(settings.metadata.step, _percent_of(current, settings.metadata.step_percent), mb)
    wanted = max(
        current + step,
        as_bytes(MetaBlocks(used + _KERNEL_META_WATERMARK + 1)),  # clear of the next watermark
        as_bytes(MetaBlocks(_min_total_below(used, thr))),
    )
    cap = min(settings.metadata.max_size, METADATA_MAX_BYTES)
    fitted = _fit(settings, GrowthTarget.METADATA, fs, current, wanted, mb, cap)
    if isinstance(fitted, Refuse):
        return fitted
    new, limited = fitted
    # The reload that picks up the new size carries the data mark too.
    mark = low_water_mark(settings, status.data_total, history, writeback, unwatched_seconds)
    return Grow(pool, GrowthTarget.METADATA, current, new, mark, why, limited)


def no_space_mode(settings: PoolSettings, refused_since: float | None, now: float) -> NoSpacePolicy:
    """Return the no-space policy the pool's table should have now.

    refused_since is when data growth began to be refused for lack of room (Refuse.is_capacity)
    with no Grow or NoAction since, or None. After when_full.error_after seconds of that, writers
    get ENOSPC instead of hanging; once growth is possible again, the configured policy returns.
    """
    if Feature.ERROR_IF_NO_SPACE in settings.features:
        return NoSpacePolicy.ERROR
    after = settings.when_full.error_after
    if refused_since is None or after is None or now - refused_since < after:
        return NoSpacePolicy.QUEUE
    return NoSpacePolicy.ERROR


def describe(decision: Decision) -> str:
    """Return a one-line message about a decision, for the journal."""
    what = f"{decision.target} of {decision.pool}"
    if isinstance(decision, NoAction):
        return f"{what} needs no growth: {decision.reason}"
    if isinstance(decision, Refuse):
        return f"cannot grow {what}: {decision.detail}"
    delta = format_bytes(decision.new_size - decision.old_size)
    text = (
        f"growing {what} from {format_bytes(decision.old_size)} to "
        f"{format_bytes(decision.new_size)} (+{delta}): {decision.reason}"
    )
    if decision.limited_by is RefusalReason.AT_MAX_SIZE:
        text += "; limited by its maximum size"
    elif decision.limited_by is RefusalReason.BACKING_FS_FULL:
        text += "; limited by the backing filesystem's free space"
    return f"{text}; low-water mark {decision.low_water_mark} blocks"


def parting_room(history: FillHistory, absence_seconds: float) -> Bytes:
    """Return the free space a pool needs to go unwatched for absence_seconds (a restart: no
    one answers the kernel's event meanwhile): what it fills in that time at the steepest
    rate of the last minute. 0 while nothing fills."""
    rate = history.fill_rate() or 0.0
    return Bytes(math.ceil(rate * absence_seconds))
