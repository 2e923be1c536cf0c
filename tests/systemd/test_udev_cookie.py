"""The libdm cookie protocol with the real systemd-udevd and lvm2's dm rules.

Run in the systemd guest:
    .venv/bin/python -m tests.vm run --mode systemd -- .venv/bin/python -m pytest tests/systemd
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.loopback import Devices, open_dm, semaphores_left, unique
from thinwatchd.base.units import Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.udev_sync import UdevSync

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]

BAD_LOG = ("semaphore", "udevcomplete", "cookie")


@pytest.fixture
def udev() -> UdevSync:
    udev = UdevSync()
    if not udev.udev_running() and not os.environ.get("CI"):
        pytest.skip("systemd-udevd is not running; use: python -m tests.vm run --mode systemd")
    assert udev.udev_running() and udev.notify_rules_installed()
    return udev


@pytest.fixture
def dm() -> Iterator[DeviceMapper]:
    with open_dm() as dm:
        yield dm


def udev_db(dev: int) -> dict[str, str]:
    text = Path(f"/run/udev/data/b{os.major(dev)}:{os.minor(dev)}").read_text()
    return dict(line[2:].split("=", 1) for line in text.splitlines() if line.startswith("E:"))


def udevd_log_since(since: float) -> list[str]:
    """Return udevd's lines since then that mention cookies, semaphores or udevcomplete."""
    subprocess.run(["journalctl", "--sync"], check=False, capture_output=True)
    cmd = ["journalctl", "-u", "systemd-udevd", "--no-pager", "-o", "cat", f"--since=@{since:.6f}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(w in line.lower() for w in BAD_LOG)]


def test_mapper_link_exists_when_resume_returns(dm: DeviceMapper, udev: UdevSync) -> None:
    since = time.time()
    devices = Devices(dm, udev)
    name = devices.track(unique("udev"))
    link = Path(udev.node_path(name))
    try:
        info = dm.create(name)
        dm.load_table(name, [Target(Sectors(0), Sectors(8), "error", "")])
        start = time.monotonic()
        assert udev.synced(name, lambda cookie: dm.resume(name, cookie)) is True
        elapsed = time.monotonic() - start
        assert link.is_symlink(), "udev had not made /dev/mapper/<name> when resume returned"
        assert os.stat(link).st_rdev == info.dev
        assert elapsed < udev.timeout / 2  # udevcomplete really ran: no timeout
        props = udev_db(info.dev)
        assert props["DM_NAME"] == name
        assert props["DM_UDEV_PRIMARY_SOURCE_FLAG"] == "1"  # links survive udevadm trigger
        assert props["DM_UDEV_DISABLE_OTHER_RULES_FLAG"] == "1"  # nothing probes a pool
        assert props.get("DM_UDEV_DISABLE_DM_RULES_FLAG", "") != "1"
        assert semaphores_left() == []

        # a resume that changes the size (RESIZE=1 uevent), as a pool growth does
        dm.load_table(name, [Target(Sectors(0), Sectors(16), "error", "")])
        assert udev.synced(name, lambda cookie: dm.resume(name, cookie)) is True
        assert link.is_symlink() and semaphores_left() == []

        # no uevent (already active, nothing loaded): the protocol must not wait
        start = time.monotonic()
        assert udev.synced(name, lambda cookie: dm.resume(name, cookie)) is False
        assert time.monotonic() - start < 2

        devices.remove(name)
        assert not link.exists() and not link.is_symlink(), "link still there after remove"
        assert semaphores_left() == []
    finally:
        devices.remove_all()
    assert udevd_log_since(since) == []


def test_without_notify_rules_the_monitor_fallback_waits(
    dm: DeviceMapper, udev: UdevSync, tmp_path: Path
) -> None:
    since = time.time()
    fallback = UdevSync(rule_dirs=(str(tmp_path),))  # as if dmsetup were not installed
    assert not fallback.notify_rules_installed()
    devices = Devices(dm, fallback)
    name = devices.track(unique("mon"))
    link = Path(udev.node_path(name))
    try:
        dm.create(name)
        dm.load_table(name, [Target(Sectors(0), Sectors(8), "error", "")])
        cookies: list[int] = []

        def resume(cookie: int) -> bool:
            cookies.append(cookie)
            return dm.resume(name, cookie)

        assert fallback.synced(name, resume) is True
        assert cookies[0] & 0xFFFF == 0  # no semaphore: udevcomplete has nothing to find
        assert link.is_symlink()
        devices.remove(name)
        assert not link.is_symlink()
    finally:
        devices.remove_all()
    assert semaphores_left() == []
    assert udevd_log_since(since) == []


def test_the_journal_check_sees_a_failed_udevcomplete(dm: DeviceMapper, udev: UdevSync) -> None:
    """Negative control: a cookie without its semaphore makes udevd log the failure."""
    since = time.time()
    devices = Devices(dm, udev)
    name = devices.track(unique("neg"))
    try:
        dm.create(name)
        dm.load_table(name, [Target(Sectors(0), Sectors(8), "error", "")])
        dm.resume(name, (0x40 << 16) | 0x4242)  # base 0x4242: no such semaphore
        deadline = time.monotonic() + 10
        while not (lines := udevd_log_since(since)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("udevcomplete" in line for line in lines), lines
    finally:
        devices.remove_all()
