"""Typed thin-pool status and table lines, parsed exactly as drivers/md/dm-thin.c prints them.

Status (pool_status, STATUSTYPE_INFO), one line::

    <transaction id> <used meta>/<total meta> <used data>/<total data> <held root|->
    <rw|out_of_data_space|ro> <ignore_discard|discard_passdown|no_discard_passdown>
    <queue_if_no_space|error_if_no_space> <needs_check|-> <metadata low watermark>

or just ``Fail`` (pool in fail mode) or ``Error`` (reading the metadata failed). The kernel ends the
line with a space; parsing splits on whitespace. Metadata counts are 4 KiB blocks, data counts are
pool blocks. ``ro`` covers both PM_READ_ONLY and PM_OUT_OF_METADATA_SPACE; the latter shows as
used == total metadata because the reported free count already excludes the kernel's reserve.

Table (STATUSTYPE_TABLE) params: ``<meta maj:min> <data maj:min> <block sectors> <low water blocks>
<n> [features...]``. The kernel always prints the count (``0`` too), devices as major:minor and the
features it was given in its own fixed order (emit_flags), with a trailing space.
"""

from __future__ import annotations

import os as _os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import ClassVar, NamedTuple, TypeVar

from thinwatchd.errors import StatusParseError
from thinwatchd.kernel.api import Target
from thinwatchd.units import META_BLOCK_BYTES, DataBlocks, MetaBlocks

__all__ = [
    "MAX_BLOCK_SECTORS",
    "MAX_FEATURE_ARGS",
    "MIN_BLOCK_SECTORS",
    "THIN_POOL",
    "DiscardMode",
    "Feature",
    "NoSpacePolicy",
    "PoolMode",
    "ThinPoolErrored",
    "ThinPoolFailed",
    "ThinPoolLine",
    "ThinPoolStatus",
    "ThinPoolTable",
    "ThinPoolWorkingStatus",
    "UsageBytes",
    "device_number",
    "parse_pool_status",
    "parse_pool_table",
    "table_differences",
    "thin_pool_target",
    "valid_block_size",
]

#: The target type of a pool's table line.
THIN_POOL = "thin-pool"
#: parse_pool_features() reads the count through dm_arg {0, 4}: more is rejected at load.
MAX_FEATURE_ARGS = 4
#: pool_ctr(): DATA_DEV_BLOCK_SIZE_MIN_SECTORS / _MAX_SECTORS; a multiple of the minimum.
MIN_BLOCK_SECTORS = 128
MAX_BLOCK_SECTORS = 2097152


def valid_block_size(sectors: int) -> bool:
    """Return True if pool_ctr() takes a data block size of this many sectors."""
    return MIN_BLOCK_SECTORS <= sectors <= MAX_BLOCK_SECTORS and sectors % MIN_BLOCK_SECTORS == 0


class Feature(StrEnum):
    """The thin-pool table's feature args, in the order emit_flags() prints them (a reloaded
    table reads back in this order)."""

    SKIP_BLOCK_ZEROING = "skip_block_zeroing"
    IGNORE_DISCARD = "ignore_discard"
    NO_DISCARD_PASSDOWN = "no_discard_passdown"
    READ_ONLY = "read_only"
    ERROR_IF_NO_SPACE = "error_if_no_space"


