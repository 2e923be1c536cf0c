"""A clock for the daemon's event loop that moves only when a test or a bench moves it."""

from __future__ import annotations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
