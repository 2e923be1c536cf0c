"""thin_check in a process group of its own, ended with the daemon (issue 19, item 9).

Under KillMode=process, systemd ends only the daemon on stop or restart: a thin_check left
running held the metadata device, and the next instance's check met a busy device and reported
damage. A fake thin_check (a shell script on PATH) that starts a child of its own and sleeps
stands in for a long check of a large metadata device.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import FakeCommand
from thinwatchd.pool import thin_check

PATIENCE = 5.0


@pytest.fixture
def slow_thin_check(tmp_path: Path, fake_command: FakeCommand) -> Path:
    """A thin_check that writes its process group to a file, starts a child, and sleeps."""
    pgid = tmp_path / "pgid"
    fake_command(
        "thin_check",
        f"#!/bin/sh\nps -o pgid= $$ > {pgid}.tmp && mv {pgid}.tmp {pgid}\nsleep 60 &\nsleep 60\n",
    )
    return pgid


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_check_under_way_and_what_it_started_end_with_the_daemon(
    slow_thin_check: Path, tmp_path: Path
) -> None:
    reports: list[str | None] = []
    worker = threading.Thread(target=lambda: reports.append(thin_check.thin_check("/dev/x")))
    worker.start()
    deadline = time.monotonic() + PATIENCE
    while not slow_thin_check.exists():
        assert time.monotonic() < deadline, "the fake thin_check never started"
        time.sleep(0.02)
    pgid = int(slow_thin_check.read_text())
    assert pgid != os.getpgrp(), "thin_check must run in a process group of its own"
    assert group_alive(pgid)
    assert thin_check.end_all() == 1
    worker.join(PATIENCE)
    assert not worker.is_alive()
    deadline = time.monotonic() + PATIENCE
    while group_alive(pgid):  # the sleeping child of the check too, not just the check
        assert time.monotonic() < deadline, "a process of the check outlived end_all"
        time.sleep(0.02)
    assert reports and reports[0] is not None  # a check ended so is no pass
    assert thin_check.end_all() == 0
