"""Session-wide test configuration: the real-kernel VM test bed, and fixtures every tree uses.

Tests marked ``kernel`` (all of tests/kernel/) or ``systemd`` (all of tests/systemd/) need a
real device-mapper. Where this host has none they run inside a qemu guest, one boot per mode
for all of them, and their inner results are reported here: see tests/vm/pytest_plugin.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.vm.pytest_plugin import VmTestBed


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(VmTestBed(config), "thinwatchd-vm-test-bed")


FakeCommand = Callable[[str, str], Path]


@pytest.fixture
def fake_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCommand:
    """Return a function that puts an executable script of that name and text first on PATH,
    for the test's duration, and returns its path."""
    bin_dir = tmp_path / "fake-bin"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def put(name: str, text: str) -> Path:
        bin_dir.mkdir(exist_ok=True)
        script = bin_dir / name
        script.write_text(text)
        script.chmod(0o755)
        return script

    return put
