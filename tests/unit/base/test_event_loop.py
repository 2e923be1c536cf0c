"""The event loop: readers, timers and signals, with real fds and a real signal."""

from __future__ import annotations

import os
import signal

from thinwatchd.base.event_loop import EventLoop, RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timers_run_in_order_and_cancel() -> None:
    clock = Clock()
    loop = EventLoop(clock)
    seen: list[str] = []
    loop.call_later(2, lambda: seen.append("b"))
    loop.call_later(1, lambda: seen.append("a"))
    loop.call_later(1.5, lambda: seen.append("x")).cancel()
    clock.now = 3
    loop.run_once(max_wait=0)
    assert seen == ["a", "b"]
    loop.close()


def test_reader_is_level_triggered() -> None:
    loop = EventLoop()
    r, w = os.pipe()
    calls: list[bytes] = []
    loop.add_reader(r, lambda: calls.append(os.read(r, 1)))
    os.write(w, b"xy")
    loop.run_once(max_wait=1)
    loop.run_once(max_wait=1)
    assert calls == [b"x", b"y"]
    loop.remove_reader(r)
    os.write(w, b"z")
    loop.run_once(max_wait=0)
    assert calls == [b"x", b"y"]
    loop.close()
    os.close(r)
    os.close(w)


def test_signal_is_dispatched_from_the_loop() -> None:
    loop = EventLoop()
    got: list[str] = []
    loop.add_signal_handler(signal.SIGHUP, lambda: got.append("hup"))
    os.kill(os.getpid(), signal.SIGHUP)
    assert got == []  # not from the signal handler itself
    loop.run_once(max_wait=1)
    assert got == ["hup"]
    loop.close()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_stop_ends_run() -> None:
    clock = Clock()
    loop = EventLoop(clock)
    loop.call_later(0, loop.stop)
    loop.run()
    loop.close()


def test_rate_limited_runs_at_most_once_per_interval_and_never_misses_the_last_call() -> None:
    clock = Clock()
    loop = EventLoop(clock)
    runs: list[float] = []
    limited = RateLimited(loop, 1.0, lambda: runs.append(clock.now))
    limited()  # the first call runs at once
    assert runs == [0.0]
    for now in (0.1, 0.5, 0.9):  # calls within the interval: one run, at its end
        clock.now = now
        limited()
        loop.run_once(max_wait=0)
    assert runs == [0.0]
    clock.now = 1.0
    loop.run_once(max_wait=0)
    assert runs == [0.0, 1.0]
    clock.now = 2.5  # a call after a quiet interval runs at once
    limited()
    assert runs == [0.0, 1.0, 2.5]
    clock.now = 2.6
    limited()
    limited.flush()  # a pending run, done now (before the loop stops)...
    assert runs == [0.0, 1.0, 2.5, 2.6]
    clock.now = 3.5
    loop.run_once(max_wait=0)  # ...is not done again at its time
    limited.flush()  # nothing pending: nothing to do
    assert runs == [0.0, 1.0, 2.5, 2.6]
    loop.close()
