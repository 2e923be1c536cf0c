"""The estimates file: the running daemon's fill rates and times to full, for `thinwatchd status`.

`status` runs apart from the daemon and sees only the kernel's state now; a fill rate needs a
history. The daemon writes what it measured after each pass (atomically, beside its instance
lock in /run/thinwatchd), and `status` shows it while it is fresh: a file left by a daemon that
has stopped says nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from thinwatchd.metrics import PoolMetrics

__all__ = ["ESTIMATES_NAME", "Estimate", "read_estimates", "render_estimates"]

#: The file's name, in the directory of the daemon's instance lock.
ESTIMATES_NAME = "estimates.json"
_VERSION = 1


@dataclass(frozen=True)
class Estimate:
    """One pool's figures as the daemon last measured them (seconds from when it was read)."""

    fill_rate_bytes_per_second: float | None
    seconds_to_cap: float | None  # None: not filling, or no cap
    seconds_to_backing_fs_reserve: float | None  # None: not filling, or the filesystem unknown


def render_estimates(figures: Iterable[PoolMetrics], now: float) -> str:
    """Return the file's text for the pools' figures, measured at now (wall-clock seconds)."""
    pools = {
        m.name: {
            "fill_rate_bytes_per_second": m.fill_rate,
            "seconds_to_cap": None if m.full_in is None else m.full_in.cap,
            "seconds_to_backing_fs_reserve": None if m.full_in is None else m.full_in.backing_fs,
        }
        for m in figures
    }
    return json.dumps({"version": _VERSION, "written_at": now, "pools": pools}) + "\n"


def read_estimates(path: Path, now: float, max_age: float) -> dict[str, Estimate] | None:
    """Return each pool's estimate from the file at path, counted down to now; None if there is
    no such file, it cannot be read, or it is older than max_age seconds (no daemon writes it)."""
    try:
        doc = json.loads(path.read_text())
        age = now - float(doc["written_at"])
        if doc["version"] != _VERSION or not -60 <= age <= max_age:
            return None
        return {name: _estimate(figures, max(0.0, age)) for name, figures in doc["pools"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _estimate(figures: dict[str, float | None], age: float) -> Estimate:
    def left(key: str) -> float | None:
        seconds = figures[key]
        return None if seconds is None else max(0.0, float(seconds) - age)

    rate = figures["fill_rate_bytes_per_second"]
    return Estimate(
        None if rate is None else float(rate),
        left("seconds_to_cap"),
        left("seconds_to_backing_fs_reserve"),
    )
