"""The record of the pools thinwatchd left suspended: what the next instance reads of it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from thinwatchd.growth.own_suspends import OwnSuspends


def test_names_set_are_read_by_the_next_instance_and_cleared_ones_are_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "own-suspends"
    record = OwnSuspends(path)
    assert not path.exists()  # nothing written until a pool is left suspended
    record.set("a", True)
    record.set("b", True)
    record.set("a", False)
    assert OwnSuspends(path).holds("b")
    assert not OwnSuspends(path).holds("a")
    assert path.read_text() == "b\n"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_an_unchanged_mark_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "own-suspends"
    record = OwnSuspends(path)
    record.set("a", True)
    before = os.stat(path).st_ino
    record.set("a", True)
    record.set("b", False)
    assert os.stat(path).st_ino == before  # a write replaces the file: none happened


def test_no_file_and_no_path_hold_nothing(tmp_path: Path) -> None:
    assert not OwnSuspends(tmp_path / "absent").holds("a")
    memory = OwnSuspends()
    memory.set("a", True)
    assert memory.holds("a")


def test_a_symlink_or_an_oversized_file_is_not_read_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("a\n")
    link = tmp_path / "own-suspends"
    link.symlink_to(target)
    big = tmp_path / "big"
    big.write_text("a\n" + "x" * (1 << 20))
    with caplog.at_level(logging.WARNING, logger="thinwatchd"):
        assert not OwnSuspends(link).holds("a")
        assert not OwnSuspends(big).holds("a")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and f"cannot read {link}" in said[0], said
    assert f"{big} is larger than" in said[1] and "left to whoever" in said[1], said


def test_a_failed_write_is_said_with_the_pools_to_resume_by_hand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = OwnSuspends(tmp_path / "missing-directory" / "own-suspends")
    with caplog.at_level(logging.ERROR, logger="thinwatchd"):
        record.set("a", True)
    assert record.holds("a")  # known in memory all the same
    assert "dmsetup resume" in caplog.text and ": a" in caplog.text, caplog.text


def test_pools_no_longer_configured_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "own-suspends"
    record = OwnSuspends(path)
    record.set("a", True)
    record.set("gone", True)
    record.keep_only(frozenset({"a", "b"}))
    assert path.read_text() == "a\n"
