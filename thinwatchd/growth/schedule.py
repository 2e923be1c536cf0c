"""Which pools are reconciled when, off the event loop.

Each pool's reconcile (status read, growth) runs in a worker thread (base/workers.py), side by side
with the others', and reports back on the loop: a growth's resume waits for its pool's I/O to
drain, and one pool's drain, or a stalled backing filesystem, must not hold up another pool's
growth. An event's reconciles go first; the safety check's run one at a time behind them. One
reconcile per pool at a time; an event for a pool being reconciled is served by one more
reconcile after it. STATUS= and the published files are written once per pass, when its last
reconcile is done.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field

from thinwatchd.base.errors import KernelError, ThinwatchError
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.base.workers import JobRunner, Workers
from thinwatchd.growth.backing import BackingLook
from thinwatchd.growth.extender import Extender
from thinwatchd.growth.state import ManagedPool
from thinwatchd.policy.decide import parting_room

__all__ = [
    "FOLLOW_UP_BATCH_SECONDS",
    "FOLLOW_UP_SECONDS",
    "RECONCILE_THREADS",
    "STOP_WAIT_SECONDS",
    "STUCK_SECONDS",
    "SURVEY_THREADS",
    "Scheduler",
    "reconcile_workers",
]

log = logging.getLogger("thinwatchd")

#: Pools reconciled at once, each in a thread of its own: a growth's resume blocks until its
#: pool's in-flight I/O drains (hundreds of ms under writeback), so growths of pools that fall
#: due together must not queue behind each other's drains. The GIL is released in every ioctl
#: and file syscall they wait in. Few threads: each woken costs CPU on every safety check
#: (with 32, a 64-pool daemon idled at 1.5x the CPU of 8, under TCG).
RECONCILE_THREADS = 8
#: Safety-check reconciles at once (hundreds, each a millisecond): threads contending for the
#: GIL cost more than the checks.
SURVEY_THREADS = 1
#: A reconcile running this long (a stalled backing filesystem, a drain under heavy writeback)
#: no longer counts against RECONCILE_THREADS: the pools queued behind it get a thread.
STUCK_SECONDS = 0.5
#: A pool is checked again this long after each growth of it: the fill rate measured across
#: the growth sets its mark (a fill that has just begun was measured over the idle time before
#: it), before a daemon killed then could leave it too little room for its absence.
FOLLOW_UP_SECONDS = 1.0
#: Follow-ups due within this of each other are one pass: pools grown in one event (or close
#: together) are checked together, a pass per burst of growths, not one per pool.
FOLLOW_UP_BATCH_SECONDS = 0.5
#: On SIGTERM, wait this long for growths in flight: a thread cut off between suspend and
#: resume would leave its pool suspended and its writers hung (TimeoutStopSec= is 30 s).
STOP_WAIT_SECONDS = 20.0


class _Pass:
    """The reconciles of one pass still running: STATUS= and the metrics file are written once,
    when the last is done (a pass counts as running until it has submitted all of them)."""

    def __init__(self, publish: Callable[[], None]) -> None:
        self._publish = publish
        self._open = 1

    def add(self) -> None:
        self._open += 1

    def done(self) -> None:
        self._open -= 1
        if self._open == 0:
            self._publish()


def reconcile_workers(loop: EventLoop) -> Workers:
    """The worker threads that reconcile pools."""
    return Workers(
        loop,
        max_threads=RECONCILE_THREADS,
        stuck_after=STUCK_SECONDS,
        background_threads=SURVEY_THREADS,
    )


@dataclass(eq=False)
class Scheduler:
    """Submits pools' reconciles in passes, and handles what each reports back on the loop.

    The daemon owns the pools; this asks it, through callbacks, whether a pool is being
    (re)built, to rebuild one whose device is gone, and to publish after a pass.
    """

    loop: EventLoop
    extender: Extender
    pools: dict[str, ManagedPool]
    workers: JobRunner  # reconcile_workers, in the daemon
    _: KW_ONLY
    building: Callable[[str], bool]  # is this pool being (re)built now?
    lost: Callable[[ManagedPool], None]  # rebuild a pool whose device is gone
    publish: Callable[[], None]  # after a pass
    stopping: bool = field(default=False, init=False)
    _stuck: SaidOnce[str] = field(default_factory=SaidOnce, init=False)  # at a stop, said once
    # Follow-up checks by when they are due (FOLLOW_UP_BATCH_SECONDS apart): pool name -> pool.
    _follow_ups: dict[float, dict[str, ManagedPool]] = field(default_factory=dict, init=False)

    def run_pass(
        self, pools: Iterable[ManagedPool], woke: float | None = None, *, survey: bool = False
    ) -> None:
        """Reconcile pools in one pass, each in its own worker thread, side by side: each
        backing file and filesystem is looked at once for all of them, and STATUS= and the
        metrics file are updated once, when the last is done, so a pass costs the pools it
        names. A survey (the safety check) also looks at every pool file."""
        pools = list(pools)
        if not pools or self.stopping:
            return
        look = self.extender.new_pass(survey=survey)
        reconciles = _Pass(self.publish)
        for managed in pools:
            self._submit(look, managed, woke, reconciles, survey)
        reconciles.done()

    def _submit(
        self,
        look: BackingLook,
        managed: ManagedPool,
        woke: float | None,
        reconciles: _Pass,
        survey: bool,
    ) -> None:
        """Submit one pool's reconcile: a survey's in the background lane (one thread, taken
        after every event's), an event's in the urgent lane."""
        name = managed.pool.name
        if self.building(name):
            return  # being rebuilt in a worker; checked when that is done
        if self.workers.busy(name):
            if survey or self.workers.hurry(name):
                return  # one is running, or one that has not read the status yet is moved up
            # Its status may have moved since that reconcile read it: once more after it.
            managed.again = True
            if woke is not None:
                managed.again_woke = min(woke, managed.again_woke or woke)
            return
        reconciles.add()
        self.workers.submit(
            name,
            functools.partial(self.extender.reconcile, managed.pool, managed.state, woke, look),
            functools.partial(self._reconciled, managed, reconciles),
            background=survey,
        )

    def _reconciled(
        self, managed: ManagedPool, reconciles: _Pass, _status: object, error: BaseException | None
    ) -> None:
        """On the loop, after a pool's reconcile: every failure but one is the extender's to
        say and retry; ENXIO (KernelError: the device is gone) is the daemon's, to rebuild it."""
        try:
            if isinstance(error, KernelError):
                self.lost(managed)
            elif error is not None:  # a bug must not stop the other pools from being watched
                managed.state.failures += 1
                log.critical("pool %s: internal error", managed.pool.name, exc_info=error)
            elif managed.said.ends("error"):
                log.info("pool %s: checked without error again", managed.pool.name)
            self._schedule_retry(managed)
            self._follow_up(managed)
        finally:
            reconciles.done()
        if managed.again and self.pools.get(managed.pool.name) is managed:
            woke, managed.again, managed.again_woke = managed.again_woke, False, None
            self.run_pass([managed], woke)

    def pool_error(self, managed: ManagedPool, exc: ThinwatchError) -> None:
        """Count an error; log it when it differs from the pool's last one (once, not per check)."""
        managed.state.failures += 1
        if managed.said.says("error", str(exc)):
            log.error("pool %s: %s", managed.pool.name, exc)

    def _schedule_retry(self, managed: ManagedPool) -> None:
        """Come back for a pool whose growth failed when its backoff ends, not at the next
        safety check (which may be too late for a writer)."""
        retry_at = managed.state.retry_at
        if retry_at is None:
            return
        retry_at = max(retry_at, self.loop.time())  # overdue: at the next pass, not never
        if managed.retry is not None and not managed.retry.cancelled:
            if managed.retry.when <= retry_at:
                return
            managed.retry.cancel()  # a new streak with a shorter backoff

        def retry() -> None:
            managed.retry = None
            if self.pools.get(managed.pool.name) is managed:
                self.run_pass([managed])

        managed.retry = self.loop.call_at(retry_at, retry)

    def _follow_up(self, managed: ManagedPool) -> None:
        """Check a pool once more FOLLOW_UP_SECONDS (to FOLLOW_UP_BATCH_SECONDS more) after
        each growth of it while it fills, so its mark follows the rate measured across the
        growth: one status read per growth, in one pass with the others grown about then."""
        grown = managed.state.last_growth
        if grown is None or grown is managed.followed:
            return
        managed.followed = grown
        if not managed.state.history.fill_rate():
            return  # not filling (a growth at start-up): nothing to measure
        batch = FOLLOW_UP_BATCH_SECONDS
        due = math.ceil((self.loop.time() + FOLLOW_UP_SECONDS) / batch) * batch
        if due not in self._follow_ups:
            self._follow_ups[due] = {}

            def check() -> None:
                pools = self._follow_ups.pop(due).values()
                self.run_pass([m for m in pools if self.pools.get(m.pool.name) is m])

            self.loop.call_at(due, check)
        self._follow_ups[due][managed.pool.name] = managed

    def parting_pass(self, absence_seconds: float) -> None:
        """Before the process exits (a stop, a restart, an upgrade): grow each pool that fills
        so it has room for absence_seconds unwatched (policy.parting_room); the pool must not
        notice that the daemon was away. finish() then waits for these growths."""
        look = self.extender.new_pass()
        for managed in list(self.pools.values()):
            room = parting_room(managed.state.history, absence_seconds)
            name = managed.pool.name
            if not room or self.workers.busy(name) or self.building(name):
                continue
            self.workers.submit(
                name,
                functools.partial(
                    self.extender.reconcile, managed.pool, managed.state, None, look, room
                ),
                lambda _status, _error: None,  # said by the extender; nothing is retried now
            )

    def finish(self, share: float = 1.0) -> None:
        """Let growths in flight finish before the process exits (nothing new starts), for at
        most that share of STOP_WAIT_SECONDS."""
        timeout = STOP_WAIT_SECONDS * share
        try:
            self.workers.run_until_idle(timeout=timeout)
        except TimeoutError:
            stuck = set(self.workers.keys())
            news = [name for name in stuck if self._stuck.says(name)]
            if not news:
                return  # every one said at the last wait
            names = ", ".join(sorted(stuck))
            log.error(
                "stopping while pool(s) %s are still being checked or grown after %g s (a "
                "stalled backing filesystem?); if one is left suspended, the next start "
                "resumes it",
                names,
                timeout,
            )
