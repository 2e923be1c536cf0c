"""Retune a pool's table between growths: raise its low-water mark when the policy's is higher,
and switch error_if_no_space on after the grace period without room (off when room returns).
"""

from __future__ import annotations

import logging

from thinwatchd.base.errors import ThinwatchError
from thinwatchd.base.logs import MessageId, event
from thinwatchd.growth.journal import PoolJournal, failure_key
from thinwatchd.growth.state import PoolState
from thinwatchd.kernel.api import Kernel
from thinwatchd.policy.decide import no_space_mode
from thinwatchd.policy.low_water import low_water_mark
from thinwatchd.policy.writeback import WritebackState
from thinwatchd.pool.running import Pool
from thinwatchd.thin.status import NoSpacePolicy, ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["retune_table"]

log = logging.getLogger("thinwatchd")


def retune_table(
    kernel: Kernel,
    journal: PoolJournal,
    pool: Pool,
    state: PoolState,
    status: ThinPoolStatus | None,
    now: float,
    writeback: WritebackState | None = None,
    unwatched_seconds: float = 0.0,
) -> None:
    """Reload once if the table's mark or no-space policy should change.

    The mark: the kernel only knows the table's, and the policy's (threshold, adaptive rate)
    may be higher; growths carry it anyway, so this rarely reloads, and never to lower it
    (an early event costs nothing). The policy: error_if_no_space after the grace period
    without room, and back when room returns. One reload for both: each stalls writers.
    With no status (the check failed), only the policy is considered.
    """
    if status is not None and (not isinstance(status, ThinPoolWorkingStatus) or status.needs_check):
        return
    if state.own_suspend:
        return  # a reload would meet the same refusal; resuming it comes first
    table = pool.table
    if isinstance(status, ThinPoolWorkingStatus):
        mark = low_water_mark(
            pool.settings, status.data_total, state.history, writeback, unwatched_seconds
        )
        if mark > table.low_water_mark + table.low_water_mark // 4:  # hysteresis
            table = table.with_low_water_mark(mark)
    policy = no_space_mode(pool.settings, state.refused_since, now)
    if policy is not table.no_space_policy:
        table = table.with_no_space_policy(policy)
    if table == pool.table:
        return
    old = pool.table
    try:
        pool.reload(kernel, table)
    except ThinwatchError as exc:
        key = failure_key(exc)
        if key not in (state.failing, state.retune_failing):
            log.error("pool %s: cannot reload with %s: %s", pool.name, table.params(), exc)
        state.retune_failing = key
        return
    state.retune_failing = None
    if table.low_water_mark != old.low_water_mark:
        log.info("pool %s: low-water mark raised to %d blocks", pool.name, table.low_water_mark)
    if policy is not old.no_space_policy:
        error = policy is NoSpacePolicy.ERROR
        why = (
            "no room to grow; writers now get ENOSPC instead of hanging"
            if error
            else "room to grow again; writers queue as configured"
        )
        event(
            logging.ERROR if error else logging.INFO,
            MessageId.POOL_MODE_CHANGED,
            f"pool {pool.name}: switched to {policy.value}: {why}",
            journal.fields(pool, status) | {"NO_SPACE_POLICY": policy.value},
        )
