"""The event loop: one selector over the dm control fd, the udev monitor and signals, plus timers.

Nothing here knows about pools. The daemon registers readers (fd -> callback) and timers; the loop
sleeps in ``select`` until an fd is readable or the earliest timer is due, so it never busy-polls.
Signals arrive through ``signal.set_wakeup_fd`` and are dispatched from the loop, never from a
signal handler, so handlers may do anything.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["EventLoop", "RateLimited", "Timer"]

Callback = Callable[[], None]

log = logging.getLogger("thinwatchd")


@dataclass(order=True)
class Timer:
    """A scheduled callback; ``cancel()`` it to drop it."""

    when: float
    seq: int
    callback: Callback = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """A minimal single-threaded reactor built on ``selectors.DefaultSelector``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._clock = clock
        self._signal_handlers: dict[int, Callback] = {}
        self._wakeup_r: int | None = None
        self._wakeup_w: int | None = None
        self._old_wakeup_fd: int | None = None
        self._stopping = False

    # -- registration -----------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call callback whenever fd is readable (level-triggered)."""
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching fd; a no-op if it was not registered."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Run callback once at monotonic time ``when``."""
        timer = Timer(when, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        """Run callback once, delay seconds from now."""
        return self.call_at(self._clock() + delay, callback)

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run callback from the loop (not from the signal handler) when signum arrives."""
        if self._wakeup_r is None:
            self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
            self.add_reader(self._wakeup_r, self._dispatch_signals)
        self._signal_handlers[signum] = callback
        # The Python-level handler does nothing; the wakeup fd carries the signal number.
        signal.signal(signum, lambda _signum, _frame: None)

    def time(self) -> float:
        """Return the loop's clock (monotonic seconds)."""
        return self._clock()

    # -- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run()`` return after the current iteration."""
        self._stopping = True

    def run(self) -> None:
        """Dispatch events and timers until ``stop()`` is called."""
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_once(self, max_wait: float | None = None) -> None:
        """Wait for the next fd or timer (at most max_wait seconds) and dispatch what is ready."""
        timeout = self._next_timeout()
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        for key, _mask in self._selector.select(timeout):
            self._call(key.data)
            if self._stopping:
                return
        self._run_due_timers()

    @staticmethod
    def _call(callback: Callback) -> None:
        """Run a callback; a bug in one must not end the loop that serves every pool."""
        try:
            callback()
        except Exception:
            log.critical(
                "internal error in %s; the daemon goes on",
                getattr(callback, "__qualname__", callback),
                exc_info=True,
            )

    def close(self) -> None:
        """Release the selector and restore signal handling."""
        for signum in self._signal_handlers:
            signal.signal(signum, signal.SIG_DFL)
        self._signal_handlers.clear()
        if self._wakeup_r is not None and self._wakeup_w is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None else -1)
            self.remove_reader(self._wakeup_r)
            os.close(self._wakeup_r)
            os.close(self._wakeup_w)
            self._wakeup_r = self._wakeup_w = None
        self._selector.close()

    # -- internals --------------------------------------------------------------------------

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0].when - self._clock())

    def _run_due_timers(self) -> None:
        """Run the timers due now; one a callback adds for "now" waits for the next pass, so
        a timer that keeps rescheduling itself cannot starve the fds (and SIGTERM)."""
        now = self._clock()
        due = []
        while self._timers and self._timers[0].when <= now:
            due.append(heapq.heappop(self._timers))
        for timer in due:
            if not timer.cancelled:
                self._call(timer.callback)
            if self._stopping:
                return

    def _dispatch_signals(self) -> None:
        assert self._wakeup_r is not None
        try:
            data = os.read(self._wakeup_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self._call(handler)


class RateLimited:
    """Runs a callback on the loop at most once per interval, and never misses the last call.

    A call less than interval after the last run schedules one run at the interval's end
    (further calls until then join it), so the state as of the latest call is always acted on,
    at most interval late. For work whose cost grows with everything (not with what changed),
    called after events that may come many times a second.
    """

    def __init__(self, loop: EventLoop, interval: float, callback: Callback) -> None:
        self._loop = loop
        self._interval = interval
        self._callback = callback
        self._last: float | None = None
        self._pending: Timer | None = None

    def __call__(self) -> None:
        if self._pending is not None:
            return  # a run is due already; it will see this call's state
        now = self._loop.time()
        if self._last is None or now - self._last >= self._interval:
            self._run()
        else:
            self._pending = self._loop.call_at(self._last + self._interval, self._run)

    def flush(self) -> None:
        """Run now if a run is pending (before the loop stops for good)."""
        if self._pending is not None:
            self._pending.cancel()
            self._run()

    def _run(self) -> None:
        self._pending = None
        self._last = self._loop.time()
        self._callback()
