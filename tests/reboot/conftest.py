"""Every test under tests/reboot/ is a ``vm`` test: it boots the VM test bed itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.markers import mark_tests_under

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tests_under(_HERE, items, pytest.mark.vm)
