"""Session-wide test configuration: the real-kernel VM test bed.

Tests marked ``kernel`` (all of tests/kernel/) or ``systemd`` (all of tests/systemd/) need a
real device-mapper. Where this host has none they run inside a qemu guest, one boot per mode
for all of them, and their inner results are reported here: see tests/vm/pytest_plugin.py.
"""

from __future__ import annotations

import pytest

from tests.vm.pytest_plugin import VmTestBed


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(VmTestBed(config), "thinwatchd-vm-test-bed")
