"""What one pool publishes each pass: its figures, for the metrics, estimates and advisories."""

from __future__ import annotations

from dataclasses import dataclass

from thinwatchd.base.units import Bytes, Sectors
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.policy.forecast import FullIn
from thinwatchd.thin.status import ThinPoolStatus

__all__ = ["PoolMetrics"]


@dataclass(frozen=True)
class PoolMetrics:
    """One pool's figures at one moment."""

    name: str
    block_size: Sectors
    status: ThinPoolStatus | None
    growths_data: int
    growths_metadata: int
    failures: int
    last_growth_seconds: float | None
    backing_fs_free_bytes: Bytes | None
    data_file_allocated_bytes: Bytes | None = None
    data_max_bytes: Bytes | None = None  # pools.<name>.data.max_size (None: no cap)
    refused: tuple[GrowthTarget, ...] = ()  # whose growth is refused now
    fill_rate: float | None = None  # data bytes/s, as last measured
    backing_fs: int | None = None  # st_dev of the data file's filesystem, as last looked at
    backing_fs_fill_rate: float | None = None  # bytes/s, every pool on that filesystem together
    full_in: FullIn | None = None  # when the cap and the filesystem's reserve are reached
