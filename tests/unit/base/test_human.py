"""Unit tests for thinwatchd.base.human: sizes and durations as people read them."""

from __future__ import annotations

from thinwatchd.base.human import format_bytes, format_duration

KiB, GiB = 1024, 1024**3


def test_format_bytes() -> None:
    assert format_bytes(512) == "512B"
    assert format_bytes(64 * KiB) == "64.0KiB"
    assert format_bytes(3 * GiB // 2) == "1.5GiB"


def test_durations_read_roughly() -> None:
    assert [format_duration(s) for s in (45, 720, 3 * 3600 + 1200, 5 * 86400)] == [
        "45 s",
        "12 min",
        "3 h 20 min",
        "5 days",
    ]
