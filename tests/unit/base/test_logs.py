"""Journal entries: fields, priorities and MESSAGE_IDs, through python-systemd's real send()."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from thinwatchd.base.logs import JournalHandler, MessageId, event


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, **fields: Any) -> None:
        self.calls.append((message, fields))


@pytest.fixture
def sent() -> Any:
    out = Sent()
    log = logging.getLogger("thinwatchd")
    handler = JournalHandler(out)
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.DEBUG)
    yield out
    log.removeHandler(handler)
    log.setLevel(old)


def test_event_carries_message_id_and_fields(sent: Sent) -> None:
    event(logging.ERROR, MessageId.GROWTH_REFUSED, "cannot grow", {"POOL": "p", "GROWTH_MS": 1.5})
    ((message, fields),) = sent.calls
    assert message == "cannot grow"
    assert fields["MESSAGE_ID"] == MessageId.GROWTH_REFUSED.value
    assert fields["POOL"] == "p" and fields["GROWTH_MS"] == "1.5"
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "thinwatchd"


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, "7"),
        (logging.INFO, "6"),
        (logging.WARNING, "4"),
        (logging.ERROR, "3"),
        (logging.CRITICAL, "2"),
    ],
)
def test_priorities(sent: Sent, level: int, priority: str) -> None:
    logging.getLogger("thinwatchd").log(level, "x")
    assert sent.calls[0][1]["PRIORITY"] == priority


def test_real_send_accepts_our_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    # python-systemd's send() formats some fields itself (CODE_LINE must be an int)
    from systemd import journal  # type: ignore[attr-defined]

    captured: list[tuple[Any, ...]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: captured.append(args))
    handler = JournalHandler(journal.send)
    record = logging.LogRecord("thinwatchd", logging.INFO, __file__, 12, "hello", None, None)
    record.journal_fields = {"MESSAGE_ID": MessageId.DATA_GROWN.value, "POOL": "p"}
    handler.emit(record)
    (args,) = captured
    assert "MESSAGE=hello" in args and "CODE_LINE=12" in args and "POOL=p" in args
    assert f"MESSAGE_ID={MessageId.DATA_GROWN.value}" in args
