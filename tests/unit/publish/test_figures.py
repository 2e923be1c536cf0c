"""A pool's published figures: fixed once made, the optional ones absent unless measured."""

from __future__ import annotations

import dataclasses

import pytest

from thinwatchd.base.units import Sectors
from thinwatchd.publish.figures import PoolMetrics


def test_figures_are_fixed_and_the_optional_ones_absent_unless_given() -> None:
    m = PoolMetrics(
        name="pool",
        block_size=Sectors(128),
        status=None,
        growths_data=0,
        growths_metadata=0,
        failures=0,
        last_growth_seconds=None,
        backing_fs_free_bytes=None,
    )
    optional = [f.name for f in dataclasses.fields(m) if f.default is not dataclasses.MISSING]
    assert [getattr(m, name) for name in optional] == [None, None, (), None, None, None, None]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.failures = 1  # type: ignore[misc]
