"""Growth execution: apply the policy's decisions to a pool, and report what happened.

``Extender.reconcile(pool)`` is the one routine every trigger runs (a dm event, a udev event,
the safety timer): read the status, ask the pure policy (policy/decide.py) what to do, and do it:

    grow the file -> LOOP_SET_CAPACITY -> TABLE_LOAD (inactive) -> resume -> status

Each step leaves a state ``pool.activate()`` can finish after a crash: a file larger than its
loop, a loop larger than the table, or a stale inactive table. The pool is never left suspended
(Pool.reload builds each table from the kernel's live one and resumes on the longest valid
table when a resume fails). Growth path: no forks, no udev wait (the /dev/mapper node exists
already), and the backing files as the pass looks at them (backing.py: one statvfs per
filesystem and one stat per pool file a pass, not per pool). A failed growth is said once,
retried with backoff, and counts as "no room" for when_full, so writers are not left queued
forever.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from thinwatchd.base.errors import KernelError, RollbackError, ThinwatchError
from thinwatchd.base.logs import MessageId, event
from thinwatchd.base.units import Bytes, data_blocks_to_sectors
from thinwatchd.growth.backing import BackingFiles, BackingLook
from thinwatchd.growth.journal import PoolJournal, failure_key
from thinwatchd.growth.own_suspends import OwnSuspends
from thinwatchd.growth.page_cache import PageCache
from thinwatchd.growth.state import GrowthRecord, PoolState, Topic
from thinwatchd.kernel.api import Kernel
from thinwatchd.policy.decide import (
    Decision,
    Grow,
    GrowthTarget,
    RefusalReason,
    Refuse,
    decide_data,
    decide_metadata,
    describe,
    no_space_mode,
)
from thinwatchd.policy.fs_room import BackingFs, crash_room_fits
from thinwatchd.policy.low_water import low_water_mark
from thinwatchd.policy.writeback import WritebackState
from thinwatchd.pool.running import Pool, ensure_resumed
from thinwatchd.thin.status import NoSpacePolicy, ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["Extender"]

log = logging.getLogger("thinwatchd")

#: Growths one reconcile may chain (metadata then data, or a writer outrunning a growth).
_MAX_ROUNDS = 4


def _room_bound(decision: Decision) -> bool:
    """Return whether the backing filesystem's room made the decision (a smaller growth or none)."""
    if isinstance(decision, Grow):
        return decision.limited_by is RefusalReason.BACKING_FS_FULL
    return isinstance(decision, Refuse) and decision.reason is RefusalReason.BACKING_FS_FULL


def _step_ms(started: float, marks: dict[str, float]) -> dict[str, float]:
    """Return each step's duration in ms from consecutive timestamps (dicts keep order)."""
    out, before = {}, started
    for name, at in marks.items():
        out[name] = round((at - before) * 1000, 1)
        before = at
    return out


