"""Prometheus metrics for node_exporter's textfile collector, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from thinwatchd.base.units import Bytes, Sectors
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.policy.forecast import FullIn
from thinwatchd.thin.status import PoolMode, ThinPoolStatus, ThinPoolWorkingStatus

__all__ = ["PoolMetrics", "render", "write_atomically"]

#: The modes thinwatchd_pool_mode has a series for: ERROR is a status read that failed, not a
#: mode (such a pool shows 0 in every series).
_MODES = tuple(m.value for m in PoolMode if m is not PoolMode.ERROR)
_USAGE_HELP = {
    "data_used": "Pool data in use.",
    "data_total": "Pool data size.",
    "metadata_used": "Pool metadata in use.",
    "metadata_total": "Pool metadata size.",
}


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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(pools: Iterable[PoolMetrics]) -> str:
    """Return the exposition text for all pools (HELP and TYPE once per metric)."""
    rows: dict[str, tuple[str, str, list[str]]] = {}

    def add(metric: str, kind: str, help_text: str, pool: str, value: float, **labels: str) -> None:
        entry = rows.setdefault(metric, (kind, help_text, []))
        extra = "".join(f',{k}="{_escape(v)}"' for k, v in labels.items())
        text = str(value) if isinstance(value, int) else repr(float(value))
        entry[2].append(f'{metric}{{pool="{_escape(pool)}"{extra}}} {text}')

    for p in pools:
        st = p.status
        if isinstance(st, ThinPoolWorkingStatus):
            usage = st.usage_bytes(p.block_size)
            for field, help_text in _USAGE_HELP.items():
                add(f"thinwatchd_{field}_bytes", "gauge", help_text, p.name, getattr(usage, field))
            add(
                "thinwatchd_needs_check",
                "gauge",
                "1 if the pool needs thin_check.",
                p.name,
                int(st.needs_check),
            )
        mode = "unknown" if st is None else st.mode.value
        for m in _MODES:
            add(
                "thinwatchd_pool_mode",
                "gauge",
                "1 for the pool's current mode.",
                p.name,
                int(m == mode),
                mode=m,
            )
        for target, count in (
            (GrowthTarget.DATA, p.growths_data),
            (GrowthTarget.METADATA, p.growths_metadata),
        ):
            add(
                "thinwatchd_growths_total",
                "counter",
                "Completed growths.",
                p.name,
                count,
                target=target,
            )
        add(
            "thinwatchd_growth_failures_total",
            "counter",
            "Failed growth attempts.",
            p.name,
            p.failures,
        )
        if p.last_growth_seconds is not None:
            add(
                "thinwatchd_last_growth_seconds",
                "gauge",
                "Duration of the last growth.",
                p.name,
                p.last_growth_seconds,
            )
        if p.data_max_bytes is not None:
            add(
                "thinwatchd_data_max_bytes",
                "gauge",
                "The pool's cap (data.max_size): it never grows past this.",
                p.name,
                p.data_max_bytes,
            )
        for target in GrowthTarget:
            add(
                "thinwatchd_growth_refused",
                "gauge",
                "1 while growth is refused (cap reached, backing filesystem at its reserve, "
                "needs_check, read-only).",
                p.name,
                int(target in p.refused),
                target=target,
            )
        if p.fill_rate is not None:
            add(
                "thinwatchd_fill_rate_bytes_per_second",
                "gauge",
                "How fast the pool's data grew lately (the steepest of the last minute).",
                p.name,
                p.fill_rate,
            )
        for metric, seconds, help_text in (
            (
                "thinwatchd_seconds_to_cap",
                None if p.full_in is None else p.full_in.cap,
                "Seconds until the pool's data reaches data.max_size at its fill rate.",
            ),
            (
                "thinwatchd_seconds_to_backing_fs_reserve",
                None if p.full_in is None else p.full_in.backing_fs,
                "Seconds until the data file's filesystem reaches the pool's reserve, at the "
                "fill rates of every pool on it.",
            ),
        ):
            if seconds is not None:
                add(metric, "gauge", help_text, p.name, seconds)
        if p.data_file_allocated_bytes is not None:
            add(
                "thinwatchd_data_file_allocated_bytes",
                "gauge",
                "Bytes the data file takes on its filesystem; beyond thinwatchd_data_used_bytes, "
                "what discards (fstrim) would give back.",
                p.name,
                p.data_file_allocated_bytes,
            )
        if p.backing_fs_free_bytes is not None:
            add(
                "thinwatchd_backing_fs_free_bytes",
                "gauge",
                "Free bytes on the data file's filesystem.",
                p.name,
                p.backing_fs_free_bytes,
            )
    lines: list[str] = []
    for metric, (kind, help_text, samples) in rows.items():
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", *samples]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace path with text so that a reader never sees a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
