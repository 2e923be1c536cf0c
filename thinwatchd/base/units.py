"""Units of size. Kernel interfaces speak sectors and blocks; config speaks bytes."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import NewType

__all__ = [
    "DURATION_HINT",
    "MAX_SIZE_BYTES",
    "META_BLOCK_BYTES",
    "PERCENT_HINT",
    "SECTOR_BYTES",
    "SIZE_HINT",
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
    "format_bytes",
    "fs_blocks_to_bytes",
    "meta_blocks_to_bytes",
    "parse_duration",
    "parse_percent",
    "parse_size",
    "sectors_to_bytes",
    "sectors_to_data_blocks",
    "show_value",
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


def format_duration(seconds: float) -> str:
    """Return a rough duration for people: '45 s', '12 min', '3 h 20 min', '4 days'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 2 * 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours:.0f} h {rest // 60:.0f} min"
    return f"{seconds // 86400:.0f} days"


# --- Conversions: the only place one unit becomes another -------------------------------------
# Arithmetic inside one unit (blocks minus blocks) stays where it is done, rewrapped in its type;
# a value changes unit only through these.


def bytes_to_sectors(size: int) -> Sectors:
    """Return whole sectors in size bytes (rounded down)."""
    return Sectors(size // SECTOR_BYTES)


def sectors_to_bytes(sectors: int) -> Bytes:
    """Return the byte size of a number of sectors."""
    return Bytes(sectors * SECTOR_BYTES)


def disk_blocks_to_bytes(st_blocks: int) -> Bytes:
    """Return the bytes a file has on disk from stat's st_blocks (always 512-byte units)."""
    return Bytes(st_blocks * 512)


def fs_blocks_to_bytes(blocks: int, fragment_size: int) -> Bytes:
    """Return the bytes in statvfs's blocks of a filesystem (f_bavail, f_blocks: f_frsize units)."""
    return Bytes(blocks * fragment_size)


def data_block_bytes(block_size: Sectors) -> Bytes:
    """Return the size in bytes of one data block of block_size sectors."""
    return sectors_to_bytes(block_size)


def data_blocks_to_bytes(blocks: int, block_size: Sectors) -> Bytes:
    """Return the bytes in a number of data blocks of block_size sectors."""
    return Bytes(blocks * data_block_bytes(block_size))


def data_blocks_to_sectors(blocks: int, block_size: Sectors) -> Sectors:
    """Return the sectors in a number of data blocks of block_size sectors."""
    return Sectors(blocks * block_size)


def bytes_to_data_blocks(size: int, block_size: Sectors) -> DataBlocks:
    """Return the whole data blocks of block_size sectors in size bytes (rounded down)."""
    return DataBlocks(size // data_block_bytes(block_size))


def bytes_to_data_blocks_up(size: int, block_size: Sectors) -> DataBlocks:
    """Return the fewest data blocks of block_size sectors that hold size bytes (rounded up)."""
    return DataBlocks(-(-size // data_block_bytes(block_size)))


def sectors_to_data_blocks(sectors: int, block_size: Sectors) -> DataBlocks:
    """Return the whole data blocks of block_size sectors in a number of sectors."""
    return DataBlocks(sectors // block_size)


def whole_data_blocks(size: int, block_size: Sectors) -> Bytes:
    """Return size rounded down to whole data blocks: the kernel ignores a partial last block."""
    return data_blocks_to_bytes(bytes_to_data_blocks(size, block_size), block_size)


def whole_meta_blocks(size: int) -> Bytes:
    """Return size rounded down to whole 4 KiB metadata blocks, all the kernel uses."""
    return meta_blocks_to_bytes(bytes_to_meta_blocks(size))


def meta_blocks_to_bytes(blocks: int) -> Bytes:
    """Return the bytes in a number of 4 KiB metadata blocks."""
    return Bytes(blocks * META_BLOCK_BYTES)


def bytes_to_meta_blocks(size: int) -> MetaBlocks:
    """Return the whole 4 KiB metadata blocks in size bytes (rounded down)."""
    return MetaBlocks(size // META_BLOCK_BYTES)


def format_bytes(size: int) -> str:
    """Return size in the largest binary unit that keeps it >= 1, like '1.5GiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- Parsing what people write in the config -------------------------------------------------

#: What a size looks like, for error messages.
SIZE_HINT = "use a number of bytes or a number with a unit like 512MiB or 1GiB"
PERCENT_HINT = "use a number like 80 or 80%"
DURATION_HINT = "use a number of seconds or a number with a unit like 500ms, 10s, 2m or 1h"

#: The largest file Linux can hold (off_t is signed 64-bit); anything bigger is a typo.
MAX_SIZE_BYTES = 2**63 - 1

# Every size unit is binary, whatever its spelling: K, KB and KiB all mean 1024 bytes. lvm2
# (lvcreate -L 100G) and Docker (units.RAMInBytes, dm.basesize=100G) read them that way, so a
# size copied from either means the same here; case does not matter.
_SIZE_UNITS = {"": Fraction(1), "b": Fraction(1)} | {
    spelling: Fraction(1024**power)
    for power, letter in enumerate("kmgtpe", start=1)
    for spelling in (letter, letter + "b", letter + "ib")
}
_DURATION_UNITS = {
    "": Fraction(1),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_PERCENT_UNITS = {"": Fraction(1), "%": Fraction(1)}
# ASCII digits only: \d would let through other scripts' digits. The length cap keeps absurd
# inputs away from int() and its 4300-digit limit.
_NUMBER = r"(?P<sign>[-+]?)(?P<number>[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})"
_SIZE_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>[A-Za-z]*)\s*")
_PERCENT_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>%?)\s*")
_DURATION_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>[A-Za-z]*)\s*")


def show_value(value: object) -> str:
    """Return value as YAML would spell it, shortened, for an error message."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, int) and value.bit_length() > 256:
        return "a very large number"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(
    value: str | int | float,
    pattern: re.Pattern[str],
    units: dict[str, Fraction],
    what: str,
    hint: str,
) -> Fraction:
    """Return the exact value of value (times its unit), rejecting anything else with ValueError."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{show_value(value)} is not {what}; {hint}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{show_value(value)} is not {what}; {hint}")
        amount = Fraction(value)
    elif isinstance(value, int):
        amount = Fraction(value)
    else:
        match = pattern.fullmatch(value)
        factor = units.get(match["unit"].lower()) if match else None
        if match is None or factor is None:
            raise ValueError(f"{show_value(value)} is not {what}; {hint}")
        amount = Fraction(match["number"]) * factor
        if match["sign"] == "-":
            amount = -amount
    if amount < 0:
        raise ValueError(f"{show_value(value)} is negative; {what} must be 0 or more")
    return amount


def parse_size(value: str | int | float) -> Bytes:
    """Return the number of bytes in a size like "100GiB", "1.5T", "4k" or 4096.

    Units are binary whatever their spelling (G = GB = GiB = 1024**3), case-insensitive, from B
    to E(iB); no unit means bytes. A fractional result is rounded down to a whole byte. Raise
    ValueError, with a message naming the value and what is allowed, for anything else,
    including negative sizes and sizes above MAX_SIZE_BYTES.
    """
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        raise ValueError(f"{show_value(value)} is not a whole number of bytes; {SIZE_HINT}")
    size = math.floor(_number(value, _SIZE_RE, _SIZE_UNITS, "a size", SIZE_HINT))
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"{show_value(value)} is larger than any file can be (8EiB)")
    return Bytes(size)


def parse_percent(value: str | int | float) -> float:
    """Return the percentage in "80%", "80", 80 or 80.5 as a float (80.0).

    Raise ValueError for anything else, including negative and non-finite values. The caller
    checks the range, which depends on the setting.
    """
    return _as_float(
        value, _number(value, _PERCENT_RE, _PERCENT_UNITS, "a percentage", PERCENT_HINT)
    )


def parse_duration(value: str | int | float) -> float:
    """Return the seconds in a duration like "500ms", "10s", "2m", "1h" or a plain number.

    Units are ms, s, m and h, case-insensitive; no unit means seconds. Raise ValueError for
    anything else, including negative and non-finite values.
    """
    return _as_float(
        value, _number(value, _DURATION_RE, _DURATION_UNITS, "a duration", DURATION_HINT)
    )


def _as_float(value: object, amount: Fraction) -> float:
    """Return amount as a float, or raise ValueError if it is too large for one."""
    try:
        return float(amount)
    except OverflowError:
        raise ValueError(f"{show_value(value)} is out of range") from None
