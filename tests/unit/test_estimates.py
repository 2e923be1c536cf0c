"""The estimates file the daemon writes for `thinwatchd status`: read back counted down, and
ignored when no daemon keeps it fresh."""

from __future__ import annotations

import json
from pathlib import Path

from thinwatchd.estimates import Estimate, read_estimates, render_estimates
from thinwatchd.forecast import FullIn
from thinwatchd.metrics import PoolMetrics
from thinwatchd.units import Sectors


def figures(name: str, rate: float | None, full: FullIn | None) -> PoolMetrics:
    return PoolMetrics(
        name=name,
        block_size=Sectors(128),
        status=None,
        growths_data=0,
        growths_metadata=0,
        failures=0,
        last_growth_seconds=None,
        backing_fs_free_bytes=None,
        fill_rate=rate,
        full_in=full,
    )


def write(tmp_path: Path, written_at: float) -> Path:
    path = tmp_path / "estimates.json"
    path.write_text(
        render_estimates(
            [figures("a", 5e6, FullIn(cap=600.0, backing_fs=None)), figures("b", None, None)],
            written_at,
        )
    )
    return path


def test_estimates_are_read_back_counted_down_to_now(tmp_path: Path) -> None:
    path = write(tmp_path, written_at=1000.0)
    assert read_estimates(path, now=1010.0, max_age=60) == {
        "a": Estimate(5e6, seconds_to_cap=590.0, seconds_to_backing_fs_reserve=None),
        "b": Estimate(None, None, None),
    }
    later = read_estimates(path, now=1059.0, max_age=60)
    assert later is not None and later["a"].seconds_to_cap == 541.0


def test_a_file_no_daemon_keeps_fresh_says_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, written_at=1000.0)
    assert read_estimates(path, now=1061.0, max_age=60) is None  # the daemon stopped
    assert read_estimates(path, now=900.0, max_age=60) is None  # from the future: a clock jump
    assert read_estimates(tmp_path / "none.json", now=1000.0, max_age=60) is None


def test_a_damaged_or_foreign_file_says_nothing(tmp_path: Path) -> None:
    path = tmp_path / "estimates.json"
    good = json.loads(write(tmp_path, written_at=1000.0).read_text())
    for text in (
        "",
        "{",
        "[]",
        json.dumps({**good, "version": 2}),
        json.dumps({**good, "pools": {"a": {}}}),
        json.dumps({**good, "pools": {"a": {**good["pools"]["a"], "seconds_to_cap": "soon"}}}),
    ):
        path.write_text(text)
        assert read_estimates(path, now=1000.0, max_age=60) is None, text
