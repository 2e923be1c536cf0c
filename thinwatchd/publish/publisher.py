"""What the daemon publishes once per pass: every pool's figures, the one-line STATUS=, the
metrics file (Prometheus), the estimates file (for `thinwatchd status`) and the journal's
advisories. Nothing here makes a syscall but the two file writes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from thinwatchd.base.human import format_duration
from thinwatchd.base.notify import Notifier
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.base.units import Bytes
from thinwatchd.config.settings import Settings
from thinwatchd.growth.backing import BackingFiles
from thinwatchd.growth.state import ManagedPool
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.policy.forecast import full_in
from thinwatchd.publish.advisories import advise, soonest_full, warn_filesystems_full_soon
from thinwatchd.publish.estimates import render_estimates
from thinwatchd.publish.figures import PoolMetrics
from thinwatchd.publish.metrics import render, write_atomically
from thinwatchd.thin.status import ThinPoolWorkingStatus

__all__ = ["PUBLISH_SECONDS", "Publisher", "pool_figures", "summary_line"]

log = logging.getLogger("thinwatchd")


def pool_figures(pools: Iterable[ManagedPool], backing: BackingFiles) -> list[PoolMetrics]:
    """Return every pool's figures as of the last pass: its filesystem's free space as that
    pass saw it (no syscall here: publishing N pools after each pass made passes O(N²)), and
    when it runs out of room at the fill rates measured (every pool on a filesystem fills it)."""
    seen = []
    fs_rates: dict[int, float] = {}
    for managed in pools:
        data_file = str(managed.pool.settings.data_file)
        rate = managed.state.history.fill_rate()
        space = backing.space(data_file)
        if space is not None and rate:
            fs_rates[space[0]] = fs_rates.get(space[0], 0.0) + rate
        seen.append((managed, data_file, rate, space))
    out = []
    for managed, data_file, rate, space in seen:
        pool, state = managed.pool, managed.state
        status = state.seen.status
        used = Bytes(0)
        if isinstance(status, ThinPoolWorkingStatus):
            used = pool.data_bytes(status.data_used)
        fs = None if space is None else space[1]
        full = full_in(
            pool.settings,
            used,
            rate,
            fs_free=None if fs is None else fs.free,
            fs_total=0 if fs is None else fs.total,
            fs_rate=None if space is None else fs_rates.get(space[0]),
        )
        out.append(
            PoolMetrics(
                name=pool.name,
                block_size=pool.block_size,
                status=status,
                growths_data=state.growths[GrowthTarget.DATA],
                growths_metadata=state.growths[GrowthTarget.METADATA],
                failures=state.failures,
                last_growth_seconds=state.last_growth.seconds if state.last_growth else None,
                backing_fs_free_bytes=None if fs is None else fs.free,
                data_file_allocated_bytes=backing.allocated(data_file),
                data_max_bytes=pool.settings.data.max_size,
                refused=state.refused,
                fill_rate=rate,
                full_in=full,
                backing_fs=None if space is None else space[0],
                backing_fs_fill_rate=None if space is None else fs_rates.get(space[0]),
            )
        )
    return out


def summary_line(
    pools: Mapping[str, ManagedPool], figures: list[PoolMetrics], config_error: str | None
) -> str:
    """Return the one-line STATUS= summary, e.g. '3 pools, fullest docker-pool 71% data;
    docker-pool's filesystem at its reserve in 3 h 20 min'."""
    worst: tuple[float, str] | None = None
    for name, managed in pools.items():
        status = managed.state.seen.status
        if isinstance(status, ThinPoolWorkingStatus) and (
            worst is None or status.data_percent > worst[0]
        ):
            worst = (status.data_percent, name)
    n = len(pools)
    text = f"{n} pool{'s' if n != 1 else ''}"
    if worst is not None:
        text += f", fullest {worst[1]} {worst[0]:.0f}% data"
    soonest = soonest_full(figures)
    if soonest is not None:
        seconds, name, what = soonest
        text += f"; {name}{what} in {format_duration(seconds)}"
    if config_error:
        text += f"; config rejected: {config_error}"
    return text


#: A publication costs O(pools) whatever changed (every pool's figures, the advisories, STATUS=,
#: the metrics and estimates files: 38 ms of CPU at 1,000 fake pools on the host), so passes
#: that each grow one pool publish at most this often; the last pass's figures always go out,
#: at most this late. Scrapers read the metrics file every 15 s or more.
PUBLISH_SECONDS = 1.0


class Publisher:
    """Publishes a pass's figures; a file that cannot be written is said once until it can."""

    def __init__(
        self,
        notifier: Notifier,
        estimates_file: Path | None = None,
        off_loop: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.notifier = notifier
        self.estimates_file = estimates_file  # for `thinwatchd status` (estimates.py)
        # Runs the file writes away from the event loop (the metrics file's filesystem may
        # stall); without it, they are written at once.
        self.off_loop = off_loop
        self._write_failed: SaidOnce[str] = SaidOnce()  # published files whose last write failed
        self._full_soon_said: SaidOnce[int] = SaidOnce()  # filesystems (st_dev) warned about

    def publish(
        self,
        pools: Mapping[str, ManagedPool],
        settings: Settings | None,
        figures: list[PoolMetrics],
        config_error: str | None,
    ) -> None:
        horizon = settings.daemon.warn_full_within if settings is not None else 0.0
        for m in figures:
            managed = pools.get(m.name)
            if managed is not None:
                advise(m, managed.pool, managed.said, horizon)
        warn_filesystems_full_soon(figures, pools, self._full_soon_said, horizon)
        self.notifier.status(summary_line(pools, figures, config_error))
        writes: list[tuple[Path, str, str]] = []
        if settings is not None and settings.daemon.metrics_file is not None:
            writes.append((settings.daemon.metrics_file, render(figures), "metrics"))
        if self.estimates_file is not None:
            text = render_estimates(figures, time.time())
            writes.append((self.estimates_file, text, "estimates"))
        if not writes:
            return
        if self.off_loop is None:
            self._write_all(writes)
        else:
            self.off_loop(functools.partial(self._write_all, writes))

    def _write_all(self, writes: list[tuple[Path, str, str]]) -> None:
        for path, text, what in writes:
            self._write(path, text, what)

    def _write(self, path: Path, text: str, what: str) -> None:
        """Replace a published file; say a failure once until a write succeeds again."""
        try:
            write_atomically(path, text)
        except OSError as exc:
            if self._write_failed.says(what):
                log.warning("cannot write %s to %s: %s", what, path, exc.strerror or exc)
        else:
            self._write_failed.ends(what)
