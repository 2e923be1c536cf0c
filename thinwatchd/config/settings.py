"""The validated configuration as frozen dataclasses (parsed from YAML by ``load.py``).

Every size is in bytes, every duration in seconds, every percentage a float in [0, 100].
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from thinwatchd.base.units import Bytes, DataBlocks, Sectors, sectors_to_bytes
from thinwatchd.kernel.names import PoolName
from thinwatchd.thin.table import Feature

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DaemonSettings",
    "DataGrowth",
    "MetadataGrowth",
    "NoSpaceSettings",
    "PoolSettings",
    "Settings",
]

DEFAULT_CONFIG_PATH = Path("/etc/thinwatchd/config.yaml")

GiB = 1024**3
MiB = 1024**2

#: The kernel's usable metadata maximum: 255 * (2**14 - 64) * 8 sectors (dm-thin-metadata.h
#: THIN_METADATA_MAX_SECTORS), just under 15.9 GiB. A bigger metadata device wastes the excess.
METADATA_MAX_BYTES = sectors_to_bytes(Sectors(255 * (2**14 - 64) * 8))


@dataclass(frozen=True)
class DataGrowth:
    """How the data file grows (``pools.<name>.data``)."""

    threshold_percent: float = 80.0  # also act when data usage reaches this
    step: Bytes = Bytes(1 * GiB)  # grow by at least this...
    step_percent: float = 20.0  # ...or this share of the current size, whichever is larger
    max_size: Bytes | None = None  # never grow the file past this (None: only the fs limits)
    adaptive_low_water: bool = True  # raise the mark from the measured fill rate and growth time
    # With adaptive_low_water: the mark also holds a killed daemon's absence at the fill rate.
    crash_room: bool = True


@dataclass(frozen=True)
class MetadataGrowth:
    """How the metadata file grows (``pools.<name>.metadata``)."""

    threshold_percent: float = 75.0
    step: Bytes = Bytes(256 * MiB)
    step_percent: float = 50.0
    max_size: Bytes = METADATA_MAX_BYTES


@dataclass(frozen=True)
class NoSpaceSettings:
    """What happens when a pool cannot grow any more (``pools.<name>.when_full``)."""

    # After this many seconds without room to grow, switch the pool to error_if_no_space so
    # writers get ENOSPC instead of hanging; None keeps queueing (the kernel default).
    error_after: float | None = 60.0


@dataclass(frozen=True)
class PoolSettings:
    """One pool (``pools.<name>``). Docker 0.7's loopback pool, made for a pool that grows:
    its block size and features, but files that start small and are allocated, not sparse
    (README: "Defaults")."""

    name: PoolName  # validated: load.py makes it with kernel.names.pool_name_problem
    data_file: Path
    metadata_file: Path
    data_size: Bytes = Bytes(1 * GiB)  # initial size of a new data file
    metadata_size: Bytes = Bytes(128 * MiB)  # initial size of a new metadata file
    data_block_size: Sectors = Sectors(128)  # table.valid_block_size says what the kernel takes
    low_water_mark: DataBlocks = DataBlocks(4096)  # the floor of the adaptive mark
    features: tuple[Feature, ...] = (Feature.SKIP_BLOCK_ZEROING,)
    preallocate: bool = True  # fallocate new data space instead of leaving it sparse
    direct_io: bool = True  # loop devices bypass the page cache (cheap flushes, no double cache)
    reserve: Bytes = Bytes(1 * GiB)  # keep this much free on the backing filesystem
    reserve_percent: float = 0.0  # ...or this share of it, whichever is larger
    data: DataGrowth = field(default_factory=DataGrowth)
    metadata: MetadataGrowth = field(default_factory=MetadataGrowth)
    when_full: NoSpaceSettings = field(default_factory=NoSpaceSettings)

    def allocates(self, *, metadata: bool) -> bool:
        """Whether new space in that file is allocated (fallocate) rather than left sparse.

        Always for metadata: a metadata write that meets a full filesystem fails, and dm-thin
        then puts the pool read-only with needs_check, to be repaired offline.
        """
        return metadata or self.preallocate


#: Pool settings a reload cannot change on a running pool.
FIXED_KEYS = ("data_file", "metadata_file", "data_block_size")


def keep_fixed(running: PoolSettings, wanted: PoolSettings) -> tuple[PoolSettings, list[str]]:
    """Return wanted with the FIXED_KEYS of the running pool, and those that wanted changed."""
    changed = [k for k in FIXED_KEYS if getattr(running, k) != getattr(wanted, k)]
    return replace(wanted, **{k: getattr(running, k) for k in FIXED_KEYS}), changed


@dataclass(frozen=True)
class DaemonSettings:
    """Daemon-wide settings (``daemon``)."""

    check_interval: float = 10.0  # seconds between safety re-checks of every pool
    metrics_file: Path | None = None  # Prometheus textfile; None disables
    log_level: str = "info"  # debug | info | warning | error
    # Warn (once) when a pool is predicted to meet its cap or its filesystem's reserve within
    # this many seconds at the measured fill rates; 0: never.
    warn_full_within: float = 3600.0


@dataclass(frozen=True)
class Settings:
    """The whole configuration file."""

    daemon: DaemonSettings
    pools: tuple[PoolSettings, ...]