_FEATURE_NAMES = frozenset(f.value for f in Feature)


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

    data_used: int
    data_total: int
    metadata_used: int
    metadata_total: int


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
        """Return data usage in percent (100 for an empty pool: there is no room)."""
        return 100.0 * self.data_used / self.data_total if self.data_total else 100.0

    @property
    def meta_free(self) -> MetaBlocks:
        """Return the free metadata blocks, as the kernel counts them (reserve excluded)."""
        return MetaBlocks(self.meta_total - self.meta_used)

    @property
    def meta_percent(self) -> float:
        """Return metadata usage in percent."""
        return 100.0 * self.meta_used / self.meta_total if self.meta_total else 100.0

    def usage_bytes(self, data_block_bytes: int) -> UsageBytes:
        """Return usage in bytes for a pool of data_block_bytes blocks (metadata: 4 KiB)."""
        return UsageBytes(
            self.data_used * data_block_bytes,
            self.data_total * data_block_bytes,
            self.meta_used * META_BLOCK_BYTES,
            self.meta_total * META_BLOCK_BYTES,
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


def _uint(field: str, index: int, value: str, line: str) -> int:
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
    tid = _uint(names[0], 0, token(0), text)
    meta_used, meta_total = _ratio(names[1], 1, token(1), text)
    data_used, data_total = _ratio(names[2], 2, token(2), text)
    held = None if token(3) == "-" else _uint(names[3], 3, tokens[3], text)
    mode = _enum(PoolMode, names[4], 4, token(4), text)
    if mode in (PoolMode.FAIL, PoolMode.ERROR):  # whole lines, never a field
        raise StatusParseError(names[4], 4, tokens[4], text)
    discard = _enum(DiscardMode, names[5], 5, token(5), text)
    no_space = _enum(NoSpacePolicy, names[6], 6, token(6), text)
    if token(7) not in ("needs_check", "-"):
        raise StatusParseError(names[7], 7, tokens[7], text)
    # Kernels before 4.19 end here; newer ones add the metadata low watermark, then nothing.
    watermark = _uint(names[8], 8, tokens[8], text) if len(tokens) > 8 else None
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


def device_number(rdev: int) -> str:
    """Return a device number as the kernel prints it in tables ('major:minor')."""
    return f"{_os.major(rdev)}:{_os.minor(rdev)}"


@dataclass(frozen=True)
class ThinPoolTable:
    """The thin-pool target's parameters (everything after ``<start> <length> thin-pool``).

    Devices are strings as given to or printed by the kernel: a path or 'major:minor'.
    Raise ValueError on a block size or feature list the kernel would refuse to load.
    """

    metadata_dev: str
    data_dev: str
    data_block_size: int  # sectors
    low_water_mark: int  # data blocks
    features: tuple[Feature, ...] = ()

    def __post_init__(self) -> None:
        bs = self.data_block_size
        if not valid_block_size(bs):
            raise ValueError(
                f"data_block_size {bs} is not a multiple of {MIN_BLOCK_SECTORS} in "
                f"{MIN_BLOCK_SECTORS}..{MAX_BLOCK_SECTORS}"
            )
        if self.low_water_mark < 0:
            raise ValueError(f"low_water_mark {self.low_water_mark} is negative")
        unknown = [f for f in self.features if f not in _FEATURE_NAMES]
        if unknown:
            raise ValueError(f"unknown thin-pool feature {unknown[0]!r}")
        # Members, also when given as the words (as a caller or the kernel's text has them).
        object.__setattr__(self, "features", tuple(Feature(f) for f in self.features))
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"duplicate thin-pool feature in {self.features}")
        if len(self.features) > MAX_FEATURE_ARGS:
            raise ValueError(f"the kernel takes at most {MAX_FEATURE_ARGS} feature arguments")
        for dev in (self.metadata_dev, self.data_dev):
            if not dev or any(c.isspace() for c in dev):
                raise ValueError(f"bad device {dev!r}")

    @property
    def data_block_bytes(self) -> int:
        """Return the data block size in bytes."""
        return self.data_block_size * 512

    @property
    def no_space_policy(self) -> NoSpacePolicy:
        """Return the no-space policy this table asks for."""
        if Feature.ERROR_IF_NO_SPACE in self.features:
            return NoSpacePolicy.ERROR
        return NoSpacePolicy.QUEUE

    def params(self) -> str:
        """Return the table params line; the feature count is always written, as the kernel does."""
        parts = [self.metadata_dev, self.data_dev, str(self.data_block_size)]
        parts += [str(self.low_water_mark), str(len(self.features)), *self.features]
        return " ".join(parts)

    def __str__(self) -> str:
        return self.params()

    def canonical(self) -> ThinPoolTable:
        """Return this table with its features in the order the kernel prints them."""
        return replace(self, features=tuple(f for f in Feature if f in self.features))

    def with_low_water_mark(self, blocks: int) -> ThinPoolTable:
        """Return this table with another low-water mark (data blocks)."""
        return replace(self, low_water_mark=blocks)

    def with_no_space_policy(self, policy: NoSpacePolicy) -> ThinPoolTable:
        """Return this table with error_if_no_space added or removed."""
        rest: tuple[Feature, ...] = tuple(
            f for f in self.features if f is not Feature.ERROR_IF_NO_SPACE
        )
        if policy is NoSpacePolicy.ERROR:
            rest += (Feature.ERROR_IF_NO_SPACE,)
        return replace(self, features=rest).canonical()


