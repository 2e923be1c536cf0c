"""Configured pools whose build failed: kept to retry at each safety check, each failure said
once (a build that keeps failing the same way is not a journal entry every 10 s)."""

from __future__ import annotations

import logging
from collections.abc import Container

from thinwatchd.base.errors import ThinwatchError
from thinwatchd.base.said_once import SaidOnce
from thinwatchd.config.settings import PoolSettings

__all__ = ["Unbuilt"]

log = logging.getLogger("thinwatchd")


class Unbuilt:
    """The pools to build again, and the last build error said for each."""

    def __init__(self) -> None:
        self.pending: dict[str, PoolSettings] = {}  # new pools whose build failed
        self.errors: SaidOnce[str] = SaidOnce()  # the last build error said, per pool

    def failed(self, settings: PoolSettings, error: BaseException | None, *, retry: bool) -> None:
        """A build failed; retry it at each safety check if it is a new pool (a running pool
        rebuilt is retried by its own checks)."""
        name = settings.name
        if retry:
            self.pending[name] = settings
        if isinstance(error, ThinwatchError):
            if self.errors.says(name, str(error)):
                log.error("pool %s: cannot build it: %s; retrying at each check", name, error)
        else:
            log.critical("pool %s: internal error while building it", name, exc_info=error)

    def built(self, name: str) -> None:
        self.pending.pop(name, None)
        if self.errors.ends(name):
            log.info("pool %s: built after earlier failures", name)

    def keep_only(self, names: Container[str]) -> None:
        """Forget the pools no longer configured."""
        for name in list(self.pending):
            if name not in names:
                del self.pending[name]
