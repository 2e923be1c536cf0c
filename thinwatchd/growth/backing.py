"""The pools' backing files and filesystems as the policy sees them, each looked at once a pass.

How far a pool file may grow depends on every pool file on its filesystem: the unwritten part
of each sparse one is promised (room.BackingFs.promised_elsewhere). Stat-ing every pool file
for each pool, and a statvfs per pool file, made one check of N pools O(N²) syscalls (5 million
for 1,000 pools: longer than the watchdog, on the fake kernel). Instead, BackingFiles keeps the
last look at every pool file between passes, and what they promise summed per filesystem
(st_dev). A pass (BackingLook: a dm event, a safety check, a writeback watch, a retry) then:

- looks at a pool's own file once (lstat), and again after it grew it;
- looks at each filesystem once (statvfs), and again after a growth on it (a preallocated
  growth took space that the next pool's figures must not count as free);
- takes the other files' promises from their last look, at most one safety check old: a survey
  pass (the check) looks at every pool file once, so an event costs the pools it names and not
  all the others. Since that look, writers can only have filled holes, so the promise is
  overstated (holes that discards punched since are the exception: the next check sees them).
  When the filesystem's room limits a decision, it is taken again after a fresh look at every
  file there (look_again): no growth is made smaller, or refused, for a stale figure.

Pools are reconciled in worker threads side by side, sharing a pass. Looks at one filesystem
(its files' lstat, its statvfs) are made by one thread at a time, under that filesystem's lock,
so a pass looks at each once; the tables are kept under a lock never held across a syscall. A
filesystem whose syscalls stall (a dead NFS server, a dying disk) so holds up only the pools on
it, never a pool on another filesystem. A pool just built has its files looked at in its build's
thread, before any pass counts them: no pass waits on a file whose filesystem is not known.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from thinwatchd.base.errors import KernelError, ThinwatchError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel.api import FileInfo, FilesApi, FsSpace
from thinwatchd.policy.fs_room import BackingFs

__all__ = ["BackingFiles", "BackingLook"]


def _promise(info: FileInfo | None) -> Bytes:
    """What a sparse file may still claim from its filesystem: apparent minus allocated size."""
    return Bytes(0 if info is None else max(0, info.size - info.allocated))


@dataclass
class _Look:
    info: FileInfo | None  # None: missing or unreadable when looked at (promises nothing)
    at: int  # the pass that looked (0: stale, to be looked at again)
    # The filesystem it was last seen on, kept when a look fails: a file that could not be
    # looked at once is still surveyed with its filesystem's files, under that one's lock.
    dev: int | None = None


class BackingFiles:
    """Every pool file's last look, and each filesystem's, kept between passes."""

    def __init__(self, files: FilesApi) -> None:
        self.files = files
        self._files: dict[str, _Look] = {}
        self._promised: dict[int, int] = {}  # st_dev -> what its pool files promise
        self._on_fs: dict[int, dict[str, None]] = {}  # st_dev -> the files last seen on it
        self._spaces: dict[int, tuple[int, FsSpace]] = {}  # st_dev -> (pass, statvfs)
        self._passes = itertools.count(1)
        self.lock = threading.Lock()  # the tables above; never held across a syscall
        self._fs_locks: dict[int | None, threading.Lock] = {}  # st_dev -> its looks
        # Growths decided and not yet made, per filesystem: what the next decision there must
        # count as taken. Decisions on one filesystem are made one at a time, each holding its
        # decision lock from its figures to its booking, so two growths side by side never
        # both take the same free space.
        self._booked: dict[int, dict[str, int]] = {}  # st_dev -> path -> bytes
        self._decision_locks: dict[int | None, threading.Lock] = {}

    def watch(self, paths: Iterable[str]) -> None:
        """Count these files' promises from now on, looking at each now: in the caller's thread
        (a pool just built, in its build's worker), so that no pass ever waits on a file whose
        filesystem, and so whose lock, is not known yet."""
        for path in paths:
            self._look_other(path, 0)  # 0: stale, looked at again by its own pool's next pass

    def new_pass(self, *, survey: bool = False) -> BackingLook:
        """Start a pass; a survey (the safety check) looks at every pool file once."""
        with self.lock:
            return BackingLook(self, next(self._passes), survey)

    def free(self, path: str) -> Bytes | None:
        """Return the free bytes of path's filesystem as last looked at (None: never)."""
        space = self.space(path)
        return None if space is None else space[1].free

    def space(self, path: str) -> tuple[int, FsSpace] | None:
        """Return (st_dev, statvfs) of path's filesystem as last looked at (None: never)."""
        with self.lock:
            look = self._files.get(path)
            if look is None or look.info is None:
                return None
            space = self._spaces.get(look.info.dev)
            return None if space is None else (look.info.dev, space[1])

    def allocated(self, path: str) -> Bytes | None:
        """Return the bytes path takes on its filesystem as last looked at (None: never)."""
        with self.lock:
            look = self._files.get(path)
            return None if look is None or look.info is None else look.info.allocated

    # -- the pass's work -------------------------------------------------------------------

    def fs_lock(self, dev: int | None) -> threading.Lock:
        """Return the lock under which the filesystem dev is looked at (None: files whose
        filesystem is not known yet)."""
        with self.lock:
            return self._fs_locks.setdefault(dev, threading.Lock())

    def last_dev(self, path: str) -> int | None:
        """Return the filesystem path was last seen on (None: never seen)."""
        with self.lock:
            look = self._files.get(path)
            return None if look is None else look.dev

    def promised(self, dev: int) -> int:
        with self.lock:
            return self._promised.get(dev, 0)

    def booked(self, dev: int, but: str = "") -> int:
        """Return what growths decided on dev and not yet made will take (but path's own)."""
        with self.lock:
            return sum(n for p, n in self._booked.get(dev, {}).items() if p != but)

    def decision_lock(self, path: str) -> threading.Lock:
        """Return the lock held from a growth decision's figures on path's filesystem to its
        booking (None's, for a file never looked at, until its filesystem is known)."""
        dev = self.last_dev(path)
        with self.lock:
            return self._decision_locks.setdefault(dev, threading.Lock())

    def book(self, path: str, nbytes: int) -> None:
        """Count nbytes as taken on path's filesystem until path is next looked at after it
        changed (BackingLook.changed) or the booking is dropped (unbook)."""
        dev = self.last_dev(path)
        if dev is None or nbytes <= 0:
            return
        with self.lock:
            self._booked.setdefault(dev, {})[path] = nbytes

    def unbook(self, path: str) -> None:
        dev = self.last_dev(path)
        with self.lock:
            if dev is not None and path in self._booked.get(dev, {}):
                del self._booked[dev][path]

    def file_on(self, dev: int) -> str | None:
        """Return a pool file last seen on dev (one to statvfs it by), None if there is none."""
        with self.lock:
            return next(iter(self._on_fs.get(dev, ())), None)

    def filesystems(self) -> list[int]:
        """Return every filesystem (st_dev) a pool file was last seen on."""
        with self.lock:
            return [dev for dev, paths in self._on_fs.items() if paths]

    def look_at_fs(self, dev: int) -> None:
        """Look at every file last seen on dev now (under its lock), outside any pass."""
        with self.fs_lock(dev):
            with self.lock:
                at = next(self._passes)
            for path in self._stale_on(dev, at):
                self._look_other(path, at)

    def changed(self, path: str) -> None:
        """path changed outside a pass (its holes claimed): look at it again now, and at its
        filesystem when figures are next asked for."""
        with self.lock:
            at = next(self._passes)
        self._changed(path, at)

    def file_info(self, path: str) -> FileInfo | None:
        """Return path's last look (None: never looked at, or missing then)."""
        with self.lock:
            look = self._files.get(path)
            return None if look is None else look.info

    def _store(self, path: str, info: FileInfo | None, at: int) -> None:
        with self.lock:
            old = self._files.get(path)
            if old is not None and old.info is not None:
                self._promised[old.info.dev] -= _promise(old.info)
            if info is not None:
                self._promised[info.dev] = self._promised.get(info.dev, 0) + _promise(info)
            dev = info.dev if info is not None else old.dev if old is not None else None
            if old is not None and old.dev is not None and old.dev != dev:
                del self._on_fs[old.dev][path]
            if dev is not None:
                self._on_fs.setdefault(dev, {})[path] = None  # an ordered set: looks in order
            self._files[path] = _Look(info, at, dev)

    def _look_other(self, path: str, at: int) -> None:
        """Look at another pool's file; one that cannot be looked at promises nothing (its own
        pool's check says why)."""
        try:
            info = self.files.inspect(path)
        except ThinwatchError:
            info = None
        self._store(path, info, at)

    def _stale_on(self, dev: int, at: int) -> list[str]:
        """Return the files last seen on dev that this pass has not looked at (those on other
        filesystems are not even scanned: a check of N pools on N filesystems stays O(N))."""
        with self.lock:
            return [p for p in self._on_fs.get(dev, ()) if self._files[p].at != at]

    def _survey(self, dev: int, at: int) -> bool:
        """Look at every file last seen on dev not yet looked at in this pass (under its lock);
        return whether there was any."""
        stale = self._stale_on(dev, at)
        for path in stale:
            self._look_other(path, at)
        return bool(stale)

    def _own(self, path: str, at: int) -> FileInfo:
        """Return the pool's own file as this pass sees it; raise if it cannot be looked at."""
        with self.fs_lock(self.last_dev(path)):
            with self.lock:
                look = self._files.get(path)
            if look is not None and look.at == at and look.info is not None:
                return look.info
            info = self.files.inspect(path)
            self._store(path, info, at)
        if info is None:
            raise KernelError("stat", path, errno.ENOENT, "the pool file is gone")
        return info

    def _space(self, path: str, dev: int, at: int) -> FsSpace:
        """Return path's filesystem's statvfs as this pass sees it (under its lock)."""
        with self.lock:
            seen = self._spaces.get(dev)
        if seen is not None and seen[0] == at:
            return seen[1]
        space = self.files.space(path)
        with self.lock:
            self._spaces[dev] = (at, space)
        return space

    def _changed(self, path: str, at: int) -> None:
        dev = self.last_dev(path)
        # Under the filesystem's lock: a statvfs running now may have read the free space from
        # before the growth, and must not store it over this mark.
        with self.fs_lock(dev):
            with self.lock:
                if dev is not None and dev in self._spaces:
                    self._spaces[dev] = (0, self._spaces[dev][1])
            # Now, for every pool after it in the pass; a failure here is its own pool's to
            # say, at its next look. What the growth took is in that look (its file) and in
            # the next statvfs, so its booking goes in the same step: a decision on this
            # filesystem sees the growth either booked or made, never neither nor both.
            self._look_other(path, at)
            with self.lock:
                if dev is not None:
                    self._booked.get(dev, {}).pop(path, None)

    def _look_again(self, path: str, at: int) -> bool:
        dev = self.last_dev(path)
        if dev is None:
            return False
        with self.fs_lock(dev):
            return self._survey(dev, at)


class BackingLook:
    """One pass's view of the backing files: what BackingFiles says, looked at as needed."""

    def __init__(self, files: BackingFiles, at: int, survey: bool) -> None:
        self._files = files
        self._at = at
        self._survey = survey
        self._surveyed: set[int] = set()  # filesystems (st_dev) this survey pass looked at
        self._lock = threading.Lock()  # _surveyed

    def figures(self, path: str) -> BackingFs:
        """Return the filesystem figures the policy needs for the pool file path.

        Raise KernelError if the file or its filesystem cannot be looked at (ENOENT: gone).
        """
        files, at = self._files, self._at
        own = files._own(path, at)
        with files.fs_lock(own.dev):
            if self._survey:
                with self._lock:
                    first = own.dev not in self._surveyed
                    self._surveyed.add(own.dev)
                if first:
                    files._survey(own.dev, at)
            space = files._space(path, own.dev, at)
            promised = files.promised(own.dev) - _promise(own) + files.booked(own.dev, path)
        return BackingFs(
            free_bytes=space.free,
            total_bytes=space.total,
            file_size=own.size,
            file_allocated=own.allocated,
            promised_elsewhere=Bytes(max(0, promised)),
            path=os.path.dirname(path),
        )

    def deciding(self, path: str) -> threading.Lock:
        """The lock to hold from figures(path) to book(path): one growth decision at a time
        on path's filesystem."""
        return self._files.decision_lock(path)

    def book(self, path: str, nbytes: int) -> None:
        """A growth of path by nbytes is decided: the next decisions on its filesystem count
        it as taken until changed(path) (or unbook(path): it will not be made)."""
        self._files.book(path, nbytes)

    def unbook(self, path: str) -> None:
        self._files.unbook(path)

    def changed(self, path: str) -> None:
        """The pass changed path (grew it): look at it again now, and at its filesystem when
        figures are next asked for."""
        self._files._changed(path, self._at)

    def look_again(self, path: str) -> bool:
        """Look again at every file on path's filesystem not yet looked at in this pass; return
        whether there was any (whether figures(path) may now say something else)."""
        return self._files._look_again(path, self._at)
