"""The page cache as the pools see it: one sample of the dirty-memory counters serves every pool
reconciled in a pass, and whether what is dirty may take a pool below its mark before the
kernel's event (an early growth, in a lull)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from thinwatchd.base.errors import ThinwatchError
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.base.units import Bytes, data_blocks_to_bytes
from thinwatchd.growth.state import ManagedPool, PoolState, Topic
from thinwatchd.kernel.api import MemoryApi
from thinwatchd.policy.low_water import writeback_threatens
from thinwatchd.policy.writeback import WritebackState, parse_writeback
from thinwatchd.pool.running import Pool
from thinwatchd.thin.status import ThinPoolWorkingStatus

__all__ = [
    "WRITEBACK_SAMPLE_SECONDS",
    "WRITEBACK_WATCH_SECONDS",
    "PageCache",
    "threatened",
    "watch_writeback",
]

log = logging.getLogger("thinwatchd")

#: A writeback sample is reused for this long: one read per pass, not one per pool.
WRITEBACK_SAMPLE_SECONDS = 0.05
#: How often the page cache's dirty counters are sampled (two procfs reads for all pools): at
#: the dirty rates of a cp, well under the time it takes to dirty a pool's headroom.
WRITEBACK_WATCH_SECONDS = 0.2


class PageCache:
    """Samples the dirty-memory counters, at most once per WRITEBACK_SAMPLE_SECONDS."""

    def __init__(self, memory: MemoryApi | None, clock: Callable[[], float]) -> None:
        self.memory = memory
        self.clock = clock
        self._sample: tuple[float, WritebackState | None] | None = None
        self._lock = threading.Lock()  # pools are reconciled in threads side by side
        self._said: SaidOnce[str] = SaidOnce()  # "error": the last failed read

    def sample(self) -> WritebackState | None:
        """Return a recent sample of the dirty-memory counters; None without them.

        One read serves every pool checked in the same pass. Unreadable counters (a hardened
        /proc) only cost the writeback-aware mark: said once, and the configured one applies.
        """
        if self.memory is None:
            return None
        with self._lock:
            return self._read(self.memory)

    def _read(self, memory: MemoryApi) -> WritebackState | None:
        now = self.clock()
        if self._sample is not None and now - self._sample[0] < WRITEBACK_SAMPLE_SECONDS:
            return self._sample[1]
        sample: WritebackState | None = None
        try:
            sample = parse_writeback(*memory.writeback_texts())
        except ThinwatchError as exc:
            if self._said.says("error", str(exc)):
                log.warning(
                    "cannot read the page cache's dirty counters: %s; low-water marks "
                    "ignore writeback until they can be read",
                    exc,
                )
        else:
            if self._said.ends("error"):
                log.info("the page cache's dirty counters are read again")
        self._sample = (now, sample)
        return sample


def threatened(pool: Pool, state: PoolState, writeback: WritebackState) -> bool:
    """Return whether the page cache may hold enough to take the pool below its mark, by the
    last status read less all writeback completed since (no syscall: the daemon asks this of
    every pool at each writeback sample)."""
    status = state.seen.status
    if (
        not pool.settings.data.adaptive_low_water
        or not isinstance(status, ThinPoolWorkingStatus)
        or state.seen.written_at_status is None
        or Topic.DATA_REFUSED in state.said  # said already; the safety check comes back
        or state.retry_at is not None  # backing off; its timer comes back
        or Topic.SUSPENDED in state.said  # an operator's suspend: nothing grows it until resumed
    ):
        return False
    landed = max(0, writeback.written - state.seen.written_at_status)
    block_size = pool.settings.data_block_size
    free = Bytes(data_blocks_to_bytes(status.data_free, block_size) - landed)
    mark = data_blocks_to_bytes(pool.table.low_water_mark, block_size)
    return writeback_threatens(free, mark, writeback, state.history.amplification)


def watch_writeback(
    loop: EventLoop,
    page_cache: PageCache,
    pools: Mapping[str, ManagedPool],
    grow: Callable[[list[ManagedPool]], None],
) -> None:
    """Every WRITEBACK_WATCH_SECONDS, hand the pools the page cache threatens to grow: before
    its dirty pages are written back, a growth stalls nobody, where one at the kernel's event
    waits for the whole burst."""

    def watch() -> None:
        writeback = page_cache.sample()
        if writeback is not None:
            grow([m for m in list(pools.values()) if threatened(m.pool, m.state, writeback)])
        loop.call_later(WRITEBACK_WATCH_SECONDS, watch)

    loop.call_later(WRITEBACK_WATCH_SECONDS, watch)
