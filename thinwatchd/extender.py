"""Growth execution: apply the policy's decisions to a pool, and report what happened.

``Extender.reconcile(pool)`` is the one routine every trigger runs (a dm event, a udev event,
the safety timer): read the status, ask the pure policy (policy.py) what to do, and do it:

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from thinwatchd.backing import BackingFiles, BackingLook
from thinwatchd.errors import KernelError, ThinwatchError
from thinwatchd.forecast import FillHistory
from thinwatchd.kernel.api import Kernel, MemoryApi
from thinwatchd.logs import MessageId, event
from thinwatchd.marks import low_water_mark, writeback_threatens
from thinwatchd.policy import (
    BackingFs,
    Decision,
    Grow,
    GrowthTarget,
    NoAction,
    RefusalReason,
    Refuse,
    backing_shortfall,
    decide_data,
    decide_metadata,
    describe,
    no_space_mode,
)
from thinwatchd.pool import Pool, ensure_resumed
from thinwatchd.status import NoSpacePolicy, PoolMode, ThinPoolStatus, ThinPoolWorkingStatus
from thinwatchd.units import format_bytes
from thinwatchd.writeback import WritebackState, parse_writeback

__all__ = ["Extender", "GrowthRecord", "PoolState", "pool_fields"]

log = logging.getLogger("thinwatchd")

#: Growths one reconcile may chain (metadata then data, or a writer outrunning a growth).
_MAX_ROUNDS = 4
#: A writeback sample is reused for this long: one read per pass, not one per pool.
WRITEBACK_SAMPLE_SECONDS = 0.05
#: Retry delays after failed growths: doubling from the first, up to the last.
RETRY_FIRST_SECONDS = 0.25
RETRY_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class GrowthRecord:
    """One completed growth."""

    target: str
    old_size: int
    new_size: int
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
    last_growth: GrowthRecord | None = None
    status: ThinPoolStatus | None = None
    written_at_status: int | None = None  # WritebackState.written when status was read
    event_nr: int = -1


def pool_fields(
    pool: Pool, status: ThinPoolStatus | None, allocated: int | None = None
) -> dict[str, object]:
    """Return the structured journal fields describing a pool's state; allocated is what its
    data file takes on disk (beyond the data in use: what discards would give back)."""
    fields: dict[str, object] = {"POOL": pool.name}
    if allocated is not None:
        fields["DATA_FILE_ALLOCATED_BYTES"] = allocated
    if isinstance(status, ThinPoolWorkingStatus):
        usage = status.usage_bytes(pool.block_bytes)
        fields |= {
            "DATA_USED_BYTES": usage.data_used,
            "DATA_TOTAL_BYTES": usage.data_total,
            "METADATA_USED_BYTES": usage.metadata_used,
            "METADATA_TOTAL_BYTES": usage.metadata_total,
        }
    if status is not None:
        fields["POOL_MODE"] = status.mode.value
    return fields


def _failure_key(exc: ThinwatchError) -> str:
    """What makes two failures "the same" for saying it once per streak: the errno, whatever
    step or file met it (one full disk fails the open, the stat and the statvfs alike)."""
    return f"errno {exc.errno}" if isinstance(exc, KernelError) else str(exc)


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

    def __init__(self, kernel: Kernel, clock: Callable[[], float] = time.monotonic) -> None:
        self.kernel = kernel
        self.clock = clock
        # Every pool file watched: their unwritten sparse space counts as promised.
        self.backing = BackingFiles(kernel.files)
        self._sample: tuple[float, WritebackState | None] | None = None
        self._sample_lock = threading.Lock()  # pools are reconciled in threads side by side
        self._writeback_error: str | None = None  # the last failed read, said once

    # -- passes ----------------------------------------------------------------------------

    def _fields(self, pool: Pool, status: ThinPoolStatus | None) -> dict[str, object]:
        """pool_fields, with the data file's allocated bytes as last looked at."""
        allocated = self.backing.allocated(str(pool.settings.data_file))
        return pool_fields(pool, status, allocated)

    def watch(self, pool: Pool) -> None:
        """Count the pool's files among those that share its filesystems (a pool just built)."""
        self.backing.watch((str(pool.settings.data_file), str(pool.settings.metadata_file)))

    def new_pass(self, *, survey: bool = False) -> BackingLook:
        """Start a pass over some pools: each backing file and filesystem is looked at once in
        it. A survey (the safety check) looks at every watched file, keeping the others' figures
        that an event pass reuses at most one check old."""
        return self.backing.new_pass(survey=survey)

    # -- the page cache --------------------------------------------------------------------

    def writeback(self) -> WritebackState | None:
        """Return a recent sample of the dirty-memory counters; None without them.

        One read serves every pool checked in the same pass. Unreadable counters (a hardened
        /proc) only cost the writeback-aware mark: said once, and the configured one applies.
        """
        memory = self.kernel.memory
        if memory is None:
            return None
        with self._sample_lock:
            return self._writeback(memory)

    def _writeback(self, memory: MemoryApi) -> WritebackState | None:
        now = self.clock()
        if self._sample is not None and now - self._sample[0] < WRITEBACK_SAMPLE_SECONDS:
            return self._sample[1]
        sample: WritebackState | None = None
        try:
            sample = parse_writeback(*memory.writeback_texts())
        except ThinwatchError as exc:
            if str(exc) != self._writeback_error:
                self._writeback_error = str(exc)
                log.warning(
                    "cannot read the page cache's dirty counters: %s; low-water marks "
                    "ignore writeback until they can be read",
                    exc,
                )
        else:
            if self._writeback_error is not None:
                log.info("the page cache's dirty counters are read again")
                self._writeback_error = None
        self._sample = (now, sample)
        return sample

    def threatened(self, pool: Pool, state: PoolState, writeback: WritebackState) -> bool:
        """Return whether the page cache may hold enough to take the pool below its mark, by
        the last status read less all writeback completed since (nothing here is per pool
        syscall: the daemon asks this of every pool at each writeback sample)."""
        status = state.status
        if (
            not pool.settings.data.adaptive_low_water
            or not isinstance(status, ThinPoolWorkingStatus)
            or state.written_at_status is None
            or GrowthTarget.DATA in state.refusals  # said already; the safety check comes back
            or state.retry_at is not None  # backing off; its timer comes back
            or state.suspended_said  # an operator's suspend: nothing grows it until resumed
        ):
            return False
        landed = max(0, writeback.written - state.written_at_status)
        free = status.data_free * pool.block_bytes - landed
        mark = pool.table.low_water_mark * pool.block_bytes
        return writeback_threatens(free, mark, writeback, state.history.amplification)

    # -- the reconcile loop ----------------------------------------------------------------

    def reconcile(
        self,
        pool: Pool,
        state: PoolState,
        woke: float | None = None,
        look: BackingLook | None = None,
    ) -> ThinPoolStatus | None:
        """Bring one pool to a state with room to write; return its latest status.

        woke is when the loop woke for the event that led here: growth times count from it.
        look is the pass this reconcile belongs to (new_pass); without it, a pass of its own.
        A kernel or file error anywhere in the check is a failed growth as far as writers are
        concerned: said once, retried with backoff, and when_full's clock runs. Only ENXIO (the
        device is gone) is raised, for the daemon to rebuild the pool.
        """
        try:
            return self._reconcile(pool, state, woke, look or self.new_pass())
        except ThinwatchError as exc:
            if isinstance(exc, KernelError) and exc.errno == errno.ENXIO:
                raise
            self._note_failure(pool, state, "check", exc)
            if state.refused_since is None:
                state.refused_since = self.clock()
            self._retune_table(pool, state, None)
            return state.status

    def _reconcile(
        self, pool: Pool, state: PoolState, woke: float | None, look: BackingLook
    ) -> ThinPoolStatus:
        dm = self.kernel.dm
        started = self.clock() if woke is None else woke
        writeback = self.writeback()
        status = pool.read_status(dm)
        state.written_at_status = None if writeback is None else writeback.written
        if writeback is not None and isinstance(status, ThinPoolWorkingStatus):
            used = status.data_used * pool.block_bytes
            state.history = state.history.record_landing(used, writeback.written)
        if self._adopt_outside_change(pool, state, status):
            # Suspended by someone else: no growth, no retune; when_full's clock runs if room
            # was already lacking.
            state.status = status
            return status
        backing_off = state.retry_at is not None and self.clock() < state.retry_at
        blocked = False
        self._note_mode(pool, state, status)  # also while an unfinished growth keeps failing
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
                    self.clock(), status.data_used * pool.block_bytes
                )
            data_fs = look.figures(str(pool.settings.data_file))
            decision = self._decide(pool, state, status, look, writeback)
            if not isinstance(decision, Grow):
                blocked = isinstance(decision, Refuse) and decision.is_capacity
                if state.unfinished is None:  # nothing to retry: the growth is not wanted now
                    state.retry_at = None
                    state.failing, state.failed_attempts = None, 0
                break
            if backing_off or state.unfinished is not None:
                blocked = True  # backing off after a failure; the daemon's timer comes back
                break
            grown = self._grow(pool, state, decision, started, look, writeback)
            if grown is None:
                blocked = True
                break
            status, data_fs = grown, None  # the file grew: look again
            started = self.clock()
            self._note_mode(pool, state, status)
        blocked |= self._note_backing(
            pool, state, status, data_fs or look.figures(str(pool.settings.data_file))
        )
        if blocked:
            if state.refused_since is None:
                state.refused_since = self.clock()
        else:
            state.refused_since = None
        self._retune_table(pool, state, status, writeback)
        state.status = status
        return status

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
        size = status.data_total * pool.settings.data_block_size
        info = self.kernel.dm.info(pool.name)
        if info is None:
            raise KernelError("DM_DEV_STATUS", pool.name, errno.ENXIO, "the device is gone")
        if size == pool.length and not info.suspended:
            state.suspended_said = False
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
            return False
        if not state.suspended_said:
            state.suspended_said = True
            log.warning(
                "pool %s is suspended by someone else (dmsetup suspend?); its writers wait, "
                "and it is not grown, until it is resumed (dmsetup resume %s)", pool.name,
                pool.name,
            )  # fmt: skip
        return True

    def _decide(
        self,
        pool: Pool,
        state: PoolState,
        status: ThinPoolStatus,
        look: BackingLook,
        writeback: WritebackState | None,
    ) -> Decision:
        """Return the first decision that needs doing: metadata first (a pool out of it is ro)."""
        settings = pool.settings

        def metadata(fs: BackingFs) -> Decision:
            return decide_metadata(status, settings, fs, state.history, writeback)

        def data(fs: BackingFs) -> Decision:
            return decide_data(
                status,
                settings,
                fs,
                state.history,
                table_mark=pool.table.low_water_mark,  # the kernel's event came at this mark
                writeback=writeback,
            )

        meta = self._decide_on(look, str(settings.metadata_file), metadata)
        self._note_refusal(pool, state, meta, status)
        if isinstance(meta, Grow):
            return meta
        decision = self._decide_on(look, str(settings.data_file), data)
        self._note_refusal(pool, state, decision, status)
        return decision

    @staticmethod
    def _decide_on(
        look: BackingLook, path: str, decide: Callable[[BackingFs], Decision]
    ) -> Decision:
        """Decide on the pass's figures for path; when its filesystem's room limits the
        decision, decide again on fresh figures of every file there (others' promises may be
        one check old, and overstated)."""
        decision = decide(look.figures(path))
        if _room_bound(decision) and look.look_again(path):
            decision = decide(look.figures(path))
        return decision

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
        path = str(settings.data_file if data else settings.metadata_file)
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
            files.grow(path, decision.new_size, preallocate=settings.preallocate, sync=False,
                       identity=(loop.backing_dev, loop.backing_inode))  # fmt: skip
        except ThinwatchError as exc:
            look.changed(path)  # a failed preallocation may still have taken blocks
            self._note_failure(pool, state, decision.target, exc)
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
            self._note_failure(pool, state, decision.target, exc)
            return None
        state.unfinished = None
        if state.failing is not None:
            log.info("pool %s: %s grew again after %d failed attempt(s)", pool.name,
                     decision.target, state.failed_attempts)  # fmt: skip
        state.failing, state.failed_attempts, state.retry_at = None, 0, None
        seconds = self.clock() - started
        log.debug("pool %s: %s growth steps (ms): %s", pool.name, decision.target,
                  _step_ms(started, steps))  # fmt: skip
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
            status, unread = state.status, exc
        event(
            logging.INFO,
            MessageId.DATA_GROWN if data else MessageId.METADATA_GROWN,
            f"{describe(decision)}; done in {seconds * 1000:.0f} ms",
            self._fields(pool, status)
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

    def _note_failure(self, pool: Pool, state: PoolState, target: str, exc: ThinwatchError) -> None:
        """Count a failed growth (or check), say it once per streak, and back off."""
        state.failures += 1
        state.failed_attempts += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (state.failed_attempts - 1))
        state.retry_at = self.clock() + delay
        key = _failure_key(exc)
        if key == state.failing:
            log.debug("pool %s: attempt %d failed again: %s", pool.name,
                      state.failed_attempts, exc)  # fmt: skip
            return
        state.failing = key
        what = (
            f"growing {target} of {pool.name} failed: {exc}; the pool is resumed on its "
            f"previous size"
            if target != "check"
            else f"checking {pool.name} failed: {exc}"
        )
        event(
            logging.ERROR,
            MessageId.GROWTH_FAILED,
            f"{what}; retrying with backoff (next in {delay:g} s)",
            self._fields(pool, state.status) | {"TARGET": target},
        )

    def _note_backing(
        self, pool: Pool, state: PoolState, status: ThinPoolStatus, data_fs: BackingFs
    ) -> bool:
        """Say once when the data file's filesystem reaches its reserve while the pool still
        promises blocks (its writes will fail with EIO); return whether that is the case.

        data_fs is this check's look at it: after a failed growth, the one from before it (a
        look after it would only add a second failure to say)."""
        path = str(pool.settings.data_file)
        short = backing_shortfall(status, pool.settings, data_fs, pool.block_bytes)
        if bool(short) != state.backing_short:
            state.backing_short = bool(short)
            if short:
                event(
                    logging.ERROR,
                    MessageId.BACKING_FS_LOW,
                    f"pool {pool.name}: the filesystem under {path} is at its reserve but the "
                    f"pool may still write {format_bytes(short)} into holes of that file; those "
                    f"writes will fail with EIO. Free space there or lower "
                    f"pools.{pool.name}.reserve; when_full applies meanwhile",
                    self._fields(pool, status) | {"SHORTFALL_BYTES": short},
                )
            else:
                log.info("pool %s: the filesystem under %s has room again", pool.name, path)
        return bool(short)

    def _retune_table(
        self,
        pool: Pool,
        state: PoolState,
        status: ThinPoolStatus | None,
        writeback: WritebackState | None = None,
    ) -> None:
        """Reload once if the table's mark or no-space policy should change.

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
        table = pool.table
        if isinstance(status, ThinPoolWorkingStatus):
            mark = low_water_mark(pool.settings, status.data_total, state.history, writeback)
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
            key = _failure_key(exc)
            if key not in (state.failing, state.retune_failing):
                log.error("pool %s: cannot reload with %s: %s", pool.name, table.params(), exc)
            state.retune_failing = key
            return
        state.retune_failing = None
        if table.low_water_mark != old.low_water_mark:
            log.info("pool %s: low-water mark raised to %d blocks", pool.name,
                     table.low_water_mark)  # fmt: skip
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
                self._fields(pool, status) | {"NO_SPACE_POLICY": policy.value},
            )

    # -- reporting -------------------------------------------------------------------------

    def _note_refusal(
        self, pool: Pool, state: PoolState, decision: Decision, status: ThinPoolStatus
    ) -> None:
        """Log a refusal once when it starts or changes, and once when it ends."""
        target = decision.target
        before = state.refusals.get(target)
        if isinstance(decision, Refuse):
            key = decision.reason.value
            if before != key:
                state.refusals[target] = key
                event(
                    logging.ERROR,
                    MessageId.GROWTH_REFUSED,
                    describe(decision),
                    self._fields(pool, status) | {"TARGET": target, "REASON": key},
                )
        elif before is not None and isinstance(decision, (Grow, NoAction)):
            del state.refusals[target]
            log.info("pool %s: %s can grow again", pool.name, target)

    def _note_mode(self, pool: Pool, state: PoolState, status: ThinPoolStatus) -> None:
        """Log each change of the pool's mode (and needs_check) once, with what to do about it."""
        mode = status.mode
        needs_check = isinstance(status, ThinPoolWorkingStatus) and status.needs_check
        if (mode, needs_check) == (state.mode, state.needs_check):
            return
        first = state.mode is None
        state.mode, state.needs_check = mode, needs_check
        healthy = mode is PoolMode.WRITE and not needs_check
        if first and healthy:
            return
        level = logging.INFO if healthy else logging.ERROR
        text = f"pool {pool.name} is now in mode {mode.value}"
        if needs_check:
            text += (
                " and its metadata needs checking (needs_check): the kernel will neither write "
                "nor grow it. Stop its users, deactivate it and run thin_check, then thin_repair "
                "if that fails; see the kernel log for the metadata error"
            )
        if mode is PoolMode.FAIL:
            level = logging.CRITICAL
            text += ": the pool has failed; its metadata needs thin_check and thin_repair"
        fields = self._fields(pool, status) | {"NEEDS_CHECK": int(needs_check)}
        event(level, MessageId.POOL_MODE_CHANGED, text, fields)
