"""Blocking work off the event loop: each job in a thread, its result back on the loop.

Building a pool can block for minutes: thin_check over a large metadata device (up to 300 s),
a udev that is slow to confirm a new device node (up to 30 s). A growth blocks while its pool's
I/O drains. The loop that pets the watchdog and grows the other pools must not wait for that. A
job runs in a thread of a small pool; when it ends, a byte on a pipe wakes the loop, which calls
the job's ``done`` callback there, so daemon state is only ever touched from the loop's thread.

Jobs are keyed (by pool name): one job per key at a time. Threads are started as jobs wait for
one, up to max_threads; with stuck_after, a job that has run that long stops counting against
it (a thread stuck on a stalled filesystem must not hold up the jobs queued behind it), up to
THREAD_CAP threads in all.

Two lanes: urgent jobs (a dm event's) are taken first, by any thread; background jobs (the
safety check's, hundreds at once, each a millisecond) by at most background_threads at a time.
Threads contending for the GIL cost more than the checks themselves: on the fake kernel a
check of 500 pools took 98 us of CPU per pool inline, 138 us in one thread and 250 us in eight.
A background job whose key turns urgent (its pool's event came while it waited) is moved up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from thinwatchd.base.event_loop import EventLoop, Timer

__all__ = ["JobRunner", "Workers"]

log = logging.getLogger("thinwatchd")

#: Jobs running at once; more wait their turn (udev waits overlap, thin_checks share the CPUs).
MAX_THREADS = 8
#: Threads at most, stuck ones included.
THREAD_CAP = 256
#: Background results are delivered at least this often while background jobs remain (a job
#: that stalls must not hold back the results of those that ran before it).
BACKGROUND_DELIVERY_SECONDS = 0.05

Done = Callable[[Any, BaseException | None], None]


class JobRunner(Protocol):
    """What the daemon asks of its workers (Workers; the engine tests run jobs inline)."""

    def busy(self, key: str) -> bool: ...

    def keys(self) -> list[str]: ...

    def submit(
        self, key: str, job: Callable[[], Any], done: Done, *, background: bool = False
    ) -> bool: ...

    def hurry(self, key: str) -> bool: ...

    def run_until_idle(self, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    key: str
    run: Callable[[], Any]
    done: Done
    background: bool = False
    started: float | None = None  # when a thread took it
    result: Any = None
    error: BaseException | None = None


class Workers:
    """Runs keyed jobs in threads and reports each result on the event loop."""

    def __init__(
        self,
        loop: EventLoop,
        max_threads: int | None = None,
        stuck_after: float | None = None,
        background_threads: int | None = None,
    ) -> None:
        self._loop = loop
        self._max_threads = max_threads or MAX_THREADS
        self._stuck_after = stuck_after
        self._background_threads = background_threads or self._max_threads
        # Daemon threads: a stop (SIGTERM) must not wait for a thin_check to finish.
        self._threads: list[threading.Thread] = []
        self._running: dict[str, _Job] = {}  # queued, running, or finished and not delivered
        self._finished: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._deliver)
        # Kept by the threads too, under the condition's lock:
        self._ready = threading.Condition()
        self._urgent: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._in_background: list[_Job] = []  # background jobs running
        self._in_progress: set[_Job] = set()  # every job a thread runs (one per thread)
        self._closing = False
        self._review: Timer | None = None
        self._drain: Timer | None = None  # delivers background results while any remain
        self._start_failed = False  # said once until a thread starts again

    @property
    def threads(self) -> int:
        """Return how many threads were started (they wait for jobs until close)."""
        return len(self._threads)

    def busy(self, key: str) -> bool:
        """Return whether a job for key is running (its result not yet delivered)."""
        return key in self._running

    def keys(self) -> list[str]:
        """Return the keys of the jobs running (their results not yet delivered)."""
        return list(self._running)

    def submit(
        self, key: str, job: Callable[[], Any], done: Done, *, background: bool = False
    ) -> bool:
        """Run job() in a thread, then done(result, error) on the loop; False if key is busy."""
        if key in self._running:
            return False
        item = _Job(key, job, done, background)
        self._running[key] = item
        with self._ready:
            (self._background if background else self._urgent).append(item)
            if not background or len(self._in_background) < self._background_threads:
                self._ready.notify()  # else a background job's end makes room, and notifies
        if background and self._drain is None:
            self._drain = self._loop.call_later(BACKGROUND_DELIVERY_SECONDS, self._drain_due)
        self._staff()
        return True

    def hurry(self, key: str) -> bool:
        """Move key's background job, if it still waits for a thread, to the urgent lane;
        return whether it still waits (it will then see whatever made it urgent)."""
        item = self._running.get(key)
        if item is None:
            return False
        with self._ready:
            if item.started is not None:
                return False
            if item.background:
                self._background.remove(item)  # O(queued): once per event, not per pool
                item.background = False
                self._urgent.append(item)
                self._ready.notify()
        self._staff()
        return True

    def run_until_idle(self, timeout: float | None = None) -> None:
        """Serve the loop (timers, the watchdog, other events) until every job is delivered."""
        deadline = None if timeout is None else self._loop.time() + timeout
        while self._running:
            wait = None if deadline is None else max(0.0, deadline - self._loop.time())
            if wait == 0.0:
                raise TimeoutError(f"jobs still running: {', '.join(self._running)}")
            self._loop.run_once(max_wait=wait if wait is not None else 1.0)

    def close(self) -> None:
        """Stop the threads once their current job ends; undelivered results are dropped."""
        for timer in (self._review, self._drain):
            if timer is not None:
                timer.cancel()
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        # The pipe stays open: a thread finishing its last job still writes to it (closing it
        # could hand its number to another file). The process exit closes it.
        self._loop.remove_reader(self._wake_r)

    # -- internals --------------------------------------------------------------------------

    def _stuck(self, jobs: list[_Job]) -> int:
        if self._stuck_after is None:
            return 0
        now = time.monotonic()
        return sum(
            1 for j in jobs if j.started is not None and now - j.started >= self._stuck_after
        )

    def _staff(self) -> None:
        """Start a thread for each job no idle thread will take, as far as the limits allow;
        if some must still wait, look again once a busy thread may count as stuck."""
        with self._ready:
            running = list(self._in_progress)
            stuck = self._stuck(running)
            background_room = self._background_threads - (
                len(self._in_background) - self._stuck(self._in_background)
            )
            takeable = len(self._urgent) + min(len(self._background), max(0, background_room))
            # Threads not running a job are waiting for one, or about to. Wake them: a
            # background job they left queued may be theirs to take now that a running one
            # counts as stuck (submit does not wake them while the lane looks full).
            if takeable:
                self._ready.notify(takeable)
            unserved = takeable - (len(self._threads) - len(self._in_progress))
        spare = max(
            0,
            min(self._max_threads - (len(self._threads) - stuck), THREAD_CAP - len(self._threads)),
        )
        for _ in range(min(unserved, spare) if unserved > 0 else 0):
            thread = threading.Thread(target=self._work, name="thinwatchd-job", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # EAGAIN: the unit's TasksMax=, the host's pid_max
                if not self._start_failed:
                    log.warning(
                        "cannot start a worker thread (%s); %d job(s) wait for the %d running",
                        exc,
                        unserved,
                        len(self._threads),
                    )
                self._start_failed = True
                break
            self._start_failed = False
            self._threads.append(thread)
            unserved -= 1
        with self._ready:
            # Jobs still queued: a thread just started may take one, but the running ones may
            # all turn stuck (a stalled filesystem) and none would be left to take the rest:
            # look again once they may count as stuck.
            waiting = unserved > 0 or bool(self._urgent or self._background)
        if waiting and self._review is None and (self._stuck_after or self._start_failed):
            self._review = self._loop.call_later(self._stuck_after or 1.0, self._look_again)

    def _drain_due(self) -> None:
        """Deliver the background results so far; come back while background jobs remain."""
        self._drain = None
        self._deliver()
        with self._ready:
            remaining = bool(self._background or self._in_background)
        if remaining:
            self._drain = self._loop.call_later(BACKGROUND_DELIVERY_SECONDS, self._drain_due)

    def _look_again(self) -> None:
        self._review = None
        if self._running:
            self._staff()

    def _take(self) -> _Job | None:
        """Wait for the next job this thread may run: urgent first (None: closing)."""
        with self._ready:
            while not self._closing:
                if self._urgent:
                    job = self._urgent.popleft()
                elif (
                    self._background
                    and len(self._in_background) - self._stuck(self._in_background)
                    < self._background_threads
                ):
                    job = self._background.popleft()
                    self._in_background.append(job)
                else:
                    # Background jobs held back: one running may count as stuck meanwhile.
                    self._ready.wait(timeout=self._stuck_after if self._background else None)
                    continue
                job.started = time.monotonic()
                self._in_progress.add(job)
                return job
        return None

    def _work(self) -> None:
        """A worker thread: run jobs until told to stop, waking the loop after each."""
        while (job := self._take()) is not None:
            try:
                job.result = job.run()
            except BaseException as exc:  # delivered to the loop, which decides
                job.error = exc
            with self._ready:
                self._in_progress.discard(job)
                if job.background:
                    self._in_background.remove(job)
                    self._ready.notify()
                # A background job's result can wait for the last one queued, or the drain
                # timer: waking the loop for each costs more than the jobs (two context
                # switches and the GIL, each).
                quiet = job.background and bool(self._background)
            self._finished.put(job)
            if not quiet:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"!")

    def _deliver(self) -> None:
        """On the loop: call done for every finished job."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while True:
            try:
                job = self._finished.get_nowait()
            except queue.Empty:
                return
            self._running.pop(job.key, None)
            try:
                job.done(job.result, job.error)
            except Exception:
                log.critical("internal error handling the result of job %s", job.key, exc_info=True)
