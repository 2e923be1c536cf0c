"""The scale bed: N small pools on the fake kernel, started, then adopted by a second daemon."""

from __future__ import annotations

import collections
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbed.clock import Clock
from testbed.fake_kernel import FakeKernel, FakeNodes, FakePageCache
from testbed.workers import INLINE
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.notify import Notifier
from thinwatchd.daemon.daemon import Daemon
from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

MiB = 1024**2
CHECK_INTERVAL = 3600.0  # seconds: the tests fire the check themselves

#: Writes of each metrics file, by path (every bed writes its own); counted by whoever patches
#: thinwatchd.publish.publisher.write_atomically (tests/engine/test_scale.py does).
metrics_writes: collections.Counter[Path] = collections.Counter()


class CountingNotifier(Notifier):
    """Counts STATUS= updates asked for (sent or not: the line is built for each)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses = 0

    def status(self, text: str) -> bool:
        self.statuses += 1
        return super().status(text)


@dataclass(frozen=True)
class Cost:
    """What one pass cost."""

    calls: list[str]
    metrics_writes: int
    statuses: int
    seconds: float

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c.split(" ", 1)[0] == op)

    def summary(self) -> str:
        ops = collections.Counter(c.split(" ", 1)[0] for c in self.calls)
        return f"{len(self.calls)} calls in {self.seconds:.2f} s: {dict(ops.most_common())}"


def pool_config(root: Path, name: str) -> dict[str, object]:
    """A small pool: 4 MiB of data in 64 KiB blocks, grown by 4 MiB at its 1 MiB mark (few
    keys: 1,000 pools stay under the config's 20,000 values)."""
    return {
        "data_file": f"{root}/{name}.data",
        "metadata_file": f"{root}/{name}.meta",
        "data_size": "4MiB",
        "metadata_size": "2MiB",
        "low_water_mark": 16,
        "reserve": 0,
        "data": {"step": "4MiB"},
    }


def make_file(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class Bed:
    """N pools on one filesystem, started, then adopted by a second daemon (a restart)."""

    def __init__(self, root: Path, n: int, cache: bool = False) -> None:
        self.n = n
        self.root = root
        self.names = [f"p{i:04d}" for i in range(n)]
        self.fake = FakeKernel()
        # A page cache makes the marks hold its dirty limit (and the pools grow to twice that).
        self.cache = FakePageCache(self.fake, dirty_limit=4 * MiB) if cache else None
        files = Files(self.fake.syscalls)
        self.kernel = Kernel(self.fake, self.fake, FakeNodes(), files, memory=self.cache)
        self.clock = Clock()
        self.metrics = root / "metrics.prom"
        pools = {name: pool_config(root, name) for name in self.names}
        for name in self.names:
            make_file(f"{root}/{name}.meta", 2 * MiB)
            make_file(f"{root}/{name}.data", 4 * MiB)
        self.config = root / "config.yaml"
        daemon = {"check_interval": f"{CHECK_INTERVAL:g}s", "metrics_file": str(self.metrics)}
        # 1,000 pools: counts of calls, not a disk's worth of allocated blocks.
        defaults = {"preallocate": False}
        self.config.write_text(
            yaml.safe_dump({"daemon": daemon, "defaults": defaults, "pools": pools})
        )
        self.daemon = self._new_daemon()
        self.started = self.measure(self.daemon.start)
        self.daemon.workers.close()
        self.daemon.loop.close()
        self.daemon = self._new_daemon()
        self.adopted = self.measure(self.daemon.start)
        self.daemon._schedule_check()
        self._events: dict[int, Cost] = {}

    def _new_daemon(self) -> Daemon:
        self.notifier = CountingNotifier()
        return Daemon(
            self.config,
            self.kernel,
            notifier=self.notifier,
            loop=EventLoop(self.clock),
            threads=INLINE,
        )

    def close(self) -> None:
        self.daemon.workers.close()
        self.daemon.loop.close()
        self.fake.close()

    def measure(self, action: Callable[[], object]) -> Cost:
        calls, writes = len(self.fake.calls), metrics_writes[self.metrics]
        statuses = self.notifier.statuses
        started = time.monotonic()
        action()
        seconds = time.monotonic() - started
        return Cost(
            self.fake.calls[calls:],
            metrics_writes[self.metrics] - writes,
            self.notifier.statuses - statuses,
            seconds,
        )

    def _check(self) -> None:
        """The safety timer's pass over every pool."""
        self.clock.now += CHECK_INTERVAL
        self.daemon.loop.run_once(max_wait=0)

    @functools.cached_property
    def check(self) -> Cost:
        """One safety check of the N pools, idle (after a first one settled anything due)."""
        self._check()
        return self.measure(self._check)

    def event(self, k: int) -> Cost:
        """One dm event read after k pools reached their low-water mark (each then grows)."""
        if k not in self._events:
            names = self.names[-k:]
            for name in names:
                status = parse_pool_status(self.fake.status(name)[0].params)
                assert isinstance(status, ThinPoolWorkingStatus)
                mark = self.daemon.pools[name].pool.table.low_water_mark
                self.fake.write_blocks(name, status.data_free - mark)
            grown = {
                name: self.daemon.pools[name].state.growths[GrowthTarget.DATA] for name in names
            }
            self.clock.now += 1
            self._events[k] = self.measure(self.daemon.dm_events.check)
            for name in names:
                assert (
                    self.daemon.pools[name].state.growths[GrowthTarget.DATA] == grown[name] + 1
                ), name
        return self._events[k]
