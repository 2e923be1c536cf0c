"""What the daemon remembers about one pool between reconciles (PoolState: the extender's,
ManagedPool: the daemon's), and the journal fields that describe a pool's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from thinwatchd.base.event_loop import Timer
from thinwatchd.base.units import Bytes
from thinwatchd.policy.decide import Grow, GrowthTarget
from thinwatchd.policy.forecast import FillHistory
from thinwatchd.pool.running import Pool
from thinwatchd.thin.status import PoolMode, ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["GrowthRecord", "ManagedPool", "PoolState", "pool_fields"]


@dataclass(frozen=True)
class GrowthRecord:
    """One completed growth."""

    target: GrowthTarget
    old_size: Bytes
    new_size: Bytes
    seconds: float


@dataclass
class PoolState:
    """What the extender remembers about one pool between reconciles."""

    history: FillHistory = field(default_factory=FillHistory)
    refused_since: float | None = None  # no room for data (refused, failed, fs at reserve)
    refusals: dict[GrowthTarget, str] = field(default_factory=dict)  # reason, to log changes once
    mode: PoolMode | None = None  # the pool's mode when last seen, to log changes once
    needs_check: bool = False  # and whether it needed thin_check
    growths: dict[GrowthTarget, int] = field(default_factory=lambda: dict.fromkeys(GrowthTarget, 0))
    failures: int = 0
    failing: str | None = None  # the error of the current streak of failed growths
    failed_attempts: int = 0  # growths failed in a row
    retry_at: float | None = None  # no growth attempt before this (backoff)
    backing_short: bool = False  # the backing filesystem is at its reserve (said once)
    unfinished: Grow | None = None  # a growth whose file grew but the kernel has not seen it
    retune_failing: str | None = None  # the last failed retune reload, said once
    suspended_said: bool = False  # a suspend by someone else was said
    # Left suspended by our own failed resume (its rollback failed too), or found suspended at
    # start-up and not resumed yet: ours to resume, with backoff, until the kernel accepts.
    own_suspend: bool = False
    last_growth: GrowthRecord | None = None
    status: ThinPoolStatus | None = None
    written_at_status: int | None = None  # WritebackState.written when status was read
    event_nr: int = -1


def pool_fields(
    pool: Pool, status: ThinPoolStatus | None, allocated: Bytes | None = None
) -> dict[str, object]:
    """Return the structured journal fields describing a pool's state; allocated is what its
    data file takes on disk (beyond the data in use: what discards would give back)."""
    fields: dict[str, object] = {"POOL": pool.name}
    if allocated is not None:
        fields["DATA_FILE_ALLOCATED_BYTES"] = allocated
    if isinstance(status, ThinPoolWorkingStatus):
        usage = status.usage_bytes(pool.block_size)
        fields |= {
            "DATA_USED_BYTES": usage.data_used,
            "DATA_TOTAL_BYTES": usage.data_total,
            "METADATA_USED_BYTES": usage.metadata_used,
            "METADATA_TOTAL_BYTES": usage.metadata_total,
        }
    if status is not None:
        fields["POOL_MODE"] = status.mode.value
    return fields


@dataclass
class ManagedPool:
    """A pool the daemon watches, with the extender's memory of it."""

    pool: Pool
    state: PoolState = field(default_factory=PoolState)
    retry: Timer | None = None  # the backoff timer of a failed growth
    error: str | None = None  # the last error logged for this pool, to say each one once
    said: set[str] = field(default_factory=set)  # advisories in force, said once (advisories.py)
    # Asked for while a reconcile of it was running (an event, a check): one more after it,
    # timed from the earliest wake-up that asked.
    again: bool = False
    again_woke: float | None = None
    # The growth a follow-up check was scheduled after (Reconciles.FOLLOW_UP_SECONDS later).
    followed: GrowthRecord | None = None