def parse_pool_table(params: str) -> ThinPoolTable:
    """Return the table from thin-pool params, as loaded or as the kernel prints them back.

    Features are matched case-insensitively (the kernel uses strcasecmp) and kept lower-case in
    the given order. Raise StatusParseError naming the token on anything the kernel would refuse.
    """
    tokens = params.split()
    names = ("metadata_dev", "data_dev", "data_block_size", "low_water_mark", "feature count")
    if len(tokens) < 4:
        raise StatusParseError(names[len(tokens)], len(tokens), "", params)
    bs = _uint(names[2], 2, tokens[2], params)
    if not valid_block_size(bs):
        raise StatusParseError(names[2], 2, tokens[2], params)
    lwm = _uint(names[3], 3, tokens[3], params)
    features: list[Feature] = []
    if len(tokens) > 4:
        count = _uint(names[4], 4, tokens[4], params)
        if count > MAX_FEATURE_ARGS or len(tokens) < 5 + count:
            raise StatusParseError(names[4], 4, tokens[4], params)
        if len(tokens) > 5 + count:
            raise StatusParseError("end of line", 5 + count, tokens[5 + count], params)
        for index in range(5, 5 + count):
            name = tokens[index].lower()
            if name not in _FEATURE_NAMES or name in features:
                raise StatusParseError("feature", index, tokens[index], params)
            features.append(Feature(name))
    if tokens[0] == tokens[1]:  # pool_ctr refuses the same device twice
        raise StatusParseError(names[1], 1, tokens[1], params)
    return ThinPoolTable(tokens[0], tokens[1], bs, lwm, tuple(features))


def thin_pool_target(targets: Sequence[Target]) -> Target | None:
    """Return the one thin-pool line, from sector 0, of a pool device's table or status; None
    if the device holds anything else (an operator's dmsetup reload, another tool's device)."""
    if len(targets) == 1 and targets[0].target_type == THIN_POOL and targets[0].start == 0:
        return targets[0]
    return None


@dataclass(frozen=True)
class ThinPoolLine:
    """A pool device's whole table: one thin-pool target of length sectors from sector 0."""

    length: int  # sectors
    table: ThinPoolTable

    @classmethod
    def from_targets(cls, targets: Sequence[Target]) -> ThinPoolLine | None:
        """Return the line a table holds (parsed: StatusParseError), None if not a pool's."""
        target = thin_pool_target(targets)
        return None if target is None else cls(target.length, parse_pool_table(target.params))

    def to_target(self) -> Target:
        """Return the line to load."""
        return Target(0, self.length, THIN_POOL, self.table.params())


def _device_key(dev: str) -> tuple[int, int] | str:
    major, sep, minor = dev.partition(":")
    if sep and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    return dev


def table_differences(actual: ThinPoolTable, wanted: ThinPoolTable) -> frozenset[str]:
    """Return the names of the fields in which two tables really differ.

    Feature order does not count; 'major:minor' devices compare by number ('7:03' is '7:3'),
    anything else verbatim, so resolve paths to device numbers (device_number) first.
    """
    diffs = set()
    for name in ("metadata_dev", "data_dev"):
        if _device_key(getattr(actual, name)) != _device_key(getattr(wanted, name)):
            diffs.add(name)
    if actual.data_block_size != wanted.data_block_size:
        diffs.add("data_block_size")
    if actual.low_water_mark != wanted.low_water_mark:
        diffs.add("low_water_mark")
    if set(actual.features) != set(wanted.features):
        diffs.add("features")
    return frozenset(diffs)
