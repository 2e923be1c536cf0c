"""Pool status reports from live kernel state: the `status` command's table and JSON."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from thinwatchd.errors import ThinwatchError
from thinwatchd.kernel.api import DeviceMapperApi
from thinwatchd.kernel.fs import Files
from thinwatchd.settings import PoolSettings
from thinwatchd.status import ThinPoolWorkingStatus, parse_pool_status, parse_pool_table
from thinwatchd.units import SECTOR_BYTES, format_bytes

__all__ = ["PoolReport", "format_table", "pool_report"]


@dataclass(frozen=True)
class PoolReport:
    """One pool as the kernel sees it now (sizes in bytes)."""

    name: str
    active: bool
    mode: str
    data_used: int | None = None
    data_total: int | None = None
    metadata_used: int | None = None
    metadata_total: int | None = None
    data_percent: float | None = None
    metadata_percent: float | None = None
    low_water_mark_blocks: int | None = None
    no_space_policy: str | None = None
    needs_check: bool | None = None
    data_file: str = ""
    data_file_size: int | None = None
    backing_fs_free: int | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def pool_report(dm: DeviceMapperApi, settings: PoolSettings) -> PoolReport:
    """Return the live report for one configured pool; never raises for a pool-level problem."""
    size: int | None = None
    free: int | None = None
    try:
        size = os.stat(settings.data_file).st_size
        free = Files().space(str(settings.data_file)).free
    except (OSError, ThinwatchError):
        pass
    base = PoolReport(
        settings.name, False, "absent", data_file=str(settings.data_file),
        data_file_size=size, backing_fs_free=free,
    )  # fmt: skip
    try:
        info = dm.info(settings.name)
        if info is None or not info.active_present:
            return base
        targets = dm.status(settings.name, noflush=True)  # no commit: see Pool.read_status
        table = dm.table(settings.name)
        if len(targets) != 1 or targets[0].target_type != "thin-pool":
            return replace(base, active=True, mode="not-a-thin-pool")
        status = parse_pool_status(targets[0].params)
        params = parse_pool_table(table[0].params)
    except ThinwatchError as exc:
        return replace(base, mode="unknown", error=str(exc))
    if not isinstance(status, ThinPoolWorkingStatus):
        return replace(base, active=True, mode=str(status))
    block = params.data_block_size * SECTOR_BYTES
    return replace(
        base,
        active=True,
        mode="suspended" if info.suspended else status.mode.value,
        **status.usage_bytes(block)._asdict(),
        data_percent=round(status.data_percent, 2),
        metadata_percent=round(status.meta_percent, 2),
        low_water_mark_blocks=params.low_water_mark,
        no_space_policy=status.no_space_policy.value,
        needs_check=status.needs_check,
    )


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(reports: list[PoolReport]) -> str:
    """Return an lvs-like table, one line per pool."""
    rows = [("POOL", "SIZE", "DATA%", "META%", "MODE", "FILE", "FS FREE")]
    for r in reports:
        mode = r.mode + (",needs_check" if r.needs_check else "")
        rows.append(
            (
                r.name,
                _size(r.data_total),
                _pct(r.data_percent),
                _pct(r.metadata_percent),
                mode,
                _size(r.data_file_size),
                _size(r.backing_fs_free),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for r in reports:
        if r.error:
            lines.append(f"{r.name}: {r.error}")
    return "\n".join(lines)
