"""Typed thin-pool status lines, parsed exactly as drivers/md/dm-thin.c prints them.

Status (pool_status, STATUSTYPE_INFO), one line::

    <transaction id> <used meta>/<total meta> <used data>/<total data> <held root|->
    <rw|out_of_data_space|ro> <ignore_discard|discard_passdown|no_discard_passdown>
    <queue_if_no_space|error_if_no_space> <needs_check|-> <metadata low watermark>

or just ``Fail`` (pool in fail mode) or ``Error`` (reading the metadata failed). The kernel ends the
line with a space; parsing splits on whitespace. Metadata counts are 4 KiB blocks, data counts are
pool blocks. ``ro`` covers both PM_READ_ONLY and PM_OUT_OF_METADATA_SPACE; the latter shows as
used == total metadata because the reported free count already excludes the kernel's reserve.
The table lines are table.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, NamedTuple, TypeVar

from thinwatchd.base.errors import StatusParseError
from thinwatchd.base.units import (
    Bytes,
    DataBlocks,
    MetaBlocks,
    Sectors,
    data_blocks_to_bytes,
    meta_blocks_to_bytes,
)

__all__ = [
    "DiscardMode",
    "NoSpacePolicy",
    "PoolMode",
    "ThinPoolErrored",
    "ThinPoolFailed",
    "ThinPoolStatus",
    "ThinPoolWorkingStatus",
    "UsageBytes",
    "parse_pool_status",
    "parse_uint",
]


class PoolMode(StrEnum):
    """The pool mode field; FAIL and ERROR stand for the whole-line ``Fail`` and ``Error``."""

    WRITE = "rw"
    OUT_OF_DATA_SPACE = "out_of_data_space"
    READ_ONLY = "ro"  # PM_READ_ONLY or PM_OUT_OF_METADATA_SPACE
    FAIL = "Fail"
    ERROR = "Error"  # not a mode the pool is in: its metadata could not be read for the status


class DiscardMode(StrEnum):
    """The discard field of the status."""

    PASSDOWN = "discard_passdown"
    NO_PASSDOWN = "no_discard_passdown"
    IGNORE = "ignore_discard"


class NoSpacePolicy(StrEnum):
    """What the pool does with writes when out of data space."""

    QUEUE = "queue_if_no_space"
    ERROR = "error_if_no_space"  # the status word is the feature's name


class UsageBytes(NamedTuple):
    """A pool's data and metadata usage in bytes (the one place blocks become bytes)."""

    data_used: Bytes
    data_total: Bytes
    metadata_used: Bytes
    metadata_total: Bytes


def _percent(used: int, total: int) -> float:
    """Return used of total in percent; 100 for an empty device: there is no room."""
    return 100.0 * used / total if total else 100.0


@dataclass(frozen=True)
class ThinPoolWorkingStatus:
    """A pool status line with all its fields."""

    transaction_id: int
    meta_used: MetaBlocks
    meta_total: MetaBlocks
    data_used: DataBlocks
    data_total: DataBlocks
    held_root: int | None  # metadata snapshot root block, None for '-'
    mode: PoolMode
    discard: DiscardMode
    no_space_policy: NoSpacePolicy
    needs_check: bool
    metadata_low_watermark: MetaBlocks | None  # None on kernels that do not print it

    @property
    def data_free(self) -> DataBlocks:
        """Return the free data blocks."""
        return DataBlocks(self.data_total - self.data_used)

    @property
    def data_percent(self) -> float:
        """Return data usage in percent."""
        return _percent(self.data_used, self.data_total)

    @property
    def meta_free(self) -> MetaBlocks:
        """Return the free metadata blocks, as the kernel counts them (reserve excluded)."""
        return MetaBlocks(self.meta_total - self.meta_used)

    @property
    def meta_percent(self) -> float:
        """Return metadata usage in percent."""
        return _percent(self.meta_used, self.meta_total)

    def usage_bytes(self, block_size: Sectors) -> UsageBytes:
        """Return usage in bytes for a pool of data blocks of block_size sectors."""
        return UsageBytes(
            data_blocks_to_bytes(self.data_used, block_size),
            data_blocks_to_bytes(self.data_total, block_size),
            meta_blocks_to_bytes(self.meta_used),
            meta_blocks_to_bytes(self.meta_total),
        )

    @property
    def out_of_metadata_space(self) -> bool:
        """Return whether this 'ro' is PM_OUT_OF_METADATA_SPACE (growing metadata fixes it)."""
        return self.mode is PoolMode.READ_ONLY and self.meta_free <= 0

    def __str__(self) -> str:
        fields = [
            str(self.transaction_id),
            f"{self.meta_used}/{self.meta_total}",
            f"{self.data_used}/{self.data_total}",
            "-" if self.held_root is None else str(self.held_root),
            self.mode.value,
            self.discard.value,
            self.no_space_policy.value,
            "needs_check" if self.needs_check else "-",
        ]
        if self.metadata_low_watermark is not None:
            fields.append(str(self.metadata_low_watermark))
        return " ".join(fields)


