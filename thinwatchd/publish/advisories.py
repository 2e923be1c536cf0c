"""What the daemon tells people ahead of trouble, from each pass's figures.

- FULL_SOON (journal, warning): a pool is predicted to reach its cap, or a filesystem the
  reserve of a pool on it, within ``daemon.warn_full_within`` (once per filesystem, not once per
  pool on it: 1,000 pools on /var/lib fill one filesystem);
- SPACE_RECLAIMABLE (journal, info): its data file holds much more than the pool uses, which
  discards (fstrim, containerd's ``discard_blocks``) would give back to the host;
- the soonest of those limits within a day, for STATUS=.

Each journal advisory is said once per pool and said again only after its cause has clearly
gone (hysteresis), so a fleet's journal is not flooded by a rate hovering around a threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from thinwatchd.base.human import format_bytes, format_duration
from thinwatchd.base.logs import MessageId, event
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.growth.state import ManagedPool, pool_fields
from thinwatchd.policy.forecast import worth_reclaiming
from thinwatchd.pool.running import Pool
from thinwatchd.publish.figures import PoolMetrics
from thinwatchd.thin.status import ThinPoolWorkingStatus

__all__ = ["RECLAIMABLE", "advise", "soonest_full", "warn_filesystems_full_soon"]

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


def advise(m: PoolMetrics, pool: Pool, said: SaidOnce[str], horizon: float) -> None:
    """Log the advisories m calls for that are not in said (the pool's, updated in place)."""
    _warn_full_soon(m, pool, said, horizon)
    _hint_reclaimable(m, pool, said)


def _warn_full_soon(m: PoolMetrics, pool: Pool, said: SaidOnce[str], horizon: float) -> None:
    """Warn once when the pool is predicted to reach its cap within horizon seconds (0: never);
    again only after the estimate has been beyond twice the horizon."""
    seconds = None if m.full_in is None else m.full_in.cap
    if horizon <= 0 or seconds is None or seconds > 2 * horizon:
        said.ends("cap")
    elif seconds <= horizon and said.says("cap"):
        event(
            logging.WARNING,
            MessageId.FULL_SOON,
            f"pool {m.name} reaches its cap (data.max_size) in about "
            f"{format_duration(seconds)} at {format_bytes(int(m.fill_rate or 0))}/s",
            pool_fields(pool, m.status, m.data_file_allocated_bytes)
            | {
                "LIMIT": "cap",
                "SECONDS_LEFT": round(seconds),
                "FILL_RATE_BYTES_PER_SECOND": round(m.fill_rate or 0),
            },
        )


#: Pools named in a FULL_SOON message about a filesystem (the POOLS field has them all).
_NAMED_POOLS = 5


def warn_filesystems_full_soon(
    figures: list[PoolMetrics],
    pools: Mapping[str, ManagedPool],
    said: SaidOnce[int],
    horizon: float,
) -> None:
    """Warn once per filesystem predicted to reach a reserve of a pool on it within horizon
    seconds (0: never), naming the pool whose reserve comes first and every pool at risk; again
    only after the soonest estimate on it has been beyond twice the horizon. said holds the
    filesystems (st_dev) warned about, updated in place."""
    by_fs: dict[int, list[tuple[float, PoolMetrics]]] = {}
    for m in figures:
        seconds = None if m.full_in is None else m.full_in.backing_fs
        if m.backing_fs is not None and seconds is not None and m.name in pools:
            by_fs.setdefault(m.backing_fs, []).append((seconds, m))
    for dev in said:
        if dev not in by_fs:
            said.ends(dev)  # a filesystem nothing fills any more is forgotten
    for dev, estimates in by_fs.items():
        soonest = min(s for s, _ in estimates)
        if horizon <= 0 or soonest > 2 * horizon:
            said.ends(dev)
        elif soonest <= horizon and said.says(dev):
            _say_filesystem_full_soon(
                sorted((s, m.name, m) for s, m in estimates if s <= horizon), pools
            )


def _say_filesystem_full_soon(
    at_risk: list[tuple[float, str, PoolMetrics]], pools: Mapping[str, ManagedPool]
) -> None:
    seconds, name, m = at_risk[0]
    pool = pools[name].pool
    names = [n for _, n, _ in at_risk]
    shown = ", ".join(names[:_NAMED_POOLS])
    if len(names) > _NAMED_POOLS:
        shown += f" and {len(names) - _NAMED_POOLS} more"
    rate = int(m.backing_fs_fill_rate or 0)
    event(
        logging.WARNING,
        MessageId.FULL_SOON,
        f"pool {name}'s filesystem ({pool.settings.data_file.parent}) reaches its reserve in "
        f"about {format_duration(seconds)} at {format_bytes(rate)}/s, every pool on it "
        f"together; {len(names)} pool{'s' if len(names) != 1 else ''} at risk: {shown}",
        pool_fields(pool, m.status, m.data_file_allocated_bytes)
        | {
            "LIMIT": "backing_fs",
            "SECONDS_LEFT": round(seconds),
            "FILL_RATE_BYTES_PER_SECOND": round(m.fill_rate or 0),
            "FS_FILL_RATE_BYTES_PER_SECOND": rate,
            "POOLS": ",".join(names),
        },
    )


def _hint_reclaimable(m: PoolMetrics, pool: Pool, said: SaidOnce[str]) -> None:
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
        said.ends(RECLAIMABLE)
        return
    if not said.says(RECLAIMABLE):
        return
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
