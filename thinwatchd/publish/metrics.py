"""Prometheus metrics for node_exporter's textfile collector, written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from thinwatchd.base.units import Bytes
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.publish.figures import PoolMetrics
from thinwatchd.thin.status import PoolMode, ThinPoolWorkingStatus, UsageBytes

__all__ = ["METRICS", "Metric", "Sample", "render", "write_atomically"]

#: One sample of a pool's: its labels after pool="..." (name, value), and its value.
Sample = tuple[tuple[tuple[str, str], ...], float]


@dataclass(frozen=True)
class Metric:
    """One metric: its name, type and help, and its samples from one pool's figures (none when
    the pool lacks the figure: the metric is absent for it, not 0)."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    samples: Callable[[PoolMetrics], Iterable[Sample]]


def _one(value: Callable[[PoolMetrics], float | None]) -> Callable[[PoolMetrics], list[Sample]]:
    """Return the samples of a metric with one unlabelled sample, absent while value is None."""

    def samples(p: PoolMetrics) -> list[Sample]:
        v = value(p)
        return [] if v is None else [((), v)]

    return samples


def _usage(field: Callable[[UsageBytes], Bytes]) -> Callable[[PoolMetrics], list[Sample]]:
    """Return the samples of a usage figure, absent while the pool has no working status."""
    return _one(
        lambda p: (
            field(p.status.usage_bytes(p.block_size))
            if isinstance(p.status, ThinPoolWorkingStatus)
            else None
        )
    )


#: The modes thinwatchd_pool_mode has a series for: ERROR is a status read that failed, not a
#: mode (such a pool shows 0 in every series).
_MODES = tuple(m.value for m in PoolMode if m is not PoolMode.ERROR)


def _modes(p: PoolMetrics) -> list[Sample]:
    mode = "unknown" if p.status is None else p.status.mode.value
    return [((("mode", m),), int(m == mode)) for m in _MODES]


def _growths(p: PoolMetrics) -> list[Sample]:
    return [
        ((("target", GrowthTarget.DATA),), p.growths_data),
        ((("target", GrowthTarget.METADATA),), p.growths_metadata),
    ]


def _refused(p: PoolMetrics) -> list[Sample]:
    return [((("target", t),), int(t in p.refused)) for t in GrowthTarget]


#: Every metric, in the order written (see render).
METRICS: tuple[Metric, ...] = (
    Metric(
        "thinwatchd_data_used_bytes", "gauge", "Pool data in use.", _usage(lambda u: u.data_used)
    ),
    Metric(
        "thinwatchd_data_total_bytes", "gauge", "Pool data size.", _usage(lambda u: u.data_total)
    ),
    Metric(
        "thinwatchd_metadata_used_bytes",
        "gauge",
        "Pool metadata in use.",
        _usage(lambda u: u.metadata_used),
    ),
    Metric(
        "thinwatchd_metadata_total_bytes",
        "gauge",
        "Pool metadata size.",
        _usage(lambda u: u.metadata_total),
    ),
    Metric(
        "thinwatchd_needs_check",
        "gauge",
        "1 if the pool needs thin_check.",
        _one(
            lambda p: (
                int(p.status.needs_check) if isinstance(p.status, ThinPoolWorkingStatus) else None
            )
        ),
    ),
    Metric("thinwatchd_pool_mode", "gauge", "1 for the pool's current mode.", _modes),
    Metric("thinwatchd_growths_total", "counter", "Completed growths.", _growths),
    Metric(
        "thinwatchd_growth_failures_total",
        "counter",
        "Failed growth attempts.",
        _one(lambda p: p.failures),
    ),
    Metric(
        "thinwatchd_last_growth_seconds",
        "gauge",
        "Duration of the last growth.",
        _one(lambda p: p.last_growth_seconds),
    ),
    Metric(
        "thinwatchd_data_max_bytes",
        "gauge",
        "The pool's cap (data.max_size): it never grows past this.",
        _one(lambda p: p.data_max_bytes),
    ),
    Metric(
        "thinwatchd_growth_refused",
        "gauge",
        "1 while growth is refused (cap reached, backing filesystem at its reserve, "
        "needs_check, read-only).",
        _refused,
    ),
    Metric(
        "thinwatchd_fill_rate_bytes_per_second",
        "gauge",
        "How fast the pool's data grew lately (the steepest of the last minute).",
        _one(lambda p: p.fill_rate),
    ),
    Metric(
        "thinwatchd_seconds_to_cap",
        "gauge",
        "Seconds until the pool's data reaches data.max_size at its fill rate.",
        _one(lambda p: None if p.full_in is None else p.full_in.cap),
    ),
    Metric(
        "thinwatchd_seconds_to_backing_fs_reserve",
        "gauge",
        "Seconds until the data file's filesystem reaches the pool's reserve, at the "
        "fill rates of every pool on it.",
        _one(lambda p: None if p.full_in is None else p.full_in.backing_fs),
    ),
    Metric(
        "thinwatchd_data_file_allocated_bytes",
        "gauge",
        "Bytes the data file takes on its filesystem; beyond thinwatchd_data_used_bytes, "
        "what discards (fstrim) would give back.",
        _one(lambda p: p.data_file_allocated_bytes),
    ),
    Metric(
        "thinwatchd_backing_fs_free_bytes",
        "gauge",
        "Free bytes on the data file's filesystem.",
        _one(lambda p: p.backing_fs_free_bytes),
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(pools: Iterable[PoolMetrics]) -> str:
    """Return the exposition text for all pools: each metric's HELP and TYPE once, then its
    samples pool by pool. Metrics come in the order they first have a sample (the table's,
    unless the first pools lack a figure that a later one has)."""
    written: dict[str, tuple[Metric, list[str]]] = {}
    for p in pools:
        pool = _escape(p.name)
        for metric in METRICS:
            for labels, value in metric.samples(p):
                extra = "".join(f',{k}="{_escape(v)}"' for k, v in labels)
                line = f'{metric.name}{{pool="{pool}"{extra}}} {_number(value)}'
                written.setdefault(metric.name, (metric, []))[1].append(line)
    lines: list[str] = []
    for metric, samples in written.values():
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
        lines += samples
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
