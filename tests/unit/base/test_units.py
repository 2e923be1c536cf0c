"""Unit tests for thinwatchd.base.units: the conversions between units."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from thinwatchd.base.units import (
    Bytes,
    Sectors,
    bytes_to_data_blocks,
    bytes_to_data_blocks_up,
    bytes_to_meta_blocks,
    bytes_to_sectors,
    data_block_bytes,
    data_blocks_to_bytes,
    data_blocks_to_sectors,
    meta_blocks_to_bytes,
    sectors_to_bytes,
    whole_data_blocks,
    whole_meta_blocks,
)

KiB = 1024


def test_sector_conversions() -> None:
    assert bytes_to_sectors(Bytes(1023)) == 1
    assert sectors_to_bytes(Sectors(128)) == 64 * KiB


@given(st.integers(0, 2**50).map(Bytes), st.integers(1, 16384).map(lambda n: Sectors(128 * n)))
def test_block_conversions_round_as_the_kernel_counts(size: Bytes, block_size: Sectors) -> None:
    """Whole blocks round down (the kernel ignores a partial block), the blocks needed to hold a
    size round up, and converting back gives the bytes of those blocks."""
    block = data_block_bytes(block_size)
    assert block == block_size * 512
    blocks = bytes_to_data_blocks(size, block_size)
    assert data_blocks_to_bytes(blocks, block_size) == whole_data_blocks(size, block_size)
    assert whole_data_blocks(size, block_size) <= size < whole_data_blocks(size, block_size) + block
    needed = bytes_to_data_blocks_up(size, block_size)
    assert needed - blocks == (0 if size % block == 0 else 1)
    assert data_blocks_to_sectors(blocks, block_size) * 512 == data_blocks_to_bytes(
        blocks, block_size
    )
    assert whole_meta_blocks(size) == meta_blocks_to_bytes(bytes_to_meta_blocks(size))
    assert whole_meta_blocks(size) % 4096 == 0 and size - whole_meta_blocks(size) < 4096
