"""What the extender says in the journal about a pool: a failed growth (once per streak, with
its backoff), the backing filesystem at its reserve, a refusal, a mode change. Each is said
once when it starts or changes, and once when it ends, however often a pool is reconciled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from thinwatchd.base.errors import KernelError, ThinwatchError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.logs import MessageId, event
from thinwatchd.growth.backing import BackingFiles
from thinwatchd.growth.state import PoolState, Topic, pool_fields
from thinwatchd.policy.decide import Decision, Grow, NoAction, Refuse, describe
from thinwatchd.policy.fs_room import BackingFs, backing_shortfall
from thinwatchd.pool.running import Activation, Pool
from thinwatchd.thin.status import PoolMode, ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["RETRY_FIRST_SECONDS", "RETRY_MAX_SECONDS", "PoolJournal", "announce", "failure_key"]

log = logging.getLogger("thinwatchd")


#: Retry delays after failed growths: doubling from the first, up to the last.
RETRY_FIRST_SECONDS = 0.25


RETRY_MAX_SECONDS = 30.0


def failure_key(exc: ThinwatchError) -> str:
    """What makes two failures "the same" for saying it once per streak: the errno, whatever
    step or file met it (one full disk fails the open, the stat and the statvfs alike)."""
    return f"errno {exc.errno}" if isinstance(exc, KernelError) else str(exc)


def announce(pool: Pool, status: ThinPoolStatus | None) -> None:
    """Say how a pool just registered came up (created, adopted, recreated), and what
    interrupted work its activation finished."""
    settings = pool.settings
    fields = pool_fields(pool, status) | {"ACTIVATION": pool.activation.value}
    if pool.activation is Activation.CREATED:
        event(
            logging.INFO,
            MessageId.POOL_CREATED,
            f"pool {pool.name} created on {settings.data_file} and {settings.metadata_file}",
            fields,
        )
    else:
        how = (
            "after a restart"
            if pool.activation is Activation.ADOPTED
            else "over its existing metadata"
        )
        event(logging.INFO, MessageId.POOL_ADOPTED, f"pool {pool.name} adopted {how}", fields)
    for note in pool.recovered:
        event(logging.WARNING, MessageId.POOL_RECOVERED, f"pool {pool.name}: {note}", fields)


class PoolJournal:
    """Says each change of a pool's state once (its PoolState keeps what was said)."""

    def __init__(self, backing: BackingFiles, clock: Callable[[], float]) -> None:
        self.backing = backing
        self.clock = clock

    def fields(self, pool: Pool, status: ThinPoolStatus | None) -> dict[str, object]:
        """pool_fields, with the data file's allocated bytes as last looked at."""
        return pool_fields(pool, status, self.backing.allocated(str(pool.settings.data_file)))

    def failure(self, pool: Pool, state: PoolState, target: str, exc: ThinwatchError) -> None:
        """Count a failed growth (or check), say it once per streak, and back off."""
        state.failures += 1
        state.failed_attempts += 1
        delay = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (state.failed_attempts - 1))
        state.retry_at = self.clock() + delay
        # A pool left suspended is one streak, from the growth whose resume failed to the
        # resume that is accepted, whatever each attempt meets.
        key = "left suspended" if state.own_suspend else failure_key(exc)
        if not state.said.says(Topic.GROWTH_FAILING, key):
            log.debug("pool %s: attempt %d failed again: %s", pool.name, state.failed_attempts, exc)
            return
        if state.own_suspend:
            what = (
                f"growing {target} of {pool.name} failed: {exc}; the kernel refused to resume "
                f"the pool, which is SUSPENDED: its writers wait until a resume is accepted"
                if target != "check"
                else f"resuming {pool.name}, left suspended by a failed growth, failed: {exc}; "
                f"its writers wait"
            )
        elif target != "check":
            what = f"growing {target} of {pool.name} failed: {exc}; the pool keeps its size"
        else:
            what = f"checking {pool.name} failed: {exc}"
        event(
            logging.ERROR,
            MessageId.GROWTH_FAILED,
            f"{what}; retrying with backoff (next in {delay:g} s)",
            self.fields(pool, state.seen.status) | {"TARGET": target},
        )

    def fs_at_reserve(
        self, pool: Pool, state: PoolState, status: ThinPoolStatus, data_fs: BackingFs
    ) -> bool:
        """Say once when the data file's filesystem reaches its reserve while the pool still
        promises blocks (its writes will fail with EIO); return whether that is the case.

        data_fs is this check's look at it: after a failed growth, the one from before it (a
        look after it would only add a second failure to say)."""
        path = str(pool.settings.data_file)
        short = backing_shortfall(status, pool.settings, data_fs)
        if short and state.said.says(Topic.FS_AT_RESERVE):
            event(
                logging.ERROR,
                MessageId.BACKING_FS_LOW,
                f"pool {pool.name}: the filesystem under {path} is at its reserve but the "
                f"pool may still write {format_bytes(short)} into holes of that file; those "
                f"writes will fail with EIO. Free space there or lower "
                f"pools.{pool.name}.reserve; when_full applies meanwhile",
                self.fields(pool, status) | {"SHORTFALL_BYTES": short},
            )
        elif not short and state.said.ends(Topic.FS_AT_RESERVE):
            log.info("pool %s: the filesystem under %s has room again", pool.name, path)
        return bool(short)

    def refusal(
        self, pool: Pool, state: PoolState, decision: Decision, status: ThinPoolStatus
    ) -> None:
        """Log a refusal once when it starts or changes, and once when it ends."""
        target = decision.target
        topic = Topic.refused(target)
        if isinstance(decision, Refuse):
            key = decision.reason.value
            if state.said.says(topic, key):
                event(
                    logging.ERROR,
                    MessageId.GROWTH_REFUSED,
                    describe(decision),
                    self.fields(pool, status) | {"TARGET": target, "REASON": key},
                )
        elif isinstance(decision, (Grow, NoAction)) and state.said.ends(topic):
            log.info("pool %s: %s can grow again", pool.name, target)

    def mode(self, pool: Pool, state: PoolState, status: ThinPoolStatus) -> None:
        """Log each change of the pool's mode (and needs_check) once, with what to do about it."""
        mode = status.mode
        needs_check = isinstance(status, ThinPoolWorkingStatus) and status.needs_check
        first = Topic.MODE not in state.said
        if not state.said.says(Topic.MODE, (mode, needs_check)):
            return
        healthy = mode is PoolMode.WRITE and not needs_check
        if first and healthy:
            return
        level = logging.INFO if healthy else logging.ERROR
        text = f"pool {pool.name} is now in mode {mode.value}"
        if needs_check:
            text += (
                " and its metadata needs checking (needs_check): the kernel will neither write "
                "nor grow it. Stop its users, deactivate it and run thin_check, then thin_repair "
                "if that fails; see the kernel log for the metadata error"
            )
        if mode is PoolMode.FAIL:
            level = logging.CRITICAL
            text += ": the pool has failed; its metadata needs thin_check and thin_repair"
        fields = self.fields(pool, status) | {"NEEDS_CHECK": int(needs_check)}
        event(level, MessageId.POOL_MODE_CHANGED, text, fields)
