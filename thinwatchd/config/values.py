"""The config's values: one parser per kind of value (a size, a share, a block size, a feature
list...), each taking the raw YAML value and raising Invalid with what is wrong and what to
write instead. load.py maps keys to these and adds the key's path to the message.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thinwatchd.base.units import (
    Bytes,
    DataBlocks,
    Sectors,
    bytes_to_sectors,
    sectors_to_bytes,
    whole_meta_blocks,
)
from thinwatchd.config.quantities import (
    DURATION_HINT,
    PERCENT_HINT,
    SIZE_HINT,
    parse_duration,
    parse_percent,
    parse_size,
    show_value,
)
from thinwatchd.config.settings import METADATA_MAX_BYTES
from thinwatchd.thin.table import MAX_BLOCK_SECTORS, MIN_BLOCK_SECTORS, Feature, valid_block_size

__all__ = [
    "FEATURES",
    "LOG_LEVELS",
    "METADATA_MIN_BYTES",
    "Invalid",
    "Parser",
    "block_size",
    "boolean",
    "duration_value",
    "features",
    "file_path",
    "low_water_blocks",
    "metadata_size",
    "one_of",
    "optional",
    "share",
    "size_or_share",
    "size_value",
    "within",
]

#: The thin-pool feature args a pool may list. read_only is not among them: a read-only pool
#: allocates nothing, so there would be nothing to grow and every write to a thin volume fails.
FEATURES = tuple(f.value for f in Feature if f is not Feature.READ_ONLY)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: lvm2's minimum pool metadata size; the kernel needs room for its superblock and space maps.
METADATA_MIN_BYTES = 2 * 1024**2


class Invalid(Exception):
    """A value is wrong; the caller adds the key path (and `where`, a suffix like "[2]")."""

    def __init__(self, message: str, *, shown: bool = False, where: str = "") -> None:
        super().__init__(message)
        self.shown = shown  # the message already names the value
        self.where = where


Parser = Callable[[object], Any]


def via(parse: Callable[[str | int | float], Any], what: str, hint: str) -> Parser:
    """Return a parser that applies a units parser, whose messages already name the value."""

    def parser(value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Invalid(f"is not {what}; {hint}")
        try:
            return parse(value)
        except ValueError as e:
            raise Invalid(str(e), shown=True) from None

    return parser


def within(parse: Parser, ok: Callable[[Any], bool], allowed: str) -> Parser:
    """Return a parser that also checks the parsed value's range."""

    def parser(value: object) -> Any:
        parsed = parse(value)
        if not ok(parsed):
            raise Invalid(f"is out of range; use {allowed}")
        return parsed

    return parser


size_value = via(parse_size, "a size", SIZE_HINT)
duration_value = via(parse_duration, "a duration", DURATION_HINT)
percent_value = via(parse_percent, "a percentage", PERCENT_HINT)


def size_or_share(share_key: str) -> Parser:
    """Return a size parser that sends people who wrote a percentage to share_key."""

    def parser(value: object) -> Bytes:
        if isinstance(value, str) and value.rstrip().endswith("%"):
            raise Invalid(f"is not a size; {SIZE_HINT}, or set {share_key}: {value.strip()}")
        size: Bytes = size_value(value)
        return size

    return parser


def metadata_size(value: object) -> Bytes:
    size = whole_meta_blocks(size_value(value))
    if size < METADATA_MIN_BYTES:
        raise Invalid("is too small; use at least 2MiB")
    if size > METADATA_MAX_BYTES:
        most = f"{METADATA_MAX_BYTES // 1024}KiB, about {METADATA_MAX_BYTES / 1024**3:.2f}GiB"
        raise Invalid(f"is more than the kernel can use; use at most {most}")
    return size


def share(value: object) -> float:
    """Parse a percentage; a bare number below 1 is refused because it looks like a fraction."""
    percent: float = percent_value(value)
    if 0 < percent < 1 and not (isinstance(value, str) and "%" in value):
        raise Invalid(f"is ambiguous; write {percent * 100:g}% or, for under 1%, {percent:g}%")
    return percent


def whole(value: object) -> int | None:
    """Return value as a whole number if it is one (YAML gives text, Python callers ints)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,20}\s*", value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def block_size(value: object) -> Sectors:
    """Parse data_block_size: a plain number is sectors, as in the table; with a unit, a size."""
    sectors = whole(value)
    if isinstance(value, str) and sectors is None:
        with contextlib.suppress(ValueError):
            size = parse_size(value)
            whole_sectors = bytes_to_sectors(size)
            sectors = whole_sectors if sectors_to_bytes(whole_sectors) == size else None
    if sectors is None or not valid_block_size(sectors):
        lo, hi = MIN_BLOCK_SECTORS, MAX_BLOCK_SECTORS
        lo_kib, hi_gib = sectors_to_bytes(lo) // 1024, sectors_to_bytes(hi) // 1024**3
        raise Invalid(
            f"is not a valid block size; use {lo} to {hi} sectors in steps of {lo}, or a size "
            f"from {lo_kib}KiB to {hi_gib}GiB in steps of {lo_kib}KiB"
        )
    return Sectors(sectors)


def low_water_blocks(value: object) -> DataBlocks:
    blocks = whole(value)
    if blocks is None or not 1 <= blocks < 2**63:
        raise Invalid("is not a number of data blocks; use 1 or more")
    return DataBlocks(blocks)


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("is not a boolean; use true or false")
    return value


def file_path(value: object) -> Path:
    absolute = isinstance(value, str) and value.startswith("/") and "\0" not in value
    if not absolute or os.path.basename(str(value)) in ("", ".", ".."):  # not a directory
        raise Invalid("is not an absolute path to a file; use one like /srv/pool/data")
    return Path(str(value))


def optional(parse: Parser) -> Parser:
    return lambda value: None if value is None else parse(value)


def one_of(value: object, allowed: tuple[str, ...], what: str, where: str = "") -> str:
    if isinstance(value, str) and value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    message = f"{show_value(value)} is not {what}; use one of {', '.join(allowed)}{guess}"
    raise Invalid(message, shown=True, where=where)


def features(value: object) -> tuple[Feature, ...]:
    if not isinstance(value, list):
        raise Invalid("is not a list; use one like [skip_block_zeroing], or [] for none")
    features: list[Feature] = []
    for index, item in enumerate(value):
        if item == "read_only":
            message = "'read_only' is not allowed: a read-only pool cannot allocate, so cannot grow"
            raise Invalid(message, shown=True, where=f"[{index}]")
        if one_of(item, FEATURES, "a thin-pool feature", f"[{index}]") in features:
            raise Invalid(f"{item!r} is listed twice; list it once", shown=True, where=f"[{index}]")
        features.append(Feature(item))
    return tuple(features)
