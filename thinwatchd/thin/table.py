"""Typed thin-pool table lines (the target's constructor arguments), as the kernel loads them and
prints them back.

Table (STATUSTYPE_TABLE) params: ``<meta maj:min> <data maj:min> <block sectors> <low water blocks>
<n> [features...]``. The kernel always prints the count (``0`` too), devices as major:minor and the
features it was given in its own fixed order (emit_flags), with a trailing space.
"""

from __future__ import annotations

import os as _os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from thinwatchd.base.errors import StatusParseError
from thinwatchd.base.units import DataBlocks, Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.thin.status import NoSpacePolicy, parse_uint

__all__ = [
    "MAX_BLOCK_SECTORS",
    "MAX_FEATURE_ARGS",
    "MIN_BLOCK_SECTORS",
    "THIN_POOL",
    "Feature",
    "ThinPoolLine",
    "ThinPoolTable",
    "device_number",
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
MIN_BLOCK_SECTORS = Sectors(128)
MAX_BLOCK_SECTORS = Sectors(2097152)


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
    data_block_size: Sectors
    low_water_mark: DataBlocks
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

    def with_low_water_mark(self, blocks: DataBlocks) -> ThinPoolTable:
        """Return this table with another low-water mark."""
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
    bs = parse_uint(names[2], 2, tokens[2], params)
    if not valid_block_size(bs):
        raise StatusParseError(names[2], 2, tokens[2], params)
    lwm = parse_uint(names[3], 3, tokens[3], params)
    features: list[Feature] = []
    if len(tokens) > 4:
        count = parse_uint(names[4], 4, tokens[4], params)
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
    return ThinPoolTable(tokens[0], tokens[1], Sectors(bs), DataBlocks(lwm), tuple(features))


def thin_pool_target(targets: Sequence[Target]) -> Target | None:
    """Return the one thin-pool line, from sector 0, of a pool device's table or status; None
    if the device holds anything else (an operator's dmsetup reload, another tool's device)."""
    if len(targets) == 1 and targets[0].target_type == THIN_POOL and targets[0].start == 0:
        return targets[0]
    return None


@dataclass(frozen=True)
class ThinPoolLine:
    """A pool device's whole table: one thin-pool target of length sectors from sector 0."""

    length: Sectors
    table: ThinPoolTable

    @classmethod
    def from_targets(cls, targets: Sequence[Target]) -> ThinPoolLine | None:
        """Return the line a table holds (parsed: StatusParseError), None if not a pool's."""
        target = thin_pool_target(targets)
        return None if target is None else cls(target.length, parse_pool_table(target.params))

    def to_target(self) -> Target:
        """Return the line to load."""
        return Target(Sectors(0), self.length, THIN_POOL, self.table.params())


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
