"""The test bed itself: this kernel has device-mapper and loop devices."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

DM_IOCTL = "=3IIIIiIIIQ128s129s7s"  # struct dm_ioctl, linux/dm-ioctl.h
DM_VERSION = 0xC138FD00  # _IOWR(0xfd, 0, struct dm_ioctl)


def test_dm_version_answers_interface_4() -> None:
    assert struct.calcsize(DM_IOCTL) == 312
    # version 4.0.0, data_size, data_start, target_count, open_count, flags, event_nr,
    # padding, dev, name, uuid, data
    request = struct.pack(DM_IOCTL, 4, 0, 0, 312, 312, 0, 0, 0, 0, 0, 0, b"", b"", b"")
    fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    try:
        answer = bytearray(request)
        fcntl.ioctl(fd, DM_VERSION, answer)
    finally:
        os.close(fd)
    major, minor, patch = struct.unpack_from("=3I", answer)
    assert major == 4, f"device-mapper ioctl interface {major}.{minor}.{patch}"


def test_loop_control_exists() -> None:
    assert Path("/dev/loop-control").is_char_device()


def test_guest_environment_when_in_vm() -> None:
    if os.environ.get("THINWATCHD_IN_VM") != "1":
        pytest.skip("runs natively: no guest environment to check")
    scratch = Path(os.environ["THINWATCHD_SCRATCH"])
    assert scratch.is_mount(), "the scratch disk is mounted"
    assert Path.cwd() == Path(__file__).resolve().parents[2], "cwd is the checkout"