class Extender:
    """Keeps pools from running out of space: one reconcile per pool at a time, and those of
    different pools in threads side by side (they share the backing look and the writeback
    sample, each behind a lock; a pool's own state is its reconcile's alone)."""

    def __init__(
        self,
        kernel: Kernel,
        clock: Callable[[], float] = time.monotonic,
        unwatched_seconds: Callable[[], float] = lambda: 0.0,
        own_suspends: OwnSuspends | None = None,
    ) -> None:
        self.kernel = kernel
        self.clock = clock
        # The pools our own failed resumes left suspended, as the next instance will know them.
        self.own_suspends = own_suspends or OwnSuspends()
        # How long a pool may go without a daemon (this one killed, the next not yet up): the
        # data marks hold that long of filling at each pool's rate.
        self.unwatched_seconds = unwatched_seconds
        # Every pool file watched: their unwritten sparse space counts as promised.
        self.backing = BackingFiles(kernel.files)
        self.journal = PoolJournal(self.backing, clock)
        self.page_cache = PageCache(kernel.memory, clock)

    # -- passes ----------------------------------------------------------------------------

    def watch(self, pool: Pool) -> None:
        """Count the pool's files among those that share its filesystems (a pool just built)."""
        self.backing.watch((str(pool.settings.data_file), str(pool.settings.metadata_file)))

    def new_pass(self, *, survey: bool = False) -> BackingLook:
        """Start a pass over some pools: each backing file and filesystem is looked at once in
        it. A survey (the safety check) looks at every watched file, keeping the others' figures
        that an event pass reuses at most one check old."""
        return self.backing.new_pass(survey=survey)

    # -- the reconcile loop ----------------------------------------------------------------

    def reconcile(
        self,
        pool: Pool,
        state: PoolState,
        woke: float | None = None,
        look: BackingLook | None = None,
        keep_free: Bytes = Bytes(0),
    ) -> ThinPoolStatus | None:
        """Bring one pool to a state with room to write; return its latest status.

        woke is when the loop woke for the event that led here: growth times count from it.
        look is the pass this reconcile belongs to (new_pass); without it, a pass of its own.
        keep_free: grow, if need be, to leave that much free (the daemon is about to stop).
        A kernel or file error anywhere in the check is a failed growth as far as writers are
        concerned: said once, retried with backoff, and when_full's clock runs. Only ENXIO (the
        device is gone) is raised, for the daemon to rebuild the pool.
        """
        try:
            return self._reconcile(pool, state, woke, look or self.new_pass(), keep_free)
        except ThinwatchError as exc:
            if isinstance(exc, KernelError) and exc.errno == errno.ENXIO:
                raise
            self.journal.failure(pool, state, "check", exc)
            if state.refused_since is None:
                state.refused_since = self.clock()
            self._retune(pool, state, None)
            return state.seen.status

    def _reconcile(
        self,
        pool: Pool,
        state: PoolState,
        woke: float | None,
        look: BackingLook,
        keep_free: Bytes = Bytes(0),
    ) -> ThinPoolStatus:
        dm = self.kernel.dm
        started = self.clock() if woke is None else woke
        writeback = self.page_cache.sample()
        status = pool.read_status(dm)
        state.seen.written_at_status = None if writeback is None else writeback.written
        if writeback is not None and isinstance(status, ThinPoolWorkingStatus):
            used = pool.data_bytes(status.data_used)
            state.history = state.history.record_landing(used, writeback.written)
        if self._adopt_outside_change(pool, state, status):
            # Suspended by someone else: no growth, no retune; when_full's clock runs if room
            # was already lacking.
            state.seen.status = status
            return status
        backing_off = state.retry_at is not None and self.clock() < state.retry_at
        blocked = False
        self.journal.mode(pool, state, status)  # also while an unfinished growth keeps failing
        if state.unfinished is not None and not backing_off:
            finished = self._finish_growth(pool, state, state.unfinished, started)
            blocked = finished is None
            status = finished or status
        data_fs: BackingFs | None = None  # the data file's figures, until a growth changes them
        for _ in range(_MAX_ROUNDS):
            if blocked:
                break
            if isinstance(status, ThinPoolWorkingStatus):
                state.history = state.history.record(
                    self.clock(), pool.data_bytes(status.data_used)
                )
            data_fs = look.figures(str(pool.settings.data_file))
            decision = self._decide(pool, state, status, look, writeback, keep_free)
            if not isinstance(decision, Grow):
                blocked = isinstance(decision, Refuse) and decision.is_capacity
                if state.unfinished is None:  # nothing to retry: the growth is not wanted now
                    state.end_failure_streak()
                break
            if backing_off or state.unfinished is not None:
                look.unbook(self._path(pool, decision))  # not made now
                blocked = True  # backing off after a failure; the daemon's timer comes back
                break
            try:
                grown = self._grow(pool, state, decision, started, look, writeback)
            finally:
                look.unbook(self._path(pool, decision))  # made or not: no longer to come
            if grown is None:
                blocked = True
                break
            status, data_fs = grown, None  # the file grew: look again
            started = self.clock()
            self.journal.mode(pool, state, status)
        data_fs = data_fs or look.figures(str(pool.settings.data_file))
        blocked |= self.journal.fs_at_reserve(pool, state, status, data_fs)
        if blocked:
            if state.refused_since is None:
                state.refused_since = self.clock()
        else:
            state.refused_since = None
        self._retune(pool, state, status, writeback, self._unwatched_on(data_fs, pool, state))
        state.seen.status = status
        return status

    def _retune(
        self,
        pool: Pool,
        state: PoolState,
        status: ThinPoolStatus | None,
        writeback: WritebackState | None = None,
        unwatched_seconds: float = 0.0,
    ) -> None:
        """Retune the pool's table between growths: reload once if its mark or no-space policy
        should change.

        The mark: the kernel only knows the table's, and the policy's (threshold, adaptive rate)
        may be higher; growths carry it anyway, so this rarely reloads, and never to lower it
        (an early event costs nothing). The policy: error_if_no_space after the grace period
        without room, and back when room returns. One reload for both: each stalls writers.
        With no status (the check failed), only the policy is considered.
        """
        if status is not None and (
            not isinstance(status, ThinPoolWorkingStatus) or status.needs_check
        ):
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
        policy = no_space_mode(pool.settings, state.refused_since, self.clock())
        if policy is not table.no_space_policy:
            table = table.with_no_space_policy(policy)
        if table == pool.table:
            return
        old = pool.table
        try:
            pool.reload(self.kernel, table)
        except ThinwatchError as exc:
            key = failure_key(exc)
            news = state.said.says(Topic.RETUNE_FAILING, key)
            if news and state.said.get(Topic.GROWTH_FAILING) != key:  # not said as a growth's
                log.error("pool %s: cannot reload with %s: %s", pool.name, table.params(), exc)
            return
        state.said.ends(Topic.RETUNE_FAILING)
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
                self.journal.fields(pool, status) | {"NO_SPACE_POLICY": policy.value},
            )

    def own_suspend(self, pool: Pool, state: PoolState, suspended: bool) -> None:
        """Mark the pool as left suspended by us (ours to resume, across restarts too), or not."""
        state.own_suspend = suspended
        self.own_suspends.set(pool.name, suspended)

    def _unwatched_on(self, data_fs: BackingFs, pool: Pool, state: PoolState) -> float:
        """How long the pool's mark covers a killed daemon's absence: the daemon's estimate,
        or 0 without data.crash_room or while its data file's filesystem lacks the room to
        spare (crash_room_fits)."""
        if not pool.settings.data.crash_room:
            return 0.0
        unwatched = self.unwatched_seconds()
        rate = state.history.fill_rate()
        return unwatched if crash_room_fits(data_fs, pool.settings, rate, unwatched) else 0.0

    def _adopt_outside_change(self, pool: Pool, state: PoolState, status: ThinPoolStatus) -> bool:
        """Notice what someone else did to the pool's device, and adopt or repair it.

        A table of another size than ours was reloaded by someone else: adopt it. A suspended
        pool whose active table is shorter than its recorded size is stuck on a resume the
        kernel refused (an operator's dmsetup reload from a stale length, losing a race with a
        growth): no resume of anyone's will ever succeed and every writer hangs, so resume it on
        the longest valid table. A pool suspended on a valid table (dmsetup suspend) is left
        as it is, and said once; return True then: nothing may reload it meanwhile (a growth
        would resume it under the operator's feet).
        """
        if not isinstance(status, ThinPoolWorkingStatus):
            return False
        size = data_blocks_to_sectors(status.data_total, pool.settings.data_block_size)
        info = self.kernel.dm.info(pool.name)
        if info is None:
            raise KernelError("DM_DEV_STATUS", pool.name, errno.ENXIO, "the device is gone")
        if size == pool.length and not info.suspended:
            state.said.ends(Topic.SUSPENDED)
            return False
        live = pool.live_length(self.kernel.dm, at_least=size)
        if info.suspended and live < size:
            event(
                logging.WARNING,
                MessageId.CHANGED_OUTSIDE,
                f"pool {pool.name}: its active table ({live} sectors) is shorter than the pool "
                f"({size} sectors): someone's resume of it was refused and left the pool "
                f"suspended, its writers blocked; resuming it on the longest valid table",
                {"POOL": pool.name, "OLD_SECTORS": live, "NEW_SECTORS": size},
            )
            ensure_resumed(self.kernel, pool)
            return False
        if not info.suspended:
            self.own_suspend(pool, state, False)  # resumed by someone else
            return False
        if state.own_suspend:
            # Ours: a resume the kernel refused and its rollback too. Writers wait until one
            # is accepted; try again (a failure is said once, and retried with backoff).
            if state.retry_at is not None and self.clock() < state.retry_at:
                return True
            ensure_resumed(self.kernel, pool)
            self.own_suspend(pool, state, False)
            state.end_failure_streak()
            log.warning("pool %s: resumed at last, its writers go on", pool.name)
            return False
        if state.said.says(Topic.SUSPENDED):
            log.warning(
                "pool %s is suspended by someone else (dmsetup suspend?); its writers wait, "
                "and it is not grown, until it is resumed (dmsetup resume %s)",
                pool.name,
                pool.name,
            )
        return True

    def _decide(
        self,
        pool: Pool,
        state: PoolState,
        status: ThinPoolStatus,
        look: BackingLook,
        writeback: WritebackState | None,
        keep_free: Bytes = Bytes(0),
    ) -> Decision:
        """Return the first decision that needs doing: metadata first (a pool out of it is ro)."""
        settings = pool.settings

        def metadata(fs: BackingFs) -> Decision:
            unwatched = self._unwatched_on(look.figures(str(settings.data_file)), pool, state)
            return decide_metadata(status, settings, fs, state.history, writeback, unwatched)

        def data(fs: BackingFs) -> Decision:
            return decide_data(
                status,
                settings,
                fs,
                state.history,
                table_mark=pool.table.low_water_mark,  # the kernel's event came at this mark
                writeback=writeback,
                keep_free=keep_free,
                unwatched_seconds=self._unwatched_on(fs, pool, state),
            )

        meta = self._decide_on(look, str(settings.metadata_file), metadata)
        self.journal.refusal(pool, state, meta, status)
        if isinstance(meta, Grow):
            return meta
        decision = self._decide_on(look, str(settings.data_file), data)
        self.journal.refusal(pool, state, decision, status)
        return decision

    @staticmethod
    def _decide_on(
        look: BackingLook, path: str, decide: Callable[[BackingFs], Decision]
    ) -> Decision:
        """Decide on the pass's figures for path; when its filesystem's room limits the
        decision, decide again on fresh figures of every file there (others' promises may be
        one check old, and overstated)."""
        with look.deciding(path):  # no other growth decided on this filesystem meanwhile
            decision = decide(look.figures(path))
            if _room_bound(decision) and look.look_again(path):
                decision = decide(look.figures(path))
            if isinstance(decision, Grow):
                look.book(path, decision.new_size - decision.old_size)
        return decision

    @staticmethod
    def _path(pool: Pool, decision: Grow) -> str:
        """Return the file decision grows."""
        data = decision.target is GrowthTarget.DATA
        return str(pool.settings.data_file if data else pool.settings.metadata_file)

    # -- execution -------------------------------------------------------------------------

    def _grow(
        self,
        pool: Pool,
        state: PoolState,
        decision: Grow,
        started: float,
        look: BackingLook,
        writeback: WritebackState | None = None,
    ) -> ThinPoolStatus | None:
        """Execute one growth; return the status after it, or None if it failed (logged).

        Once the file is grown, the growth is this decision until it is finished: a retry
        completes it (state.unfinished) rather than deciding again from the larger file, which
        would grow the file by another step per failed attempt.
        """
        settings, files = pool.settings, self.kernel.files
        data = decision.target is GrowthTarget.DATA
        path = self._path(pool, decision)
        loop = pool.data_loop if data else pool.meta_loop
        steps: dict[str, float] = {"DECIDE_MS": self.clock()}
        if writeback is not None:
            # What the reload will wait for: the pool's suspend drains its writeback backlog.
            log.debug(
                "pool %s: %s growth decided with Dirty %d, Writeback %d bytes, x%.2f",
                pool.name,
                decision.target,
                writeback.dirty,
                writeback.writeback,
                state.history.amplification,
            )
        try:
            # No fsync: before dm-thin commits the superblock that records the new size it
            # flushes the data device (metadata_pre_commit_callback, Linux 5.5+) or writes the
            # superblock with FUA to the metadata device, and a flush of a loop device fsyncs its
            # file. So the size is durable before anything depends on it, and an fsync here
            # would only write back the writer's dirty pages while it waits.
            files.grow(
                path,
                decision.new_size,
                preallocate=settings.allocates(metadata=not data),
                sync=False,
                identity=(loop.backing_dev, loop.backing_inode),
            )
        except ThinwatchError as exc:
            look.changed(path)  # a failed preallocation may still have taken blocks
            self.journal.failure(pool, state, decision.target, exc)
            return None
        steps["FILE_MS"] = self.clock()
        state.unfinished = decision
        try:
            return self._finish_growth(pool, state, decision, started, steps, writeback)
        finally:
            # The file is larger now, whether the kernel sees it yet or not: looked at again for
            # the rest of the pass, once the writers waiting for this growth are served.
            look.changed(path)

    def _finish_growth(
        self,
        pool: Pool,
        state: PoolState,
        decision: Grow,
        started: float,
        steps: dict[str, float] | None = None,
        writeback: WritebackState | None = None,
    ) -> ThinPoolStatus | None:
        """Make the kernel see a grown file: LOOP_SET_CAPACITY, then load and resume."""
        data = decision.target is GrowthTarget.DATA
        steps = steps if steps is not None else {"DECIDE_MS": self.clock()}
        try:
            self.kernel.loops.set_capacity(pool.data_loop if data else pool.meta_loop)
            steps["LOOP_MS"] = self.clock()
            pool.reload(self.kernel, pool.table.with_low_water_mark(decision.low_water_mark))
            steps["RELOAD_MS"] = self.clock()
        except ThinwatchError as exc:
            if isinstance(exc, RollbackError):
                self.own_suspend(pool, state, True)  # the kernel refused every resume: ours
            self.journal.failure(pool, state, decision.target, exc)
            return None
        state.unfinished = None
        attempts = state.failed_attempts
        if state.end_failure_streak():
            log.info(
                "pool %s: %s grew again after %d failed attempt(s)",
                pool.name,
                decision.target,
                attempts,
            )
        seconds = self.clock() - started
        log.debug(
            "pool %s: %s growth steps (ms): %s",
            pool.name,
            decision.target,
            _step_ms(started, steps),
        )
        record = GrowthRecord(decision.target, decision.old_size, decision.new_size, seconds)
        state.last_growth = record
        state.growths[decision.target] += 1
        if data:
            state.history = state.history.record_growth(seconds)
        # The growth is done: say so even if the status read after it fails (that failure is
        # then the check's, said and retried as such).
        try:
            status: ThinPoolStatus | None = pool.read_status(self.kernel.dm)
            unread: ThinwatchError | None = None
        except ThinwatchError as exc:
            status, unread = state.seen.status, exc
        event(
            logging.INFO,
            MessageId.DATA_GROWN if data else MessageId.METADATA_GROWN,
            f"{describe(decision)}; done in {seconds * 1000:.0f} ms",
            self.journal.fields(pool, status)
            | {
                "TARGET": decision.target,
                "OLD_SIZE_BYTES": decision.old_size,
                "NEW_SIZE_BYTES": decision.new_size,
                "GROWTH_MS": round(seconds * 1000, 1),
                **_step_ms(started, steps),
                "LOW_WATER_MARK_BLOCKS": decision.low_water_mark,
            }
            | (
                {}
                if writeback is None
                else {"DIRTY_BYTES": writeback.dirty, "WRITEBACK_BYTES": writeback.writeback}
            ),
        )
        if unread is not None:
            raise unread
        assert status is not None
        return status
