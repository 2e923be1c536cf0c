"""Units of size. Kernel interfaces speak sectors and blocks; config speaks bytes."""

from __future__ import annotations

from typing import NewType

__all__ = [
    "META_BLOCK_BYTES",
    "META_BLOCK_SECTORS",
    "SECTOR_BYTES",
    "Bytes",
    "DataBlocks",
    "MetaBlocks",
    "Sectors",
    "bytes_to_sectors",
    "format_bytes",
    "sectors_to_bytes",
]

Bytes = NewType("Bytes", int)
Sectors = NewType("Sectors", int)
#: Pool data blocks; each is data_block_size sectors.
DataBlocks = NewType("DataBlocks", int)
#: Thin-pool metadata blocks; each is 4 KiB (drivers/md/dm-thin-metadata.h THIN_METADATA_BLOCK_SIZE).
MetaBlocks = NewType("MetaBlocks", int)

#: include/linux/blk_types.h SECTOR_SHIFT = 9
SECTOR_BYTES = 512
META_BLOCK_BYTES = 4096
META_BLOCK_SECTORS = META_BLOCK_BYTES // SECTOR_BYTES


def bytes_to_sectors(size: int) -> Sectors:
    """Return whole sectors in size bytes (rounded down)."""
    return Sectors(size // SECTOR_BYTES)


def sectors_to_bytes(sectors: int) -> Bytes:
    """Return the byte size of a number of sectors."""
    return Bytes(sectors * SECTOR_BYTES)


def format_bytes(size: int) -> str:
    """Return size in the largest binary unit that keeps it >= 1, like '1.5GiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
