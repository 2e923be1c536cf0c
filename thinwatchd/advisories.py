"""What the daemon tells people ahead of trouble, from each pass's figures.

- FULL_SOON (journal, warning): a pool is predicted to reach its cap or its filesystem's
  reserve within ``daemon.warn_full_within``;
- SPACE_RECLAIMABLE (journal, info): its data file holds much more than the pool uses, which
  discards (fstrim, containerd's ``discard_blocks``) would give back to the host;
- the soonest of those limits within a day, for STATUS=.

Each journal advisory is said once per pool and said again only after its cause has clearly
gone (hysteresis), so a fleet's journal is not flooded by a rate hovering around a threshold.
"""

from __future__ import annotations

import logging

from thinwatchd.forecast import worth_reclaiming
from thinwatchd.logs import MessageId, event
from thinwatchd.metrics import PoolMetrics
from thinwatchd.pool import Pool
from thinwatchd.pool_state import pool_fields
from thinwatchd.status import ThinPoolWorkingStatus
from thinwatchd.units import format_bytes, format_duration

__all__ = ["RECLAIMABLE", "advise", "soonest_full"]

#: STATUS= names the pool that runs out of room soonest, if within this.
SAY_FULL_WITHIN_SECONDS = 86400.0
#: The advisory kept in a pool's said set while its data file holds much that is unused.
RECLAIMABLE = "reclaimable"


def soonest_full(figures: list[PoolMetrics]) -> tuple[float, str, str] | None:
    """Return (seconds, pool, what) for the soonest cap or filesystem reserve within a day."""
    soonest: tuple[float, str, str] | None = None
    for m in figures:
        if m.full_in is None:
            continue
        for seconds, what in (
            (m.full_in.cap, " at its cap"),
            (m.full_in.backing_fs, "'s filesystem at its reserve"),
        ):
            if (
                seconds is not None
                and seconds <= SAY_FULL_WITHIN_SECONDS
                and (soonest is None or seconds < soonest[0])
            ):
                soonest = (seconds, m.name, what)
    return soonest


def advise(m: PoolMetrics, pool: Pool, said: set[str], horizon: float) -> None:
    """Log the advisories m calls for that are not in said (the pool's, updated in place)."""
    _warn_full_soon(m, pool, said, horizon)
    _hint_reclaimable(m, pool, said)


def _warn_full_soon(m: PoolMetrics, pool: Pool, said: set[str], horizon: float) -> None:
    """Warn once per limit predicted to be reached within horizon seconds (0: never); again only
    after the estimate has been beyond twice the horizon."""
    if horizon <= 0 or m.full_in is None:
        return
    for limit, seconds, what in (
        ("cap", m.full_in.cap, "its cap (data.max_size)"),
        ("backing_fs", m.full_in.backing_fs, "its filesystem's reserve"),
    ):
        if seconds is None or seconds > 2 * horizon:
            said.discard(limit)
        elif seconds <= horizon and limit not in said:
            said.add(limit)
            event(
                logging.WARNING,
                MessageId.FULL_SOON,
                f"pool {m.name} reaches {what} in about {format_duration(seconds)} at "
                f"{format_bytes(int(m.fill_rate or 0))}/s",
                pool_fields(pool, m.status, m.data_file_allocated_bytes)
                | {
                    "LIMIT": limit,
                    "SECONDS_LEFT": round(seconds),
                    "FILL_RATE_BYTES_PER_SECOND": round(m.fill_rate or 0),
                },
            )


def _hint_reclaimable(m: PoolMetrics, pool: Pool, said: set[str]) -> None:
    """Say once how to give back what the data file holds beyond the pool's data in use."""
    allocated = m.data_file_allocated_bytes
    if (
        allocated is None
        or pool.settings.preallocate  # allocated whole on purpose: nothing to give back
        or not isinstance(m.status, ThinPoolWorkingStatus)
    ):
        return
    used = m.status.usage_bytes(m.block_size).data_used
    if not worth_reclaiming(allocated, used, said=RECLAIMABLE in said):
        said.discard(RECLAIMABLE)
        return
    if RECLAIMABLE in said:
        return
    said.add(RECLAIMABLE)
    reclaimable = allocated - used
    event(
        logging.INFO,
        MessageId.SPACE_RECLAIMABLE,
        f"pool {m.name}: its data file {pool.settings.data_file} takes "
        f"{format_bytes(reclaimable)} more on disk than the {format_bytes(used)} of data in use; "
        "fstrim the filesystems on its thin volumes (containerd's devmapper snapshotter: "
        "discard_blocks = true) to give it back to the host; blocks of thin devices deleted "
        "without a discard come back only with thin_trim while the pool is down",
        pool_fields(pool, m.status, allocated) | {"RECLAIMABLE_BYTES": reclaimable},
    )
