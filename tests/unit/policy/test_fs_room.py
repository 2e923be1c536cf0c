"""When the pool files' holes are claimed (room.py): pure figures in, a yes or no out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinwatchd.base.units import Bytes
from thinwatchd.policy.fs_room import (
    CLAIM_REACTION_SECONDS,
    NEIGHBOUR_BYTES_PER_SECOND,
    claim_margin,
    must_claim,
    next_look_seconds,
)

MiB, GiB = 1024**2, 1024**3
SECOND_OF_NVME = int(NEIGHBOUR_BYTES_PER_SECOND * CLAIM_REACTION_SECONDS)


def test_the_margin_is_the_dirty_limit_and_a_fast_disk_for_the_reaction_time() -> None:
    assert claim_margin(Bytes(0), 0, 0.0) == SECOND_OF_NVME
    assert claim_margin(Bytes(0), 800 * MiB, 0.0) == 800 * MiB + SECOND_OF_NVME
    # a neighbour seen filling faster than the assumed disk counts at its own rate
    assert claim_margin(Bytes(0), 0, 8.0 * GiB) == 4 * GiB
    # never under the reserve: no growth may take it either
    assert claim_margin(Bytes(20 * GiB), 800 * MiB, 0.0) == 20 * GiB


@pytest.mark.parametrize(
    ("free", "promised", "margin", "claim"),
    [
        (100 * GiB, 10 * GiB, 2 * GiB, False),  # roomy: the host keeps what discards gave back
        (12 * GiB, 10 * GiB, 2 * GiB, False),  # exactly the margin beyond the promise
        (12 * GiB - 1, 10 * GiB, 2 * GiB, True),  # under it: a neighbour could take it
        (5 * GiB, 10 * GiB, 2 * GiB, True),  # over-promised already: claim what can be
        (1 * GiB, 0, 2 * GiB, False),  # nothing promised, nothing to claim
    ],
)
def test_holes_are_claimed_when_the_headroom_is_under_the_margin(
    free: int, promised: int, margin: int, claim: bool
) -> None:
    assert must_claim(free, promised, margin) is claim


def test_a_roomy_filesystem_is_looked_at_rarely_and_a_tight_one_at_every_tick() -> None:
    assert next_look_seconds(1000 * GiB, 0, 2 * GiB, 0.2, 10.0) == 10.0
    assert next_look_seconds(3 * GiB, 0, 2 * GiB, 0.2, 10.0) == 0.5  # 1 GiB at 2 GiB/s
    assert next_look_seconds(2 * GiB, 0, 2 * GiB, 0.2, 10.0) == 0.2
    assert next_look_seconds(0, 5 * GiB, 2 * GiB, 0.2, 10.0) == 0.2


@given(
    free=st.integers(0, 1 << 50),
    promised=st.integers(0, 1 << 50),
    margin=st.integers(0, 1 << 40),
)
def test_the_next_look_comes_before_a_neighbour_could_cross_the_margin(
    free: int, promised: int, margin: int
) -> None:
    """Between two looks a neighbour at NEIGHBOUR_BYTES_PER_SECOND takes at most the headroom
    above the margin (or the look comes at the fastest tick, or the slowest bound)."""
    wait = next_look_seconds(free, promised, margin, 0.2, 10.0)
    assert 0.2 <= wait <= 10.0
    if 0.2 < wait < 10.0:
        assert wait * NEIGHBOUR_BYTES_PER_SECOND <= free - promised - margin + 1
