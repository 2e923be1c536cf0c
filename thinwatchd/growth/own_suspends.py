"""Which suspended pools are thinwatchd's own, kept where the next instance finds them.

A growth whose resume the kernel refuses, and whose rollback it refuses too, leaves its pool
suspended (PoolState.own_suspend): the daemon keeps resuming it with backoff. A pool someone
else suspended (``dmsetup suspend``) it leaves alone. The kernel shows both alike, a suspended
device on a valid table, so the names of the pools thinwatchd left suspended are kept in a file
of its runtime directory: /run/thinwatchd survives a stop and a restart (the unit preserves
it) and is emptied by a reboot, which takes the devices with it. At start-up, a pool found
suspended is resumed if this file names it, and left to whoever suspended it if not.

The file is written only when a pool becomes or stops being suspended by thinwatchd (a failed
rollback, a resume at last): never on a growth's path. It lives on tmpfs, so a write cannot
stall; a write that fails is said, and the daemon goes on with what it knows in memory.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from thinwatchd.base.small_files import read_capped

__all__ = ["OWN_SUSPENDS_NAME", "OwnSuspends"]

log = logging.getLogger("thinwatchd")

#: Beside the instance lock, in the runtime directory.
OWN_SUSPENDS_NAME = "own-suspends"
#: Far more than any number of pool names; a larger file is not ours.
_CAP = 1 << 20


class OwnSuspends:
    """The set of pools thinwatchd left suspended, mirrored to a file (None: memory only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._names = self._read()

    def holds(self, name: str) -> bool:
        """Whether thinwatchd (this instance or the one before) left the pool suspended."""
        with self._lock:
            return name in self._names

    def set(self, name: str, suspended: bool) -> None:
        """Record that thinwatchd left the pool suspended, or that it no longer is."""
        with self._lock:
            if (name in self._names) == suspended:
                return
            names = self._names | {name} if suspended else self._names - {name}
            self._names = names
            self._write(names)

    def keep_only(self, names: frozenset[str]) -> None:
        """Forget the pools no longer configured: nobody resumes them now, and a pool of that
        name configured later is a new pool."""
        with self._lock:
            kept = self._names & names
            if kept != self._names:
                self._names = kept
                self._write(kept)

    def _read(self) -> frozenset[str]:
        if self.path is None:
            return frozenset()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return frozenset()
        except OSError as exc:
            log.warning(
                "cannot read %s (%s): a pool found suspended is left to whoever suspended it",
                self.path,
                exc.strerror,
            )
            return frozenset()
        try:
            data = read_capped(fd, _CAP)
        except OSError as exc:
            log.warning("cannot read %s (%s)", self.path, exc.strerror)
            return frozenset()
        finally:
            os.close(fd)
        if data is None:
            log.warning(
                "%s is larger than %d bytes, not a list of pool names: ignored; a pool found "
                "suspended is left to whoever suspended it",
                self.path,
                _CAP,
            )
            return frozenset()
        return frozenset(line for line in data.decode(errors="replace").split("\n") if line)

    def _write(self, names: frozenset[str]) -> None:
        if self.path is None:
            return
        temporary = self.path.with_name(f".{self.path.name}.new")
        text = "".join(f"{name}\n" for name in sorted(names))
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError as exc:
            log.error(
                "cannot record in %s which pools thinwatchd left suspended (%s): after a "
                "restart, the next instance would leave them suspended; `dmsetup resume` "
                "them by hand if so: %s",
                self.path,
                exc.strerror,
                ", ".join(sorted(names)) or "none now",
            )
