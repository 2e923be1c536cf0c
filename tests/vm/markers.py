"""Mark every test under a directory (tests/kernel, tests/systemd) with the markers it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["mark_tests_under"]


def mark_tests_under(
    directory: Path, items: list[pytest.Item], *marks: pytest.MarkDecorator
) -> None:
    """Add marks to each collected item whose file lies under directory."""
    for item in items:
        if item.path.resolve().is_relative_to(directory):
            for mark in marks:
                item.add_marker(mark)
