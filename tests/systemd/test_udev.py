"""The systemd guest runs systemd-udevd, and udev makes the /dev/mapper links.

dmsetup is used here, and only here, on purpose: it waits on udev through its cookie (no
--noudevsync), so the links exist when it returns, or it hangs and the guest's timeout fails us.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.systemd


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def zero_device() -> Iterator[str]:
    name = f"twtest-udev-{uuid.uuid4().hex[:8]}"
    _run("dmsetup", "create", name, "--table", "0 8 zero")
    try:
        yield name
    finally:
        _run("dmsetup", "remove", name)


def test_systemd_udevd_is_active() -> None:
    assert _run("systemctl", "is-active", "systemd-udevd.service").strip() == "active"


def test_udev_makes_the_mapper_links(zero_device: str) -> None:
    mapper = Path("/dev/mapper") / zero_device
    by_id = Path("/dev/disk/by-id") / f"dm-name-{zero_device}"
    assert mapper.exists(), f"{mapper} made by udev's dm rules"
    assert by_id.is_symlink(), f"{by_id} made by udev's persistent-storage rules"
    assert os.path.realpath(mapper) == os.path.realpath(by_id)
    assert Path(os.path.realpath(mapper)).is_block_device()
