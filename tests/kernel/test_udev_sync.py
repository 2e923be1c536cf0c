"""The libdm cookie protocol on real SysV semaphores, and /dev/mapper nodes without udev.

udev is simulated where needed: a thread does what ``dmsetup udevcomplete $DM_COOKIE`` does
(decrement the semaphore with key 0x0D4D0000 | base). The real udevd is in tests/systemd.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.loopback import Devices, open_dm, semaphores_left, unique
from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Sectors
from thinwatchd.kernel import udev_sync
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.dm_abi import UdevFlag
from thinwatchd.kernel.udev_sync import POOL_UDEV_FLAGS, UdevSync

pytestmark = pytest.mark.kernel


def our_semaphores() -> set[int]:
    return set(semaphores_left())


def udevcomplete(cookie: int) -> None:
    """What dmsetup udevcomplete does: strip the flags, add the magic, decrement."""
    key = (0x0D4D << 16) | (cookie & 0xFFFF)
    semid = udev_sync._call("semget", key, 1, 0)
    udev_sync._semop(semid, -1, 0o4000)


@pytest.fixture
def fake_udev(tmp_path: Path) -> UdevSync:
    """A UdevSync that believes udevd and 95-dm-notify.rules are there."""
    (tmp_path / "control").write_text("")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "95-dm-notify.rules").write_text("")
    return UdevSync(
        dev_dir=str(tmp_path / "dev"),
        udev_control=str(tmp_path / "control"),
        rule_dirs=(str(tmp_path / "rules"),),
        timeout=5.0,
    )


def test_cookie_carries_flags_and_a_base(fake_udev: UdevSync) -> None:
    before = our_semaphores()

    def operation(cookie: int) -> bool:
        assert cookie >> 16 == int(POOL_UDEV_FLAGS)
        assert cookie & 0xFFFF != 0
        assert (0x0D4D << 16) | (cookie & 0xFFFF) in our_semaphores()
        return False

    assert fake_udev.synced("x", operation) is False
    assert our_semaphores() == before


def test_uevent_generated_waits_for_udevcomplete(fake_udev: UdevSync) -> None:
    before = our_semaphores()
    done = threading.Event()

    def resumed(cookie: int) -> bool:
        def udev() -> None:
            time.sleep(0.3)
            done.set()
            udevcomplete(cookie)

        threading.Thread(target=udev).start()
        return True  # as resume() does when the kernel sent the uevent

    start = time.monotonic()
    assert fake_udev.synced("x", resumed) is True
    assert done.is_set() and time.monotonic() - start >= 0.25
    assert our_semaphores() == before


def test_no_uevent_means_no_wait(fake_udev: UdevSync) -> None:
    start = time.monotonic()
    assert fake_udev.synced("x", lambda cookie: False) is False
    assert time.monotonic() - start < 1


def test_timeout_removes_the_semaphore_and_raises(fake_udev: UdevSync) -> None:
    fake_udev.timeout = 0.5
    before = our_semaphores()
    with pytest.raises(KernelError) as err:
        fake_udev.synced("x", lambda cookie: True)  # udev never answers
    assert err.value.errno == errno.ETIMEDOUT and "udev" in str(err.value)
    assert our_semaphores() == before


def test_a_failing_block_never_leaves_a_semaphore(fake_udev: UdevSync) -> None:
    before = our_semaphores()

    def failing(cookie: int) -> bool:
        raise RuntimeError("the ioctl failed")

    with pytest.raises(RuntimeError):
        fake_udev.synced("x", failing)
    assert our_semaphores() == before


def test_a_failed_increment_runs_nothing_and_says_nothing_more(
    fake_udev: UdevSync, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """semop(+1) refused (EINVAL, a limit): the error is raised, the operation never runs, the
    semaphore is removed, and no second decrement is tried on it (no extra warning)."""
    before, real = our_semaphores(), udev_sync._semop

    def semop(semid: int, op: int, flags: int = 0, timeout: float | None = None) -> None:
        if op == +1:
            raise OSError(errno.ERANGE, "semop: Numerical result out of range")
        real(semid, op, flags, timeout)

    monkeypatch.setattr(udev_sync, "_semop", semop)
    ran: list[int] = []

    def operation(cookie: int) -> bool:
        ran.append(cookie)
        return True

    with pytest.raises(OSError):
        fake_udev.synced("x", operation)
    assert ran == [] and our_semaphores() == before
    assert [r for r in caplog.records if "udev cookie" in r.getMessage()] == []


@pytest.fixture
def dm() -> Iterator[DeviceMapper]:
    with open_dm() as dm:
        yield dm


def test_real_resume_reports_uevent_and_the_protocol_completes(
    dm: DeviceMapper, fake_udev: UdevSync
) -> None:
    if UdevSync().udev_running():
        pytest.skip("the real udevd would complete the cookie too (see tests/systemd)")
    devices = Devices(dm, UdevSync())
    name = devices.track(unique("cookie"))
    try:
        dm.create(name)
        dm.load_table(name, [Target(Sectors(0), Sectors(8), "error", "")])
        seen: list[int] = []

        def resume(cookie: int) -> bool:
            generated = dm.resume(name, cookie)
            seen.append(cookie)
            udevcomplete(cookie)  # the kernel did send the uevent: "udev" completes it
            return generated

        assert fake_udev.synced(name, resume, PUBLIC) is True
        # already active: no uevent, no wait
        assert fake_udev.synced(name, lambda cookie: dm.resume(name, cookie)) is False
        assert (0x0D4D << 16) | (seen[0] & 0xFFFF) not in our_semaphores()
    finally:
        devices.remove_all()


PUBLIC = UdevFlag.PRIMARY_SOURCE | UdevFlag.DISABLE_LIBRARY_FALLBACK


def test_plain_mode_makes_and_removes_the_node(dm: DeviceMapper, tmp_path: Path) -> None:
    udev = UdevSync(dev_dir=str(tmp_path), udev_control=str(tmp_path / "no-udevd"))
    name = unique("plain")
    info = dm.create(name)
    try:
        cookies: list[int] = []

        def operation(cookie: int) -> bool:
            cookies.append(cookie)
            return False

        udev.synced(name, operation)
        assert cookies == [int(POOL_UDEV_FLAGS) << 16]  # flags only, base 0: no semaphore
        assert udev.ensure_node(name, info.dev) is True
        assert udev.ensure_node(name, info.dev) is False
        assert os.stat(udev.node_path(name)).st_rdev == info.dev
    finally:
        udev.synced(name, lambda cookie: dm.remove(name, cookie))
        assert udev.remove_node(name) is True
    assert not os.path.exists(udev.node_path(name))
