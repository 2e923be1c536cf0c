"""The fill rate, measured from status samples, and what it predicts: when a pool reaches its
cap or its filesystem's reserve, and when what a data file holds unused is worth giving back.

Pure, like the policy: the caller passes timestamps and figures in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from thinwatchd.config.settings import PoolSettings
from thinwatchd.policy.fs_room import reserve_bytes

__all__ = [
    "MAX_AMPLIFICATION",
    "RECLAIM_HINT_BYTES",
    "FillHistory",
    "FullIn",
    "full_in",
    "seconds_until",
    "worth_reclaiming",
]


#: Amplification is measured over at least this much writeback, and never taken above this.
_MIN_LANDING_BYTES = 16 * 1024**2
MAX_AMPLIFICATION = 4.0
_HISTORY_WINDOW = 60.0  # seconds of fill samples kept
_MIN_RATE_SPAN = 0.25  # seconds; shorter spans give noisy rates
_MAX_SAMPLES = 64


@dataclass(frozen=True)
class FillHistory:
    """Recent data usage samples and the last measured growth time, kept by the caller."""

    samples: tuple[
        tuple[float, int], ...
    ] = ()  # (monotonic seconds, data used bytes), oldest first
    growth_seconds: float | None = None  # event-to-resumed time of the last growth
    #: Pool bytes allocated per byte of page-cache writeback (small files, filesystem metadata
    #: and whole pool blocks for partial writes make it more than 1), and the (data used bytes,
    #: WritebackState.written) it was last measured from.
    amplification: float = 1.0
    landing: tuple[int, int] | None = None

    def record(self, now: float, used_bytes: int) -> FillHistory:
        """Return this history with a sample added and samples out of the window dropped."""
        kept = tuple(s for s in self.samples if 0 <= now - s[0] <= _HISTORY_WINDOW)
        return replace(self, samples=(*kept[-(_MAX_SAMPLES - 1) :], (now, used_bytes)))

    def record_landing(self, used_bytes: int, written: int) -> FillHistory:
        """Return this history with the amplification measured since the last landing.

        written is global (every filesystem's writeback), so the measure errs low when others
        write too; direct writers err it high. Spans under _MIN_LANDING_BYTES keep accumulating.
        """
        if self.landing is None or used_bytes < self.landing[0] or written < self.landing[1]:
            return replace(self, landing=(used_bytes, written))
        grown, landed = used_bytes - self.landing[0], written - self.landing[1]
        if landed < _MIN_LANDING_BYTES:
            return self
        measured = min(MAX_AMPLIFICATION, max(1.0, grown / landed))
        blended = max(1.0, (self.amplification + measured) / 2)
        return replace(self, amplification=blended, landing=(used_bytes, written))

    def record_growth(self, seconds: float) -> FillHistory:
        """Return this history with a measured growth duration."""
        return replace(self, growth_seconds=seconds)

    def fill_rate(self) -> float | None:
        """Return the fill rate in bytes/s, None without two samples far enough apart.

        The steepest slope from any kept sample to the newest one: a burst that just started shows
        at once, and a writer that just paused still counts for the window (conservative).
        """
        if len(self.samples) < 2:
            return None
        t1, u1 = self.samples[-1]
        rates = [(u1 - u0) / (t1 - t0) for t0, u0 in self.samples[:-1] if t1 - t0 >= _MIN_RATE_SPAN]
        return max(0.0, *rates) if rates else None


@dataclass(frozen=True)
class FullIn:
    """When a pool runs out of room at the measured fill rates, in seconds from now (0: there
    already; None: not filling, or no cap)."""

    cap: float | None  # its data reaches data.max_size
    backing_fs: float | None  # its backing filesystem reaches this pool's reserve


def full_in(
    settings: PoolSettings,
    used: int,
    rate: float | None,
    fs_free: int | None,
    fs_total: int,
    fs_rate: float | None,
) -> FullIn:
    """Return when the pool, using used bytes and filling at rate bytes/s, meets its cap, and
    when its filesystem (fs_free bytes free, filled at fs_rate by every pool on it) meets the
    reserve."""
    cap = settings.data.max_size
    fs = None
    if fs_free is not None:
        room = fs_free - reserve_bytes(settings, fs_total)
        fs = seconds_until(max(0, room), 0, fs_rate)
    return FullIn(None if cap is None else seconds_until(cap, used, rate), fs)


#: Allocated beyond the data in use, from which people are told how to give it back (and at
#: least a tenth of what the file takes).
RECLAIM_HINT_BYTES = 1024**3


def worth_reclaiming(allocated: int, used: int, *, said: bool = False) -> bool:
    """Return True if a data file taking allocated bytes on disk for used bytes of pool data
    holds enough that discards would give back to be worth saying; once said, it stays so
    until half that (no flapping around the threshold)."""
    floor = max(RECLAIM_HINT_BYTES, allocated // 10)
    return allocated - used >= (floor // 2 if said else floor)


def seconds_until(limit: int, used: int, rate: float | None) -> float | None:
    """Return the seconds until used bytes reach limit at rate bytes/s: 0 when there already,
    None when nothing is filling it (no rate measured, or none)."""
    if used >= limit:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return (limit - used) / rate
