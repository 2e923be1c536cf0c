"""The estimates file the daemon writes for `thinwatchd status`: read back counted down, and
ignored when no daemon keeps it fresh."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from thinwatchd.base.units import Sectors
from thinwatchd.config.strict_yaml import MAX_VALUES
from thinwatchd.policy.forecast import FullIn
from thinwatchd.publish import estimates
from thinwatchd.publish.estimates import Estimate, read_estimates, render_estimates
from thinwatchd.publish.figures import PoolMetrics

MiB = 1024**2


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


# --- A tampered file (issue 19, item 7): ignored with one line on stderr, never a traceback -----


def good_doc(written_at: float = 1000.0) -> dict[str, Any]:
    return {
        "version": 1,
        "written_at": written_at,
        "pools": {
            "a": {
                "fill_rate_bytes_per_second": 5e6,
                "seconds_to_cap": 600.0,
                "seconds_to_backing_fs_reserve": None,
            }
        },
    }


def with_rate(text: str) -> str:
    """Return the good file's text with text as pool a's fill rate."""
    return json.dumps(good_doc()).replace("5000000.0", text)


def said_once(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    """Return the one line read_estimates wrote on stderr about path (and nothing on stdout)."""
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"thinwatchd: ignoring {path}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("huge integer rate", with_rate(str(10**400)), "an integer of 401 digits"),
        ("huge integer date", json.dumps({**good_doc(), "written_at": 10**400}), "401 digits"),
        ("nested 100000 deep", "[" * 100_000 + "]" * 100_000, "nested more than"),
        ("nested in a value", with_rate("[" * 100_000 + "]" * 100_000), "nested more than"),
        ("unclosed nesting", "[" * 100_000, "its brackets do not match"),
        ("crossed nesting", "[{" * 50_000 + "]}" * 50_000, "its brackets do not match"),
        ("a bracket in a string", '{"version": "[", "pools": {}}', "version '['"),
        ("NaN rate", with_rate("NaN"), "NaN"),
        ("Infinity rate", with_rate("Infinity"), "Infinity"),
        ("-Infinity seconds", json.dumps(good_doc()).replace("600.0", "-Infinity"), "Infinity"),
        ("float beyond range", with_rate("1e400"), "1e400 is out of range"),
        ("negative rate", with_rate("-1.5"), "fill_rate_bytes_per_second is -1.5"),
        ("negative seconds", json.dumps(good_doc()).replace("600.0", "-2.0"), "is -2.0"),
        ("a boolean rate", with_rate("true"), "fill_rate_bytes_per_second is true"),
        ("a text rate", with_rate('"fast"'), "fill_rate_bytes_per_second is 'fast'"),
        ("a list of pools", json.dumps({**good_doc(), "pools": []}), "pools"),
        ("not an object", "[]", "not a JSON object"),
        ("truncated", "{", "not JSON: its brackets do not match"),
        ("not JSON", '{"version": 1,}', "not JSON: Expecting property name"),
        ("null written_at", json.dumps({**good_doc(), "written_at": None}), "written_at is null"),
        ("missing figure", json.dumps({**good_doc(), "pools": {"a": {}}}), "pools.a.fill_rate"),
        ("not UTF-8", b'{"version": 1, "\xff": 1}', "byte 16 is not UTF-8"),
        ("another version", json.dumps({**good_doc(), "version": 2}), "version 2"),
    ],
)
def test_a_tampered_file_is_ignored_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str | bytes, why: str
) -> None:
    path = tmp_path / "estimates.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.process_time()
    assert read_estimates(path, now=1010.0, max_age=60) is None, name
    assert time.process_time() - start < 1.0, name
    assert why in said_once(capsys, path), name


def test_a_big_file_is_not_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """50 MiB (sparse: it takes no room on the host) is refused before it is read."""
    path = tmp_path / "estimates.json"
    with path.open("wb") as f:
        f.truncate(50 * MiB)
    start = time.process_time()
    assert read_estimates(path, now=1010.0, max_age=60) is None
    assert time.process_time() - start < 0.5
    assert "it is larger than 2 MiB" in said_once(capsys, path)


def test_a_fifo_does_not_hang(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "estimates.json"
    os.mkfifo(path)

    def hung(*args: object) -> None:
        raise TimeoutError("read_estimates waited for a writer on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        assert read_estimates(path, now=1010.0, max_age=60) is None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert "it is a fifo, not a regular file" in said_once(capsys, path)


def test_a_symlink_is_not_followed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = write(tmp_path, written_at=1000.0)
    assert read_estimates(real, now=1010.0, max_age=60) is not None
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert read_estimates(link, now=1010.0, max_age=60) is None
    assert "it is a symlink" in said_once(capsys, link)
    directory = tmp_path / "dir.json"
    directory.mkdir()
    assert read_estimates(directory, now=1010.0, max_age=60) is None
    assert "it is a directory" in said_once(capsys, directory)


def test_missing_or_stale_says_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No daemon (no file, or one it left when it stopped) is no problem: nothing on stderr."""
    path = write(tmp_path, written_at=1000.0)
    assert read_estimates(path, now=2000.0, max_age=60) is None
    assert read_estimates(tmp_path / "none.json", now=1000.0, max_age=60) is None
    assert read_estimates(tmp_path / "no" / "none.json", now=1000.0, max_age=60) is None
    assert capsys.readouterr() == ("", "")


def test_the_largest_config_fits_under_the_cap(tmp_path: Path) -> None:
    """The size cap holds the file of the most pools a config can define, with the longest
    names and figures: 6 values a pool (name, mapping, two file keys and paths)."""
    most_pools = (MAX_VALUES - 3) // 6  # less the top mapping, "pools" and its mapping
    longest = 1.2345678901234567e-300  # a 23-character repr; figures are never negative
    pools = [
        figures(f"{i:0127d}", longest, FullIn(cap=longest, backing_fs=longest))
        for i in range(most_pools)
    ]
    path = tmp_path / "estimates.json"
    path.write_text(render_estimates(pools, 1.7e9 + 0.123456789))
    assert path.stat().st_size <= estimates.MAX_ESTIMATES_BYTES // 2  # and as much again
    read = read_estimates(path, now=1.7e9 + 1, max_age=60)
    assert read is not None and len(read) == most_pools
