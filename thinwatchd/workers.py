"""Blocking work off the event loop: each job in a thread, its result back on the loop.

Building a pool can block for minutes: thin_check over a large metadata device (up to 300 s),
a udev that is slow to confirm a new device node (up to 30 s). The loop that pets the watchdog
and grows the other pools must not wait for that. A job runs in a thread of a small pool; when
it ends, a byte on a pipe wakes the loop, which calls the job's ``done`` callback there, so
daemon state is only ever touched from the loop's thread.

Jobs are keyed (by pool name): one job per key at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from thinwatchd.events import EventLoop

__all__ = ["Workers"]

log = logging.getLogger("thinwatchd")

#: Jobs running at once; more wait their turn (udev waits overlap, thin_checks share the CPUs).
MAX_THREADS = 8

Done = Callable[[Any, BaseException | None], None]


class Workers:
    """Runs keyed jobs in threads and reports each result on the event loop."""

    def __init__(self, loop: EventLoop, max_threads: int | None = None) -> None:
        self._loop = loop
        threads = max_threads or MAX_THREADS
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="thinwatchd-job")
        self._running: dict[str, tuple[Future[Any], Done]] = {}
        self._finished: list[str] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._wake_r, self._deliver)

    def busy(self, key: str) -> bool:
        """Return whether a job for key is running (its result not yet delivered)."""
        return key in self._running

    @property
    def idle(self) -> bool:
        return not self._running

    def submit(self, key: str, job: Callable[[], Any], done: Done) -> bool:
        """Run job() in a thread, then done(result, error) on the loop; False if key is busy."""
        if key in self._running:
            return False
        future = self._executor.submit(job)
        self._running[key] = (future, done)
        future.add_done_callback(lambda _f: self._finish(key))
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
        """Stop accepting jobs; running ones finish in their threads, results are dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop.remove_reader(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- internals --------------------------------------------------------------------------

    def _finish(self, key: str) -> None:
        """In the job's thread: queue the key and wake the loop."""
        with self._lock:
            self._finished.append(key)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"!")

    def _deliver(self) -> None:
        """On the loop: call done for every finished job."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._lock:
            finished, self._finished = self._finished, []
        for key in finished:
            future, done = self._running.pop(key)
            error = future.exception()
            try:
                done(None if error else future.result(), error)
            except Exception:
                log.critical("internal error handling the result of job %s", key, exc_info=True)
