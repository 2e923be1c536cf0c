"""Every test under tests/kernel/ is a ``kernel`` test: it needs a real device-mapper.

tests/conftest.py runs them natively where the host has dm-thin (as root) or inside the
test bed's guest (``THINWATCHD_IN_VM=1``), and otherwise boots one plain guest for all of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.markers import mark_tests_under

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tests_under(_HERE, items, pytest.mark.kernel)
