"""The daemon: build every pool, then keep them growing until told to stop.

Start-up: load the config, activate each pool (create, adopt or recreate), reconcile it once,
then report READY=1 — so /dev/mapper/<pool> exists for any unit ordered after us. Activation
runs in worker threads (base/workers.py): thin_check and udev waits block, and the loop must keep
petting the watchdog and growing the other pools meanwhile; pools start side by side. Then one event
loop: dm events (the control fd, DM_DEV_ARM_POLL + one DM_LIST_DEVICES for all pools), udev
events for the pools' devices, the safety timer, the watchdog, SIGHUP (reload) and SIGTERM/SIGINT
(stop; pools stay up, their consumers depend on them).

The loop only decides which pools to look at; growth/schedule.py runs their reconciles in
worker threads, side by side, and publish/publisher.py says what a pass found.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinwatchd.base.errors import ConfigError, ThinwatchError
from thinwatchd.base.event_loop import EventLoop, RateLimited, Timer
from thinwatchd.base.logs import MessageId, event
from thinwatchd.base.notify import Notifier
from thinwatchd.base.workers import JobRunner, Workers
from thinwatchd.config.load import load_settings
from thinwatchd.config.settings import PoolSettings, Settings, keep_fixed
from thinwatchd.daemon.dm_events import DmEvents
from thinwatchd.daemon.loop_watch import LoopOwners
from thinwatchd.daemon.unbuilt import Unbuilt
from thinwatchd.growth.extender import Extender
from thinwatchd.growth.journal import announce
from thinwatchd.growth.own_suspends import OwnSuspends
from thinwatchd.growth.page_cache import watch_writeback
from thinwatchd.growth.schedule import Scheduler, reconcile_workers
from thinwatchd.growth.space_watch import SPACE_WATCH_SECONDS, SpaceWatch, pool_files_by_fs
from thinwatchd.growth.state import ManagedPool, PoolState
from thinwatchd.kernel.api import Kernel, MetadataChecker
from thinwatchd.pool.bring_up import activate
from thinwatchd.pool.files import check_distinct_files
from thinwatchd.pool.loop_index import LoopIndex
from thinwatchd.pool.running import Pool
from thinwatchd.publish.figures import PoolMetrics
from thinwatchd.publish.publisher import PUBLISH_SECONDS, Publisher, pool_figures, summary_line

__all__ = ["Daemon", "Threads", "crash_absence"]

log = logging.getLogger("thinwatchd")

#: The least time a stopping daemon leaves its pools room for (a restart under systemd: the
#: unit's RestartSec= and the next start-up, which measured 3-9 s in the guest).
ABSENCE_MIN_SECONDS = 10.0
#: systemd's own time between a stop and the next start: the unit's RestartSec=2s, and more.
RESTART_GAP_SECONDS = 3.0
#: A job on pool files running this long (a stalled filesystem) no longer holds up the others.
FILE_STUCK_SECONDS = 1.0


def crash_absence(startup_seconds: float) -> float:
    """How long a killed daemon's pools go unwatched: systemd's gap, then the next start-up,
    counted twice as this one's took (the next may meet a worse load)."""
    return 2 * startup_seconds + RESTART_GAP_SECONDS


def stop_absence(startup_seconds: float) -> float:
    """How long a stopped daemon's pools go unwatched: as after a crash, but at least
    ABSENCE_MIN_SECONDS (the parting room it grows for them before it exits)."""
    return max(ABSENCE_MIN_SECONDS, crash_absence(startup_seconds))


def file_workers(loop: EventLoop) -> Workers:
    """The worker threads for syscalls on pool files and their filesystems."""
    return Workers(loop, max_threads=2, stuck_after=FILE_STUCK_SECONDS)


WorkersFor = Callable[[EventLoop], JobRunner]


@dataclass(frozen=True)
class Threads:
    """Where the daemon's blocking work runs: each kind in worker threads of its own (the
    engine tests pass ones that run their jobs inline)."""

    builds: WorkersFor = Workers  # thin_check, udev waits
    reconciles: WorkersFor = reconcile_workers  # checks and growths, per pool
    files: WorkersFor = file_workers  # syscalls on pool files, which can stall


