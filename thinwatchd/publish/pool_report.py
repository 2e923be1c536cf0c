"""Pool status reports from live kernel state: the `status` command's table and JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from thinwatchd.base.errors import ThinwatchError
from thinwatchd.base.human import format_bytes, format_duration
from thinwatchd.base.units import Bytes, DataBlocks
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import DeviceMapperApi, FileInfo
from thinwatchd.kernel.fs import Files
from thinwatchd.policy.forecast import worth_reclaiming
from thinwatchd.publish.estimates import Estimate
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status
from thinwatchd.thin.table import ThinPoolLine, thin_pool_target

__all__ = ["PoolReport", "format_table", "pool_report", "with_estimate"]


@dataclass(frozen=True)
class PoolReport:
    """One pool as the kernel sees it now (sizes in bytes)."""

    name: str
    active: bool
    mode: str
    data_used: Bytes | None = None
    data_total: Bytes | None = None
    metadata_used: Bytes | None = None
    metadata_total: Bytes | None = None
    data_percent: float | None = None
    metadata_percent: float | None = None
    low_water_mark_blocks: DataBlocks | None = None
    no_space_policy: str | None = None
    needs_check: bool | None = None
    data_file: str = ""
    data_file_size: Bytes | None = None
    data_file_allocated: Bytes | None = None  # what the file takes on disk (st_blocks)
    reclaimable: Bytes | None = None  # allocated beyond the data in use: what discards give back
    backing_fs_free: Bytes | None = None
    # From the running daemon (estimates.py); None when it measured none, or none is known.
    estimated: bool = False  # the daemon's estimates were read for this pool
    fill_rate_bytes_per_second: float | None = None
    seconds_to_cap: float | None = None
    seconds_to_backing_fs_reserve: float | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def pool_report(dm: DeviceMapperApi, settings: PoolSettings) -> PoolReport:
    """Return the live report for one configured pool; never raises for a pool-level problem."""
    data_file: FileInfo | None = None
    free: Bytes | None = None
    try:
        files, path = Files(), str(settings.data_file)
        data_file = files.inspect(path, follow=True)
        free = files.space(path).free
    except ThinwatchError:
        pass
    size, allocated = (None, None) if data_file is None else (data_file.size, data_file.allocated)
    base = PoolReport(
        name=settings.name,
        active=False,
        mode="absent",
        data_file=str(settings.data_file),
        data_file_size=size,
        data_file_allocated=allocated,
        backing_fs_free=free,
    )
    try:
        info = dm.info(settings.name)
        if info is None or not info.active_present:
            return base
        # noflush: no metadata commit (see Pool.read_status)
        target = thin_pool_target(dm.status(settings.name, noflush=True))
        line = ThinPoolLine.from_targets(dm.table(settings.name))
        if target is None or line is None:
            return replace(base, active=True, mode="not-a-thin-pool")
        status = parse_pool_status(target.params)
        params = line.table
    except ThinwatchError as exc:
        return replace(base, mode="unknown", error=str(exc))
    if not isinstance(status, ThinPoolWorkingStatus):
        return replace(base, active=True, mode=status.mode.value)
    block = params.data_block_size
    used = status.usage_bytes(block).data_used
    # A preallocated file is meant to be allocated whole: nothing there is to give back.
    reclaimable = None if allocated is None or settings.preallocate else allocated - used
    return replace(
        base,
        reclaimable=None if reclaimable is None else Bytes(max(0, reclaimable)),
        active=True,
        mode="suspended" if info.suspended else status.mode.value,
        **status.usage_bytes(block)._asdict(),
        data_percent=round(status.data_percent, 2),
        metadata_percent=round(status.meta_percent, 2),
        low_water_mark_blocks=params.low_water_mark,
        no_space_policy=status.no_space_policy.value,
        needs_check=status.needs_check,
    )


def with_estimate(report: PoolReport, estimate: Estimate | None) -> PoolReport:
    """Return report with the daemon's estimate for its pool (None: the daemon has none)."""
    if estimate is None:
        return report
    return replace(
        report,
        estimated=True,
        fill_rate_bytes_per_second=estimate.fill_rate_bytes_per_second,
        seconds_to_cap=estimate.seconds_to_cap,
        seconds_to_backing_fs_reserve=estimate.seconds_to_backing_fs_reserve,
    )


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _until(r: PoolReport, seconds: float | None) -> str:
    """'?' without the daemon's estimates; '-' when it sees nothing filling (or no cap)."""
    if not r.estimated:
        return "?"
    return "-" if seconds is None else format_duration(seconds)


def format_table(reports: list[PoolReport], estimates_from: str | None = None) -> str:
    """Return an lvs-like table, one line per pool; estimates_from names where the daemon's
    estimates would be, for the line that explains a '?'."""
    rows = [
        (
            "POOL",
            "SIZE",
            "DATA%",
            "META%",
            "MODE",
            "FILE",
            "ALLOCATED",
            "FS FREE",
            "CAP IN",
            "FS FULL IN",
        )
    ]
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
                _size(r.data_file_allocated),
                _size(r.backing_fs_free),
                _until(r, r.seconds_to_cap),
                _until(r, r.seconds_to_backing_fs_reserve),
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
        elif _worth_reclaiming(r):
            lines.append(
                f"{r.name}: {_size(r.reclaimable)} of {r.data_file} is allocated beyond the "
                f"{_size(r.data_used)} in use; fstrim the filesystems on its thin volumes (for "
                "containerd's devmapper snapshotter: discard_blocks = true) to give it back"
            )
    if estimates_from is not None and any(r.active and not r.estimated for r in reports):
        lines.append(
            f"?: no estimate from a running thinwatchd (none fresh in {estimates_from}); "
            "CAP IN and FS FULL IN need its measured fill rate"
        )
    return "\n".join(lines)


def _worth_reclaiming(r: PoolReport) -> bool:
    if r.reclaimable is None or r.data_file_allocated is None or r.data_used is None:
        return False
    return worth_reclaiming(r.data_file_allocated, r.data_used)
