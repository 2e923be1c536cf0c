"""Logging: native journal entries with structured fields under systemd, plain lines otherwise.

Pool events carry fixed MESSAGE_IDs (see ``MessageId``) so that, for example,
``journalctl -u thinwatchd MESSAGE_ID=3af02562533c44388127d6c57b631287`` lists every data growth.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JournalHandler", "MessageId", "event", "journal_is_stderr", "setup_logging"]

log = logging.getLogger("thinwatchd")


class MessageId(enum.StrEnum):
    """Fixed journal MESSAGE_IDs; never change a value once released."""

    POOL_CREATED = "6dc556cb50dc474f817e948933a32c2b"
    POOL_ADOPTED = "f8846eb9132d45699f5d8d8219af3397"
    DATA_GROWN = "3af02562533c44388127d6c57b631287"
    METADATA_GROWN = "3e26fdb4b45e4e6f9ffdf198111823d0"
    GROWTH_REFUSED = "2141a204c6e042ae89fc8872418d5741"
    POOL_MODE_CHANGED = "a3c3c9265f3d453caa31eca33abf1e03"
    CONFIG_RELOADED = "23e813cf20784e879cd28fc9c6ddb7ed"
    CONFIG_REJECTED = "6c8f625bed3843c4945ad620c8cbceca"
    GROWTH_FAILED = "6fa9b7ea875f4f0f914804e8e0c73b77"
    POOL_RECOVERED = "f98b129e5bd545f093df1530091423b0"
    CHANGED_OUTSIDE = "9b3a35f2169f4b30a4549131855bddbf"
    BACKING_FS_LOW = "98127a65fa8b4f80944a947f37c7637e"
    FULL_SOON = "126ac4407baf4839bd759b76db675260"
    SPACE_RECLAIMABLE = "9beb66023ffe4a81af6f5a610feb59d1"
    HOLES_CLAIMED = "9dec06cb1f034ef79d6402b8c20656f8"
    CLAIM_FAILED = "30bafbb2833a478c85a461d0ca8351c3"
    HOLES_LEFT = "2f13fb47b4364c2ea8718ef57cf9fdb6"


def event(
    level: int, message_id: MessageId, message: str, fields: Mapping[str, object] | None = None
) -> None:
    """Log one pool event with its MESSAGE_ID and structured journal fields (UPPER_CASE keys)."""
    journal = {"MESSAGE_ID": message_id.value}
    if fields:
        journal.update({key: str(value) for key, value in fields.items()})
    log.log(level, message, extra={"journal_fields": journal})


class JournalHandler(logging.Handler):
    """Send records to journald natively, with only the fields we chose (not every attribute)."""

    def __init__(self, send: Callable[..., None] | None = None) -> None:
        super().__init__()
        if send is None:
            from systemd import journal  # type: ignore[attr-defined]  # lazily: under journald

            send = journal.send
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = dict(getattr(record, "journal_fields", {}))
            message = self.format(record)
            self._send(
                message,
                PRIORITY=str(_syslog_priority(record.levelno)),
                SYSLOG_IDENTIFIER="thinwatchd",
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **fields,
            )
        except Exception:
            self.handleError(record)


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_is_stderr() -> bool:
    """Return True if stderr is connected to journald (systemd sets JOURNAL_STREAM=dev:ino)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info", *, target: str = "auto") -> None:
    """Send thinwatchd's log to the journal ('journal', or 'auto' under journald) or stderr."""
    handler: logging.Handler
    use_journal = target == "journal" or (target == "auto" and journal_is_stderr())
    if use_journal:
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