@dataclass(frozen=True)
class ThinPoolFailed:
    """The pool (or thin volume) status ``Fail``: the pool is in fail mode and needs repair."""

    mode: ClassVar[PoolMode] = PoolMode.FAIL

    def __str__(self) -> str:
        return "Fail"


@dataclass(frozen=True)
class ThinPoolErrored:
    """The status ``Error``: the kernel could not read the pool metadata for the status."""

    mode: ClassVar[PoolMode] = PoolMode.ERROR

    def __str__(self) -> str:
        return "Error"


ThinPoolStatus = ThinPoolWorkingStatus | ThinPoolFailed | ThinPoolErrored

_E = TypeVar("_E", bound=StrEnum)

_STATUS_FIELDS = (
    "transaction_id",
    "metadata usage",
    "data usage",
    "held_root",
    "mode",
    "discard",
    "no_space_policy",
    "needs_check",
    "metadata_low_watermark",
)


def parse_uint(field: str, index: int, value: str, line: str) -> int:
    """Return a %llu token of line as an int; raise StatusParseError naming field and index."""
    # The kernel prints %llu: plain decimal digits, nothing else.
    if not value.isascii() or not value.isdigit():
        raise StatusParseError(field, index, value, line)
    return int(value)


def _ratio(field: str, index: int, value: str, line: str) -> tuple[int, int]:
    used, sep, total = value.partition("/")
    if not sep:
        raise StatusParseError(field, index, value, line)
    if not (used.isascii() and used.isdigit() and total.isascii() and total.isdigit()):
        raise StatusParseError(field, index, value, line)
    a, b = int(used), int(total)
    if a > b:
        raise StatusParseError(field, index, value, line)
    return a, b


def _enum(kind: type[_E], field: str, index: int, value: str, line: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise StatusParseError(field, index, value, line) from None


def parse_pool_status(text: str) -> ThinPoolStatus:
    """Return the typed form of a thin-pool INFO status line.

    Raise StatusParseError naming the field, the token index and the token when a token is
    unknown, malformed, missing or extra.
    """
    tokens = text.split()
    if tokens == ["Fail"]:
        return ThinPoolFailed()
    if tokens == ["Error"]:
        return ThinPoolErrored()

    def token(index: int) -> str:
        if index < len(tokens):
            return tokens[index]
        raise StatusParseError(_STATUS_FIELDS[index], index, "", text)

    names = _STATUS_FIELDS
    tid = parse_uint(names[0], 0, token(0), text)
    meta_used, meta_total = _ratio(names[1], 1, token(1), text)
    data_used, data_total = _ratio(names[2], 2, token(2), text)
    held = None if token(3) == "-" else parse_uint(names[3], 3, tokens[3], text)
    mode = _enum(PoolMode, names[4], 4, token(4), text)
    if mode in (PoolMode.FAIL, PoolMode.ERROR):  # whole lines, never a field
        raise StatusParseError(names[4], 4, tokens[4], text)
    discard = _enum(DiscardMode, names[5], 5, token(5), text)
    no_space = _enum(NoSpacePolicy, names[6], 6, token(6), text)
    if token(7) not in ("needs_check", "-"):
        raise StatusParseError(names[7], 7, tokens[7], text)
    # Kernels before 4.19 end here; newer ones add the metadata low watermark, then nothing.
    watermark = parse_uint(names[8], 8, tokens[8], text) if len(tokens) > 8 else None
    if len(tokens) > 9:
        raise StatusParseError("end of line", 9, tokens[9], text)
    return ThinPoolWorkingStatus(
        transaction_id=tid,
        meta_used=MetaBlocks(meta_used),
        meta_total=MetaBlocks(meta_total),
        data_used=DataBlocks(data_used),
        data_total=DataBlocks(data_total),
        held_root=held,
        mode=mode,
        discard=discard,
        no_space_policy=no_space,
        needs_check=tokens[7] == "needs_check",
        metadata_low_watermark=None if watermark is None else MetaBlocks(watermark),
    )
