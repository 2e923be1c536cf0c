"""The data low-water mark a pool's table carries: configured, raised by the measured fill rate
and by the page cache's largest possible burst, and the early growth that writeback calls for.

Pure, like the policy (decide.py decides with these marks).
"""

from __future__ import annotations

import math
from fractions import Fraction

from thinwatchd.base.units import Bytes, DataBlocks, bytes_to_data_blocks_up
from thinwatchd.config.settings import PoolSettings
from thinwatchd.policy.forecast import FillHistory
from thinwatchd.policy.writeback import WritebackState

__all__ = [
    "ADAPTIVE_CAP_BYTES",
    "ADAPTIVE_MARGIN_BYTES",
    "ASSUMED_GROWTH_SECONDS",
    "LULL_WRITEBACK_BYTES",
    "MAX_PLANNED_GROWTH_SECONDS",
    "SAFETY_FACTOR",
    "base_mark",
    "growth_seconds",
    "low_water_mark",
    "threshold_mark",
    "writeback_threatens",
]


#: The adaptive mark covers this many growth durations of writing at the measured fill rate.
SAFETY_FACTOR = 4
#: ...plus this, for event delivery jitter and rate spikes between samples.
ADAPTIVE_MARGIN_BYTES = 32 * 1024**2
#: The adaptive part never exceeds this (the configured mark may): a glitched measurement (one
#: growth stalled for seconds) must not balloon the next growth. Fixed rather than relative to
#: the pool so the mark a growth writes into the table is the mark the next check computes.
ADAPTIVE_CAP_BYTES = 16 * 1024**3
#: An early growth waits until at most this much is under writeback: the growth's suspend waits
#: for the pool to take in everything in flight (about 0.3 s per 100 MiB in the test bed).
LULL_WRITEBACK_BYTES = 16 * 1024**2
#: Growth time assumed while none has been measured (the measured floor is ~0.1 s under load).
ASSUMED_GROWTH_SECONDS = 0.5
#: A longer growth was stalled (a frozen backing filesystem, seconds behind other work) and says
#: nothing about the next: one that took 60 s made the next step fill rate x 60 s (7.7 GiB for
#: a 64 MiB pool). The slowest measured under load was 1.4 s (heavy writeback).
MAX_PLANNED_GROWTH_SECONDS = 5.0


def threshold_mark(total: DataBlocks, percent: float) -> DataBlocks:
    """Return the free blocks at which usage reaches percent (0 when the threshold is off)."""
    if percent <= 0:
        return DataBlocks(0)
    return DataBlocks(max(0, total - math.ceil(total * Fraction(percent) / 100)))


def growth_seconds(history: FillHistory) -> float:
    return min(history.growth_seconds or ASSUMED_GROWTH_SECONDS, MAX_PLANNED_GROWTH_SECONDS)


def base_mark(
    settings: PoolSettings,
    history: FillHistory,
    writeback: WritebackState | None = None,
    unwatched_seconds: float = 0.0,
) -> DataBlocks:
    """Return the configured mark raised by the measured fill rate and by the page cache's
    largest possible burst (writeback).

    unwatched_seconds: how long the pool may go without a daemon (one killed, and restarted by
    systemd); the mark holds that long of filling at the measured rate, so a pool filling when
    the daemon dies does not run out of space before the next one answers."""
    floor = settings.low_water_mark
    if not settings.data.adaptive_low_water:
        return floor
    raised = 0.0
    if (rate := history.fill_rate()) is not None:
        covered = max(growth_seconds(history) * SAFETY_FACTOR, unwatched_seconds)
        raised = rate * covered + ADAPTIVE_MARGIN_BYTES
    if writeback is not None:
        # Dirty pages reach the pool all at once (a sync, the flusher) and a growth started
        # meanwhile waits until they are in: the mark must hold the whole burst.
        raised = max(raised, writeback.burst() + ADAPTIVE_MARGIN_BYTES)
    raised_bytes = Bytes(math.ceil(min(raised, ADAPTIVE_CAP_BYTES)))
    return max(floor, bytes_to_data_blocks_up(raised_bytes, settings.data_block_size))


def low_water_mark(
    settings: PoolSettings,
    data_blocks: DataBlocks,
    history: FillHistory | None = None,
    writeback: WritebackState | None = None,
    unwatched_seconds: float = 0.0,
) -> DataBlocks:
    """Return the data low-water mark to load for a pool of data_blocks blocks.

    The largest of the configured mark, the adaptive mark (fill rate, writeback burst) and the
    free blocks left at threshold_percent, so the kernel's one event per resume also fires at
    the threshold.
    """
    return max(
        base_mark(settings, history or FillHistory(), writeback, unwatched_seconds),
        threshold_mark(data_blocks, settings.data.threshold_percent),
    )


def writeback_threatens(
    free_bytes: Bytes, mark_bytes: Bytes, writeback: WritebackState, amplification: float = 1.0
) -> bool:
    """Return whether to grow a pool with free_bytes now, before the kernel's event.

    When the page cache's dirty and in-flight data, once written back, would take the pool
    below its mark, the event would come while that data drains, and a growth then waits for
    all of it. Grow early instead, at a moment with little under writeback (a lull: under a
    cp they come every few tenths of a second). Without one, the kernel's event at the mark
    still comes; the mark holds the whole burst, so waiting costs no space, only speed.
    amplification (FillHistory's) is how many pool bytes one byte written back becomes.
    """
    return (
        writeback.pending > 0
        and free_bytes <= mark_bytes + writeback.pending * amplification
        and writeback.writeback <= LULL_WRITEBACK_BYTES
    )
