"""Blocking work off the event loop: each job in a thread, its result back on the loop.

Building a pool can block for minutes: thin_check over a large metadata device (up to 300 s),
a udev that is slow to confirm a new device node (up to 30 s). The loop that pets the watchdog
and grows the other pools must not wait for that. A job runs in a thread of a small pool; when
it ends, a byte on a pipe wakes the loop, which calls the job's ``done`` callback there, so
daemon state is only ever touched from the loop's thread.

Jobs are keyed (by pool name): one job per key at a time. Threads are started as jobs wait for
one, up to max_threads; with stuck_after, a job that has run that long stops counting against
it (a thread stuck on a stalled filesystem must not hold up the jobs queued behind it), up to
THREAD_CAP threads in all. Few threads by default: every thread woken costs CPU on each pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinwatchd.events import EventLoop, Timer

__all__ = ["Workers"]

log = logging.getLogger("thinwatchd")

#: Jobs running at once; more wait their turn (udev waits overlap, thin_checks share the CPUs).
MAX_THREADS = 8
#: Threads at most, stuck ones included.
THREAD_CAP = 256

Done = Callable[[Any, BaseException | None], None]


@dataclass
class _Job:
    key: str
    run: Callable[[], Any]
    done: Done
    result: Any = None
    error: BaseException | None = None


class Workers:
    """Runs keyed jobs in threads and reports each result on the event loop."""

    def __init__(
        self, loop: EventLoop, max_threads: int | None = None, stuck_after: float | None = None
    ) -> None:
        self._loop = loop
        self._max_threads = max_threads or MAX_THREADS
        self._stuck_after = stuck_after
        # Daemon threads: a stop (SIGTERM) must not wait for a thin_check to finish.
        self._threads: list[threading.Thread] = []
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._running: dict[str, _Job] = {}
        self._lock = threading.Lock()  # the counts below, kept by the threads too
        self._waiting = 0  # jobs queued, not yet taken by a thread
        self._idle = 0  # threads waiting for a job
        self._since: dict[int, float | None] = {}  # thread -> when its current job started
        self._review: Timer | None = None
        self._start_failed = False  # said once until a thread starts again
        self._finished: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._deliver)

    def busy(self, key: str) -> bool:
        """Return whether a job for key is running (its result not yet delivered)."""
        return key in self._running

    @property
    def threads(self) -> int:
        """Return how many threads were started (they wait for jobs until close)."""
        return len(self._threads)

    def keys(self) -> list[str]:
        """Return the keys of the jobs running (their results not yet delivered)."""
        return list(self._running)

    def submit(self, key: str, job: Callable[[], Any], done: Done) -> bool:
        """Run job() in a thread, then done(result, error) on the loop; False if key is busy."""
        if key in self._running:
            return False
        item = _Job(key, job, done)
        self._running[key] = item
        with self._lock:
            self._waiting += 1
        self._queue.put(item)
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
        if self._review is not None:
            self._review.cancel()
        for _ in self._threads:
            self._queue.put(None)
        # The pipe stays open: a thread finishing its last job still writes to it (closing it
        # could hand its number to another file). The process exit closes it.
        self._loop.remove_reader(self._wake_r)

    # -- internals --------------------------------------------------------------------------

    def _spare(self) -> int:
        """Return how many threads may still be started."""
        live = len(self._threads)
        if self._stuck_after is not None:
            now = time.monotonic()
            live -= sum(
                1
                for since in list(self._since.values())
                if since is not None and now - since >= self._stuck_after
            )
        return max(0, min(self._max_threads - live, THREAD_CAP - len(self._threads)))

    def _staff(self) -> None:
        """Start a thread for each job no idle thread will take, as far as _spare allows; if
        some must still wait, look again once a busy thread may count as stuck."""
        with self._lock:
            unserved = self._waiting - self._idle
        for _ in range(min(unserved, self._spare()) if unserved > 0 else 0):
            thread = threading.Thread(target=self._work, name="thinwatchd-job", daemon=True)
            self._since[id(thread)] = None
            try:
                thread.start()
            except RuntimeError as exc:  # EAGAIN: the unit's TasksMax=, the host's pid_max
                del self._since[id(thread)]
                if not self._start_failed:
                    log.warning("cannot start a worker thread (%s); %d job(s) wait for the %d "
                                "running", exc, unserved, len(self._threads))  # fmt: skip
                self._start_failed = True
                break
            self._start_failed = False
            self._threads.append(thread)
            unserved -= 1
        if unserved > 0 and self._review is None and (self._stuck_after or self._start_failed):
            self._review = self._loop.call_later(self._stuck_after or 1.0, self._look_again)

    def _look_again(self) -> None:
        self._review = None
        if self._running:
            self._staff()

    def _work(self) -> None:
        """A worker thread: run jobs until told to stop, waking the loop after each."""
        me = id(threading.current_thread())
        while True:
            with self._lock:
                self._idle += 1
            job = self._queue.get()
            with self._lock:
                self._idle -= 1
                if job is not None:
                    self._waiting -= 1
            if job is None:
                return
            self._since[me] = time.monotonic()
            try:
                job.result = job.run()
            except BaseException as exc:  # delivered to the loop, which decides
                job.error = exc
            self._since[me] = None
            self._finished.put(job)
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
                log.critical("internal error handling the result of job %s", job.key,
                             exc_info=True)  # fmt: skip
