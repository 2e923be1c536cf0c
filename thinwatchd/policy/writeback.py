"""Page-cache writeback as the kernel counts it: what can reach a thin pool at once.

A filesystem on a thin volume writes through the page cache. Its dirty pages cost the pool
nothing until writeback pushes them into the thin, and then they arrive all together: up to
the kernel's dirty limit (balance_dirty_pages lets one device hold about the whole global limit
when nothing else is dirty). A pool whose low-water mark is smaller than that burst runs out of
space before a growth can land, and a growth that starts while the burst drains waits for it
(docs/writeback-growth.md). So the policy sizes the mark from the limit, and the daemon grows a
pool early, while what threatens it is still dirty and not yet in writeback.

Inputs, all global (the kernel has no per-device dirty count outside debugfs):

- ``/proc/meminfo`` ``Dirty`` and ``Writeback`` (kB): what is waiting and what is in flight now;
- ``/proc/vmstat`` ``nr_dirty_threshold`` (pages): the kernel's own current global_dirty_limits(),
  whether vm.dirty_ratio or vm.dirty_bytes set it; ``nr_written`` (pages, cumulative): writeback
  completions, an upper bound on what buffered writes put into any pool since a status read.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from thinwatchd.base.errors import StatusParseError

__all__ = ["OVERSHOOT", "PAGE_BYTES", "WritebackState", "parse_writeback"]

#: The counters in /proc/vmstat are pages; x86-64 and arm64 (4K) pages are 4096 bytes.
PAGE_BYTES = 4096
#: balance_dirty_pages paces writers toward a smoothed limit (dirty_limit follows thresh with a
#: lag) and lets each task overshoot by its ratelimit: dirty + writeback may exceed the
#: threshold by about an eighth before writers block (mm/page-writeback.c).
OVERSHOOT = Fraction(9, 8)


@dataclass(frozen=True)
class WritebackState:
    """One sample of the kernel's dirty-memory counters, in bytes."""

    dirty: int  # Dirty: written by someone, not yet handed to the device
    writeback: int  # Writeback: handed to the device, not yet completed
    dirty_limit: int  # nr_dirty_threshold: where writers get throttled
    written: int  # nr_written: writeback completed since boot (cumulative)

    @property
    def pending(self) -> int:
        """Return what may reach a pool from the page cache without any more writing."""
        return self.dirty + self.writeback

    def burst(self) -> int:
        """Return the most buffered writing that can reach one pool at once."""
        return max(int(self.dirty_limit * OVERSHOOT), self.pending)


def _fields(text: str, source: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    if not out:
        raise StatusParseError(source, 0, text[:60])
    return out


def parse_writeback(meminfo: str, vmstat: str) -> WritebackState:
    """Return the sample in the texts of /proc/meminfo (kB) and /proc/vmstat (pages)."""
    mem, vm = _fields(meminfo, "/proc/meminfo"), _fields(vmstat, "/proc/vmstat")
    try:
        return WritebackState(
            dirty=mem["Dirty"] * 1024,
            writeback=mem["Writeback"] * 1024,
            dirty_limit=vm["nr_dirty_threshold"] * PAGE_BYTES,
            written=vm["nr_written"] * PAGE_BYTES,
        )
    except KeyError as exc:
        raise StatusParseError(str(exc.args[0]), 0, "missing") from None
