"""Every test under tests/systemd/ is a ``systemd`` test, and so also a ``kernel`` one.

It needs systemd as PID 1 with systemd-udevd and a real device-mapper. Where the host lacks
them, it runs in the systemd guest (``systemd`` wins over ``kernel`` when choosing a guest).
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.kernel)
            item.add_marker(pytest.mark.systemd)
