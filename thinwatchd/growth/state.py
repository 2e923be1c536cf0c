"""What the daemon remembers about one pool between reconciles (PoolState: the extender's,
ManagedPool: the daemon's), and the journal fields that describe a pool's state."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from thinwatchd.base.event_loop import Timer
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.base.units import Bytes
from thinwatchd.policy.decide import Grow, GrowthTarget
from thinwatchd.policy.forecast import FillHistory
from thinwatchd.pool.running import Pool
from thinwatchd.thin.status import ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["GrowthRecord", "LastSeen", "ManagedPool", "PoolState", "Topic", "pool_fields"]


@dataclass(frozen=True)
class GrowthRecord:
    """One completed growth."""

    target: GrowthTarget
    old_size: Bytes
    new_size: Bytes
    seconds: float


class Topic(StrEnum):
    """What the journal says of a pool once per streak (PoolState.said), and with what value."""

    GROWTH_FAILING = "growth failing"  # failure_key of the streak's error
    RETUNE_FAILING = "retune failing"  # failure_key of the failed table reload
    DATA_REFUSED = "data refused"  # the Refusal's reason
    METADATA_REFUSED = "metadata refused"
    MODE = "mode"  # (PoolMode, needs_check)
    FS_AT_RESERVE = "fs at reserve"  # the data file's filesystem is at its reserve
    SUSPENDED = "suspended by someone else"

    @staticmethod
    def refused(target: GrowthTarget) -> Topic:
        return Topic.DATA_REFUSED if target is GrowthTarget.DATA else Topic.METADATA_REFUSED


@dataclass
class LastSeen:
    """What the pool's last status read found, for those who need it between reads."""

    status: ThinPoolStatus | None = None
    written_at_status: int | None = None  # WritebackState.written when status was read
    event_nr: int = -1  # its dm event counter when the events were last read


@dataclass
class PoolState:
    """What the extender remembers about one pool between reconciles: its growth state here;
    what the journal said of it (said) and what its last status read found (seen) apart."""

    history: FillHistory = field(default_factory=FillHistory)
    refused_since: float | None = None  # no room for data (refused, failed, fs at reserve)
    growths: dict[GrowthTarget, int] = field(default_factory=lambda: dict.fromkeys(GrowthTarget, 0))
    failures: int = 0
    failed_attempts: int = 0  # growths failed in a row
    retry_at: float | None = None  # no growth attempt before this (backoff)
    unfinished: Grow | None = None  # a growth whose file grew but the kernel has not seen it
    # Left suspended by our own failed resume (its rollback failed too), or found suspended at
    # start-up and not resumed yet: ours to resume, with backoff, until the kernel accepts.
    own_suspend: bool = False
    last_growth: GrowthRecord | None = None
    said: SaidOnce[Topic] = field(default_factory=SaidOnce)
    seen: LastSeen = field(default_factory=LastSeen)

    @property
    def refused(self) -> tuple[GrowthTarget, ...]:
        """The targets whose refusal is in force (said)."""
        return tuple(t for t in GrowthTarget if Topic.refused(t) in self.said)

    def end_failure_streak(self) -> bool:
        """Growths (or checks) work again: no backoff; return whether a failure was said."""
        self.failed_attempts, self.retry_at = 0, None
        return self.said.ends(Topic.GROWTH_FAILING)


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
    # What the daemon said of it: its last error ("error") and the advisories in force.
    said: SaidOnce[str] = field(default_factory=SaidOnce)
    # Asked for while a reconcile of it was running (an event, a check): one more after it,
    # timed from the earliest wake-up that asked.
    again: bool = False
    again_woke: float | None = None
    # The growth a follow-up check was scheduled after (Scheduler.FOLLOW_UP_SECONDS later).
    followed: GrowthRecord | None = None
