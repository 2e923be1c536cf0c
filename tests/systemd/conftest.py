"""Every test under tests/systemd/ is a ``systemd`` test, and so also a ``kernel`` one.

It needs systemd as PID 1 with systemd-udevd and a real device-mapper. Where the host lacks
them, it runs in the systemd guest (``systemd`` wins over ``kernel`` when choosing a guest).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.markers import mark_tests_under

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tests_under(_HERE, items, pytest.mark.kernel, pytest.mark.systemd)