class Daemon:
    """Owns the pools, the event loop and the conversation with systemd."""

    def __init__(
        self,
        config_path: Path,
        kernel: Kernel,
        *,
        notifier: Notifier | None = None,
        loop: EventLoop | None = None,
        check_metadata: MetadataChecker | None = None,
        udev_monitor: Any = None,
        estimates_file: Path | None = None,
        own_suspends_file: Path | None = None,
        age: float = 0.0,
        threads: Threads | None = None,
    ) -> None:
        threads = threads or Threads()
        self.config_path = config_path
        self.kernel = kernel
        self.notifier = notifier or Notifier()
        self.loop = loop or EventLoop()
        self.check_metadata = check_metadata
        self.udev_monitor = udev_monitor
        self.settings: Settings | None = None
        self.pools: dict[str, ManagedPool] = {}
        self.config_error: str | None = None
        self._check_timer: Timer | None = None
        # Syscalls on pool files and their filesystems, which can stall (a dead NFS server, a
        # disk retrying EIO): never on the loop's thread, and one stalled filesystem holds up
        # no other. The space watch's looks, the loops' checks after udev events, a reload's
        # look at the new config's files, the metrics and estimates files' writes.
        self.file_workers = threads.files(self.loop)
        self.publisher = Publisher(
            self.notifier,
            estimates_file,
            lambda write: self.file_workers.submit("publish", write, self._checked),
        )
        self.publications = RateLimited(self.loop, PUBLISH_SECONDS, self._publish)
        self._watchdog_started = False
        self._started = False  # start() done: READY=1 may be sent
        self.unbuilt = Unbuilt()
        self._reload_pending = False
        self._reloads = 0  # each reload's check of its files is a job of its own
        # When the process started (age: seconds before now, its interpreter and imports): a
        # start-up's whole duration is how long a restart leaves the pools unwatched.
        self._born = self.loop.time() - age
        self._ready_at: float | None = None
        self.loop_owners = LoopOwners(kernel)
        self.workers = threads.builds(self.loop)  # pool builds: thin_check, udev waits
        self.extender = Extender(
            kernel, self.loop.time, self.crash_absence_seconds, OwnSuspends(own_suspends_file)
        )
        self.space_watch = SpaceWatch(
            self.extender.backing, kernel.files, self.extender.page_cache, self.loop.time
        )
        self.scheduler = Scheduler(
            self.loop,
            self.extender,
            self.pools,
            threads.reconciles(self.loop),
            building=self.workers.busy,
            lost=self._lost,
            publish=self.publications,
        )
        self.dm_events = DmEvents(
            self.loop, kernel.dm, self.pools, changed=self.scheduler.run_pass, gone=self._lost_all
        )

    # -- start-up --------------------------------------------------------------------------

    def start(self) -> None:
        """Load the config and bring every pool up; raise on the first that cannot be.

        The pools are activated side by side in worker threads while the loop serves the
        watchdog. Raise ConfigError for a bad config, ThinwatchError for a pool that cannot be
        activated (the first in config order).
        """
        self.settings = load_settings(self.config_path)
        check_distinct_files(list(self.settings.pools), self.kernel.files)
        self._schedule_watchdog()
        if threading.current_thread() is threading.main_thread():  # (tests may start elsewhere)
            # A SIGHUP while the pools come up is kept for later, not the default (death).
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        failures: dict[str, BaseException] = {}
        loops = self._loop_index()  # one scan of the loops for every pool
        for settings in self.settings.pools:
            self._activate(
                settings,
                on_error=functools.partial(failures.__setitem__, settings.name),
                loops=loops,
            )
        self.workers.run_until_idle()
        self.loop.run_once(max_wait=0)  # dispatch a signal that came with the last result
        for settings in self.settings.pools:
            if settings.name in failures:
                raise failures[settings.name]
        self.extender.own_suspends.keep_only(frozenset(p.name for p in self.settings.pools))
        # Every pool's event_nr is still unseen, so this reconciles each pool once.
        self.dm_events.check()
        self.scheduler.workers.run_until_idle()
        self._started = True
        if self._reload_pending:
            self._reload_pending = False
            self.reload()

    def _activate(
        self,
        settings: PoolSettings,
        state: PoolState | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        loops: LoopIndex | None = None,
    ) -> None:
        """Activate a pool in a worker thread; register it on the loop when that is done.

        Without on_error, a failure is logged (a rebuild, a pool added by reload). loops is the
        pass's loop index, shared by the pools it activates.
        """
        name = settings.name

        def done(pool: Pool | None, error: BaseException | None) -> None:
            if error is not None or pool is None:
                if on_error is not None:
                    on_error(error or RuntimeError("no pool"))
                    return
                # Retried at each check if it is a new pool still in the config: a reload that
                # removed it while it was being built must not see it built later.
                wanted = name not in self.pools and self._configured(name)
                self.unbuilt.failed(settings, error, retry=wanted)
                return
            self.unbuilt.built(name)
            # A reload while it was being built may have changed its policy: apply the current
            # one (the files and block size it was built with stay, as for a running pool).
            pool.settings = self._current_settings(pool.settings)
            managed = self._register(pool, state)
            if on_error is None:  # at start-up, the first dm_events.check reconciles every pool
                self.scheduler.run_pass([managed])

        def build() -> Pool:
            ours = self.extender.own_suspends.holds(name)
            pool = activate(settings, self.kernel, self.check_metadata, loops, own_suspend=ours)
            self.extender.watch(pool)  # its files' first look, here rather than on the loop
            return pool

        self.workers.submit(name, build, done)

    def _loop_index(self) -> LoopIndex:
        """Return a loop index for one pass (it scans the loops on its first lookup only)."""
        return LoopIndex(self.kernel.loops, self.kernel.files)

    def _configured(self, name: str) -> bool:
        """Return whether the config in force names the pool."""
        return self.settings is not None and any(p.name == name for p in self.settings.pools)

    def _current_settings(self, built: PoolSettings) -> PoolSettings:
        pools = self.settings.pools if self.settings is not None else ()
        current = next((p for p in pools if p.name == built.name), None)
        if current is None:
            return built  # removed from the config meanwhile: watched until the next restart
        return keep_fixed(built, current)[0]

    def _register(self, pool: Pool, state: PoolState | None) -> ManagedPool:
        """Watch an activated pool (keeping the state of one rebuilt) and say how it came up."""
        settings = pool.settings
        managed = ManagedPool(pool, state or PoolState())
        # Ours to resume if its activation could not (the record keeps it so across restarts).
        self.extender.own_suspend(pool, managed.state, pool.left_suspended)
        self.pools[settings.name] = managed
        self.loop_owners.forget()  # its loops are new
        try:
            status = pool.read_status(self.kernel.dm)
        except ThinwatchError:
            status = None  # the first check reads it again, and says why it fails
        announce(pool, status)
        return managed

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        """Report ready and serve events until SIGTERM/SIGINT."""
        assert self.settings is not None
        loop = self.loop
        self.dm_events.listen()
        if self.udev_monitor is not None:
            loop.add_reader(self.udev_monitor.fileno(), self._on_udev)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        self._schedule_check()
        self._schedule_watchdog()
        self._schedule_writeback_watch()
        self._schedule_space_watch()
        self.notifier.ready(self.summary_line())
        self._ready_at = self.loop.time()
        log.info("thinwatchd ready: %s", self.summary_line())
        try:
            loop.run()
            self.leave_room()
            self.publications.flush()  # the files as of the last pass
            with contextlib.suppress(TimeoutError):  # (a stalled filesystem: not for long)
                self.file_workers.run_until_idle(timeout=FILE_STUCK_SECONDS)
        finally:
            self.workers.close()
            self.file_workers.close()
            self.scheduler.workers.close()
            loop.close()

    def leave_room(self) -> None:
        """Before the process exits: let the growths and checks in flight end (each was
        decided without the parting room), then grow every filling pool to last the absence
        (Scheduler.parting_pass), and wait for those growths."""
        self.scheduler.finish(share=0.5)
        self.scheduler.parting_pass(self.absence_seconds())
        self.scheduler.finish(share=0.5)

    def absence_seconds(self) -> float:
        """Return how long the pools may go unwatched after this daemon stops: twice its own
        start-up from exec to READY=1 (the next instance's, under a load that may be worse),
        plus systemd's gap (RestartSec=), at least ABSENCE_MIN_SECONDS."""
        return stop_absence((self._ready_at or self.loop.time()) - self._born)

    def crash_absence_seconds(self) -> float:
        """Return how long the pools may go unwatched if this daemon dies now (SIGKILL, the
        OOM killer): systemd's gap, then the next start-up, counted twice as its own; the data
        marks hold that long of filling (marks.base_mark). No floor: paid at all times, by
        every filling pool, this is the measured figure (about 3.6 s on a host, where
        start-up takes 0.3 s; 14 s in the emulated guest). Before READY=1, systemd's gap
        alone: the start-up is not measured yet."""
        took = 0.0 if self._ready_at is None else self._ready_at - self._born
        return crash_absence(took)

    def stop(self) -> None:
        """Stop serving; the pools stay up."""
        self.scheduler.stopping = True  # no new pass, no rebuild
        self.notifier.stopping()
        log.info("thinwatchd stopping; %d pool(s) stay active", len(self.pools))
        self.loop.stop()

    def _schedule_check(self) -> None:
        assert self.settings is not None

        def check() -> None:
            self.scheduler.run_pass(list(self.pools.values()), survey=True)
            loops = self._loop_index()
            for settings in list(self.unbuilt.pending.values()):
                if not self.workers.busy(settings.name):
                    self._activate(settings, loops=loops)
            self._schedule_check()

        self._check_timer = self.loop.call_later(self.settings.daemon.check_interval, check)

    def _schedule_writeback_watch(self) -> None:
        if self.kernel.memory is not None:  # without the counters, nothing to watch
            watch_writeback(
                self.loop, self.extender.page_cache, self.pools, self.scheduler.run_pass
            )

    def _schedule_space_watch(self) -> None:
        """Every SPACE_WATCH_SECONDS, look at the backing filesystems that are due, each in a
        job of its own (a stalled one holds up no other); pools refused room are reconciled
        as soon as their filesystem's free space rises."""
        watch = self.space_watch

        def tick() -> None:
            due = watch.due(self.loop.time())
            if due:
                pools = list(self.pools.values())  # looked through in a full look only
                for dev in due:
                    self.file_workers.submit(
                        f"fs {dev}",
                        functools.partial(watch.look, dev, pools),
                        functools.partial(looked, dev),
                    )
            self.loop.call_later(SPACE_WATCH_SECONDS, tick)

        def looked(dev: int, rose: object, error: BaseException | None) -> None:
            if error is not None:
                log.critical("internal error watching a backing filesystem", exc_info=error)
            elif rose:
                refused = [m for m in self.pools.values() if m.state.refused_since is not None]
                there = pool_files_by_fs(refused, watch.backing).get(dev, [])
                self.scheduler.run_pass(there)

        self.loop.call_later(SPACE_WATCH_SECONDS, tick)

    def _schedule_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval is None or self._watchdog_started:
            return
        self._watchdog_started = True

        def pet() -> None:
            self.notifier.watchdog()
            self.loop.call_later(interval, pet)

        pet()

    def _lost_all(self, pools: list[ManagedPool]) -> None:
        loops = self._loop_index()  # one scan of the loops for every pool rebuilt
        for managed in pools:
            self._lost(managed, loops)

    def _on_udev(self) -> None:
        """A block device changed behind our back: a pool or one of its loops removed, a loop
        no longer backed by its file. Growth itself is driven by dm events, not by these."""
        assert self.udev_monitor is not None
        try:
            device = self.udev_monitor.poll(timeout=0)
        except OSError as exc:  # ENOBUFS: the netlink socket overflowed, events were lost
            log.warning("udev events lost (%s); checking every pool", exc.strerror or exc)
            loops = self._loop_index()
            for managed in list(self.pools.values()):
                self._lost(managed, loops)
            self.scheduler.run_pass(list(self.pools.values()), survey=True)
            return
        if device is None or device.action not in ("remove", "change"):
            return
        named = self.pools.get(device.get("DM_NAME") or "")
        if device.action == "remove" and named is not None:
            self._lost(named)
            return
        owner = self.loop_owners.owner(self.pools.values(), device.device_node or "")
        if owner is None:
            return  # not one of ours: one dict lookup, however many pools there are
        managed, loop, path = owner
        if device.action == "remove":
            self._lost(managed)
        else:  # a stat of the loop's file: in a worker, as it may stall
            self.file_workers.submit(
                f"check {loop.path}",
                functools.partial(self.loop_owners.check, managed, loop, path),
                self._checked,
            )

    @staticmethod
    def _checked(_: object, error: BaseException | None) -> None:
        if error is not None:
            log.critical("internal error in a job on pool files", exc_info=error)

    def _lost(self, managed: ManagedPool, loops: LoopIndex | None = None) -> None:
        """The pool's device vanished behind our back: rebuild it over its metadata."""
        name = managed.pool.name
        if self.scheduler.stopping or self.workers.busy(name) or self.scheduler.workers.busy(name):
            return  # a reconcile that finds the device gone comes back here
        try:
            if self.kernel.dm.info(name) is not None:
                return
        except ThinwatchError as exc:
            self.scheduler.pool_error(managed, exc)
            return
        if name not in self.unbuilt.errors:  # said once, not at every failed retry
            log.error("pool %s: its device was removed by someone else; rebuilding it", name)
        managed.state.unfinished = None  # the rebuild finishes any growth from the files
        self._activate(managed.pool.settings, managed.state, loops=loops)  # keep its history

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config: new policy applies at once, new pools are built; never tear down."""
        if not self._started:
            self._reload_pending = True
            return
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            self.config_error = str(exc)
            event(
                logging.ERROR,
                MessageId.CONFIG_REJECTED,
                f"config {self.config_path} rejected, still running on the previous one: {exc}",
                {"CONFIG_KEY": exc.key_path},
            )
            self.notifier.ready(self.summary_line())
            return
        self.config_error = None
        self.settings = self._merge(new)
        event(
            logging.INFO,
            MessageId.CONFIG_RELOADED,
            f"config {self.config_path} reloaded",
            {"POOLS": len(new.pools)},
        )
        self._schedule_check_after_reload()
        self.notifier.ready(self.summary_line())

    def _merge(self, new: Settings) -> Settings:
        wanted: dict[str, PoolSettings] = {p.name: p for p in new.pools}
        for name, managed in self.pools.items():
            if name not in wanted:
                log.warning(
                    "pool %s is no longer in the config; it stays active but is not "
                    "watched after the next restart",
                    name,
                )
                continue
            old = managed.pool.settings
            settings, fixed = keep_fixed(old, wanted[name])
            if fixed:
                log.error(
                    "pool %s: pools.%s.%s cannot change on a running pool; keeping %s",
                    name,
                    name,
                    fixed[0],
                    getattr(old, fixed[0]),
                )
            managed.pool.settings = settings
        self.unbuilt.keep_only(wanted)
        live: dict[tuple[object, ...], tuple[str, str]] = {
            (loop.backing_dev, loop.backing_inode): (f"pools.{name}.{key}", str(path))
            for name, managed in self.pools.items()
            for key, loop, path in (
                ("metadata_file", managed.pool.meta_loop, managed.pool.settings.metadata_file),
                ("data_file", managed.pool.data_loop, managed.pool.settings.data_file),
            )
        }

        def checked(_: object, error: BaseException | None) -> None:
            if isinstance(error, ThinwatchError):
                log.error("new pools not built: %s", error)
                return
            if error is not None:
                log.critical("internal error checking the new config's files", exc_info=error)
                return
            if self.settings is not new:
                return  # a later reload came meanwhile: its own check builds its pools
            loops = self._loop_index()
            for name, settings in wanted.items():
                if name not in self.pools and not self.workers.busy(name):
                    self._activate(settings, loops=loops)

        self._reloads += 1
        self.file_workers.submit(
            f"reload {self._reloads}",
            lambda: check_distinct_files(list(new.pools), self.kernel.files, live),
            checked,
        )
        return new

    def _schedule_check_after_reload(self) -> None:
        if self._check_timer is not None:
            self._check_timer.cancel()
        self.scheduler.run_pass(list(self.pools.values()), survey=True)
        self._schedule_check()

    # -- reporting -------------------------------------------------------------------------

    def summary_line(self, figures: list[PoolMetrics] | None = None) -> str:
        """Return the one-line STATUS= summary (figures: metrics(), if made)."""
        figures = self.metrics() if figures is None else figures
        return summary_line(self.pools, figures, self.config_error)

    def metrics(self) -> list[PoolMetrics]:
        """Return every pool's figures as of the last pass (publisher.pool_figures)."""
        return pool_figures(self.pools.values(), self.extender.backing)

    def _publish(self) -> None:
        self.publisher.publish(self.pools, self.settings, self.metrics(), self.config_error)
