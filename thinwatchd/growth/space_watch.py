"""The backing filesystems watched for a neighbour filling them: the pool files' holes are
claimed (allocated) before anyone else can take the space they promise.

A pool's free data blocks may lie in holes of its data file: blocks a discard punched, a sparse
growth (preallocate: false), or an adopted sparse file. A write there needs the filesystem to
allocate; on a full filesystem the loop device fails it with EIO. Metadata holes are worse: a
failed metadata write puts the pool read-only with needs_check. So:

- metadata holes are claimed as soon as they are seen (new metadata is allocated whole anyway);
- data holes are left to the host (fstrim gives space back) while the filesystem's headroom,
  its free space beyond what the holes promise, stays above room.claim_margin; under it, every
  hole of every pool file there is claimed at once. Discards, and the pool's own writes into
  holes, move free space and promises alike, so only a neighbour (or a growth) moves the
  headroom.

Each filesystem is looked at (one statvfs) before a neighbour at full speed could take the
headroom above the margin (room.next_look_seconds): every tick on a tight filesystem, rarely on
a roomy one. Its files are looked at again (lstat) when its free space rose (holes punched), and
before a claim. Looks run in worker threads, one job per filesystem, so a stalled filesystem
holds up neither the event loop nor another filesystem's watch.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from thinwatchd.base.errors import KernelError, ThinwatchError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.logs import MessageId, event
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.base.units import Bytes
from thinwatchd.growth.backing import BackingFiles
from thinwatchd.growth.page_cache import PageCache
from thinwatchd.growth.state import ManagedPool
from thinwatchd.kernel.api import FilesApi, FsSpace
from thinwatchd.policy.fs_room import claim_margin, must_claim, next_look_seconds, reserve_bytes

__all__ = ["SPACE_WATCH_SECONDS", "SpaceWatch", "pool_files_by_fs"]

log = logging.getLogger("thinwatchd")

#: The watch's tick: how often a tight filesystem is looked at.
SPACE_WATCH_SECONDS = 0.2
#: A roomy filesystem is looked at at least this often.
SPACE_WATCH_MAX_SECONDS = 10.0
#: A fill rate seen on a filesystem counts at half its weight after this long.
RATE_HALF_LIFE_SECONDS = 10.0
#: Holes found in a data file at its first look are said (once) from this size on.
HOLES_WORTH_SAYING = 1024**3


def pool_files_by_fs(
    pools: Iterable[ManagedPool], backing: BackingFiles
) -> dict[int, list[ManagedPool]]:
    """Return the pools with a file on each filesystem (st_dev), as last looked at."""
    out: dict[int, list[ManagedPool]] = {}
    for managed in pools:
        settings = managed.pool.settings
        for path in (str(settings.data_file), str(settings.metadata_file)):
            dev = backing.last_dev(path)
            if dev is not None:
                pools_there = out.setdefault(dev, [])
                if not pools_there or pools_there[-1] is not managed:
                    pools_there.append(managed)
    return out


@dataclass
class _Fs:
    """What the watch remembers of one filesystem."""

    next_at: float = 0.0
    free: int | None = None  # at the last look
    promised_at_full: int = 0  # what its pool files promised at the last full look
    risen: int = 0  # every rise of its free space since (holes discards may have punched)
    reserve: Bytes = Bytes(0)  # the largest reserve of its pools, at the last full look
    at: float = 0.0
    peak_rate: float = 0.0  # the fastest its free space fell, decaying
    failed: SaidOnce[str] = field(default_factory=SaidOnce)  # path -> the claim failure said
    unclaimed: bool = False  # the last full look left holes it had to claim: tried on a rise


class SpaceWatch:
    """Looks at each backing filesystem when due, and claims the pool files' holes there."""

    def __init__(
        self,
        backing: BackingFiles,
        files: FilesApi,
        page_cache: PageCache,
        clock: Callable[[], float],
    ) -> None:
        self.backing = backing
        self.files = files
        self.page_cache = page_cache
        self.clock = clock
        self._fs: dict[int, _Fs] = {}
        self._said_holes: SaidOnce[str] = SaidOnce()  # data files whose holes were said
        self._lock = threading.Lock()  # _fs; each filesystem's entry is its own job's

    def due(self, now: float) -> list[int]:
        """Return the filesystems whose look is due (new ones at once)."""
        filesystems = self.backing.filesystems()
        with self._lock:
            return [dev for dev in filesystems if now >= self._fs.get(dev, _Fs()).next_at]

    def look(self, dev: int, pools: list[ManagedPool]) -> bool:
        """Look at filesystem dev and claim what must be claimed there (in a worker thread);
        return whether its free space rose since the last look (room may be back).

        pools are all the daemon's; only a full look (the first, and one whose estimate says a
        claim may be due) goes through them. Otherwise a look is one statvfs and arithmetic:
        what the files promised at the last full look (or since, by the passes' looks: a sparse
        growth), plus every rise of the free space since (holes a discard may have punched:
        counted as promised until a full look says otherwise). A pool's own writes into holes
        lower the promise: the estimate errs safe, but for a discard hidden by a neighbour's
        writes in the same tick.
        """
        with self._lock:
            fs = self._fs.setdefault(dev, _Fs())
        path = self.backing.file_on(dev)
        if path is None:
            fs.next_at = self.clock() + SPACE_WATCH_MAX_SECONDS
            return False
        try:
            space = self.files.space(path)
        except ThinwatchError:
            fs.next_at = self.clock() + SPACE_WATCH_SECONDS  # its pools' checks say why
            return False
        now = self.clock()
        rose = fs.free is not None and space.free > fs.free
        if rose:
            fs.risen += space.free - (fs.free or 0)
        self._record_rate(fs, space.free, now)
        writeback = self.page_cache.sample()
        dirty_limit = 0 if writeback is None else writeback.dirty_limit
        margin: int = claim_margin(fs.reserve, dirty_limit, fs.peak_rate)
        promised = max(self.backing.promised(dev), fs.promised_at_full) + fs.risen
        # A full look is due when a claim may be; after one that could not claim everything
        # (ENOSPC, EOPNOTSUPP, over-promised), only once the free space rises again: looking
        # at every file there at each tick would change nothing, at O(pools) a tick.
        if fs.free is None or (
            must_claim(space.free, promised, margin) and (not fs.unclaimed or rose)
        ):
            space, promised, margin = self._full_look(dev, fs, pools, space, dirty_limit)
        fs.free, fs.at = space.free, now
        fs.next_at = now + next_look_seconds(
            space.free, promised, margin, SPACE_WATCH_SECONDS, SPACE_WATCH_MAX_SECONDS
        )
        return rose

    def _full_look(
        self, dev: int, fs: _Fs, pools: list[ManagedPool], space: FsSpace, dirty_limit: int
    ) -> tuple[FsSpace, int, int]:
        """Look at every pool file on dev, say what is new, claim what must be claimed; return
        the free space, what the files promise and the margin, after it."""
        ours = [
            f
            for m in pools
            for metadata in (True, False)
            if (f := self._pool_file(m, dev, metadata)) is not None
        ]
        self.backing.look_at_fs(dev)
        fs.risen = 0
        fs.reserve = max((f.reserve_for(space.total) for f in ours), default=Bytes(0))
        margin = claim_margin(fs.reserve, dirty_limit, fs.peak_rate)
        promised = self._promised(ours)
        self._say_holes_once(ours, space.free, promised, margin)
        claim = [f for f in ours if f.metadata and self._holes(f.path)]
        if must_claim(space.free, promised, margin):
            data = [f for f in ours if not f.metadata and self._holes(f.path)]
            if space.free >= promised:
                claim += data
            else:  # over-promised: a claim would take the host's last bytes, and not hold
                for f in data:
                    short = KernelError(
                        "claim holes",
                        f.path,
                        errno.ENOSPC,
                        f"the pool files there promise {format_bytes(promised)} in holes and "
                        f"it has {format_bytes(space.free)} free: left unclaimed, rather than "
                        f"take the host's last bytes",
                    )
                    self._claim_failed(fs, f, self._holes(f.path), short)
        if claim:
            self._claim(fs, claim, space.free, promised, margin)
            with contextlib.suppress(ThinwatchError):  # its own claim is no neighbour's fill
                space = self.files.space(ours[0].path)
            promised = self._promised(ours)
        fs.promised_at_full = promised
        fs.unclaimed = any(self._holes(f.path) for f in claim) or (
            must_claim(space.free, promised, margin) and space.free < promised
        )
        return space, promised, margin

    # -- internals --------------------------------------------------------------------------

    def _pool_file(self, managed: ManagedPool, dev: int, metadata: bool) -> _WatchedFile | None:
        pool, settings = managed.pool, managed.pool.settings
        path = str(settings.metadata_file if metadata else settings.data_file)
        if self.backing.last_dev(path) != dev:
            return None
        loop = pool.meta_loop if metadata else pool.data_loop
        return _WatchedFile(
            path,
            pool.name,
            metadata,
            functools.partial(reserve_bytes, settings),
            (loop.backing_dev, loop.backing_inode),
        )

    def _holes(self, path: str) -> int:
        info = self.backing.file_info(path)
        return 0 if info is None else max(0, info.size - info.allocated)

    def _promised(self, files: list[_WatchedFile]) -> int:
        return sum(self._holes(f.path) for f in files)

    def _record_rate(self, fs: _Fs, free: int, now: float) -> None:
        if fs.free is None or now <= fs.at:
            return
        decay = 0.5 ** ((now - fs.at) / RATE_HALF_LIFE_SECONDS)
        fs.peak_rate = max((fs.free - free) / (now - fs.at), fs.peak_rate * decay)

    def _say_holes_once(
        self, files: list[_WatchedFile], free: int, promised: int, margin: int
    ) -> None:
        """Say, once per data file at its first look, how many holes it holds and what the
        watch will do about them (an adopted sparse pool: Docker's 100 GiB files)."""
        for f in files:
            if f.metadata or not self._said_holes.says(f.path):
                continue
            holes = self._holes(f.path)
            if holes < HOLES_WORTH_SAYING:
                continue
            now = "claims them now" if must_claim(free, promised, margin) else "leaves them"
            event(
                logging.INFO,
                MessageId.HOLES_LEFT,
                f"pool {f.pool}: {f.path} holds {format_bytes(holes)} of holes the pool may "
                f"write into; its filesystem has {format_bytes(free)} free, "
                f"{format_bytes(promised)} of it promised to the pool files there. thinwatchd "
                f"{now}: it allocates every hole there once the free space beyond those promises "
                f"falls under {format_bytes(margin)}, before a neighbour filling the filesystem "
                f"can take it",
                {
                    "POOL": f.pool,
                    "PATH": f.path,
                    "HOLES_BYTES": holes,
                    "FS_FREE_BYTES": free,
                    "PROMISED_BYTES": promised,
                    "MARGIN_BYTES": margin,
                },
            )

    def _claim(
        self,
        fs: _Fs,
        files: list[_WatchedFile],
        free: int,
        promised: int,
        margin: int,
    ) -> None:
        """Claim the holes of files, one decision lock of their filesystem held: no growth
        there is decided on figures from before the claim."""
        for f in files:
            with self.backing.decision_lock(f.path):
                holes = self._holes(f.path)
                try:
                    claimed = self.files.claim(f.path, f.identity)
                except KernelError as exc:
                    self._claim_failed(fs, f, holes, exc)
                    continue
                finally:
                    self.backing.changed(f.path)  # the file, and the next statvfs
            if fs.failed.ends(f.path):
                log.info("pool %s: the holes of %s are claimed again", f.pool, f.path)
            why = (
                "metadata is never left sparse"
                if f.metadata
                else f"the filesystem had {format_bytes(free)} free, "
                f"{format_bytes(promised)} of it promised to the pool files' holes: less than "
                f"{format_bytes(margin)} beyond them, which a neighbour filling it could take "
                f"before the pool writes there"
            )
            event(
                logging.WARNING if not f.metadata else logging.INFO,
                MessageId.HOLES_CLAIMED,
                f"pool {f.pool}: allocated {format_bytes(claimed)} of holes in {f.path}: {why}",
                {
                    "POOL": f.pool,
                    "PATH": f.path,
                    "CLAIMED_BYTES": claimed,
                    "FS_FREE_BYTES": free,
                    "PROMISED_BYTES": promised,
                    "MARGIN_BYTES": margin,
                },
            )

    def _claim_failed(self, fs: _Fs, f: _WatchedFile, holes: int, exc: KernelError) -> None:
        """Say a failed claim once per file and cause: the pool's writes into what is left
        unclaimed fail with EIO if the filesystem fills."""
        key = f"errno {exc.errno}"
        if not fs.failed.says(f.path, key):
            return
        what = (
            "its filesystem cannot allocate without writing (no fallocate)"
            if exc.errno == errno.EOPNOTSUPP
            else str(exc)
        )
        then = (
            "a metadata write there that meets a full filesystem puts the pool read-only with "
            "needs_check"
            if f.metadata
            else "the pool's writes there fail with EIO once the filesystem is full"
        )
        event(
            logging.ERROR,
            MessageId.CLAIM_FAILED,
            f"pool {f.pool}: cannot allocate the {format_bytes(holes)} of holes in {f.path}: "
            f"{what}; {then}. Free space on that filesystem (tried again each time its "
            f"free space rises)",
            {"POOL": f.pool, "PATH": f.path, "HOLES_BYTES": holes, "ERRNO": exc.errno},
        )


@dataclass(frozen=True)
class _WatchedFile:
    path: str
    pool: str
    metadata: bool
    reserve_for: Callable[[int], Bytes]  # the pool's reserve on a filesystem of that size
    identity: tuple[int, int]
