"""Units of size. Kernel interfaces speak sectors and blocks; config speaks bytes."""

from __future__ import annotations

from typing import NewType

__all__ = [
    "META_BLOCK_BYTES",
    "SECTOR_BYTES",
    "Bytes",
    "DataBlocks",
    "MetaBlocks",
    "Sectors",
    "bytes_to_data_blocks",
    "bytes_to_data_blocks_up",
    "bytes_to_meta_blocks",
    "bytes_to_sectors",
    "data_block_bytes",
    "data_blocks_to_bytes",
    "data_blocks_to_sectors",
    "disk_blocks_to_bytes",
    "fs_blocks_to_bytes",
    "meta_blocks_to_bytes",
    "sectors_to_bytes",
    "sectors_to_data_blocks",
    "whole_data_blocks",
    "whole_meta_blocks",
]

Bytes = NewType("Bytes", int)
Sectors = NewType("Sectors", int)
#: Pool data blocks; each is data_block_size sectors.
DataBlocks = NewType("DataBlocks", int)
#: Thin-pool metadata blocks; each is 4 KiB
#: (drivers/md/dm-thin-metadata.h THIN_METADATA_BLOCK_SIZE).
MetaBlocks = NewType("MetaBlocks", int)

#: include/linux/blk_types.h SECTOR_SHIFT = 9
SECTOR_BYTES = 512
META_BLOCK_BYTES = Bytes(4096)


# --- Conversions: the only place one unit becomes another -------------------------------------
# Arithmetic inside one unit (blocks minus blocks) stays where it is done, rewrapped in its type;
# a value changes unit only through these.


def bytes_to_sectors(size: Bytes) -> Sectors:
    """Return whole sectors in size bytes (rounded down)."""
    return Sectors(size // SECTOR_BYTES)


def sectors_to_bytes(sectors: Sectors) -> Bytes:
    """Return the byte size of a number of sectors."""
    return Bytes(sectors * SECTOR_BYTES)


# st_blocks and statvfs's counts stay plain int, with no DiskBlocks or FsBlocks type: they come
# straight from os.stat/os.statvfs into these, in the one module (kernel/fs.py) that reads them,
# and go no further, so a type would only be wrapped around the very value it is converted from.


def disk_blocks_to_bytes(st_blocks: int) -> Bytes:
    """Return the bytes a file has on disk from stat's st_blocks (always 512-byte units)."""
    return Bytes(st_blocks * 512)


def fs_blocks_to_bytes(blocks: int, fragment_size: int) -> Bytes:
    """Return the bytes in statvfs's blocks of a filesystem (f_bavail, f_blocks: f_frsize units)."""
    return Bytes(blocks * fragment_size)


def data_block_bytes(block_size: Sectors) -> Bytes:
    """Return the size in bytes of one data block of block_size sectors."""
    return sectors_to_bytes(block_size)


def data_blocks_to_bytes(blocks: DataBlocks, block_size: Sectors) -> Bytes:
    """Return the bytes in a number of data blocks of block_size sectors."""
    return Bytes(blocks * data_block_bytes(block_size))


def data_blocks_to_sectors(blocks: DataBlocks, block_size: Sectors) -> Sectors:
    """Return the sectors in a number of data blocks of block_size sectors."""
    return Sectors(blocks * block_size)


def bytes_to_data_blocks(size: Bytes, block_size: Sectors) -> DataBlocks:
    """Return the whole data blocks of block_size sectors in size bytes (rounded down)."""
    return DataBlocks(size // data_block_bytes(block_size))


def bytes_to_data_blocks_up(size: Bytes, block_size: Sectors) -> DataBlocks:
    """Return the fewest data blocks of block_size sectors that hold size bytes (rounded up)."""
    return DataBlocks(-(-size // data_block_bytes(block_size)))


def sectors_to_data_blocks(sectors: Sectors, block_size: Sectors) -> DataBlocks:
    """Return the whole data blocks of block_size sectors in a number of sectors."""
    return DataBlocks(sectors // block_size)


def whole_data_blocks(size: Bytes, block_size: Sectors) -> Bytes:
    """Return size rounded down to whole data blocks: the kernel ignores a partial last block."""
    return data_blocks_to_bytes(bytes_to_data_blocks(size, block_size), block_size)


def whole_meta_blocks(size: Bytes) -> Bytes:
    """Return size rounded down to whole 4 KiB metadata blocks, all the kernel uses."""
    return meta_blocks_to_bytes(bytes_to_meta_blocks(size))


def meta_blocks_to_bytes(blocks: MetaBlocks) -> Bytes:
    """Return the bytes in a number of 4 KiB metadata blocks."""
    return Bytes(blocks * META_BLOCK_BYTES)


def bytes_to_meta_blocks(size: Bytes) -> MetaBlocks:
    """Return the whole 4 KiB metadata blocks in size bytes (rounded down)."""
    return MetaBlocks(size // META_BLOCK_BYTES)
