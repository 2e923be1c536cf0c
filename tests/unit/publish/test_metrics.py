"""The metrics file's text: one table row per metric, written pool by pool, names that the
alert rules (monitoring/) and dashboards rely on."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from thinwatchd.base.units import Bytes, Sectors
from thinwatchd.policy.decide import GrowthTarget
from thinwatchd.policy.forecast import FullIn
from thinwatchd.publish.figures import PoolMetrics
from thinwatchd.publish.metrics import METRICS, render
from thinwatchd.thin.status import ThinPoolErrored, ThinPoolStatus, parse_pool_status

RULES = Path(__file__).resolve().parents[3] / "monitoring" / "thinwatchd-alerts.yml"

#: Every metric thinwatchd has ever written: renaming one breaks alert rules and dashboards.
PUBLISHED = {
    "thinwatchd_data_used_bytes",
    "thinwatchd_data_total_bytes",
    "thinwatchd_metadata_used_bytes",
    "thinwatchd_metadata_total_bytes",
    "thinwatchd_needs_check",
    "thinwatchd_pool_mode",
    "thinwatchd_growths_total",
    "thinwatchd_growth_failures_total",
    "thinwatchd_last_growth_seconds",
    "thinwatchd_data_max_bytes",
    "thinwatchd_growth_refused",
    "thinwatchd_fill_rate_bytes_per_second",
    "thinwatchd_seconds_to_cap",
    "thinwatchd_seconds_to_backing_fs_reserve",
    "thinwatchd_data_file_allocated_bytes",
    "thinwatchd_backing_fs_free_bytes",
}


def figures(name: str, status: ThinPoolStatus | None, **changes: Any) -> PoolMetrics:
    bare = PoolMetrics(
        name=name,
        block_size=Sectors(128),
        status=status,
        growths_data=0,
        growths_metadata=0,
        failures=0,
        last_growth_seconds=None,
        backing_fs_free_bytes=None,
    )
    return dataclasses.replace(bare, **changes)


def test_every_row_has_a_unique_thinwatchd_name_a_type_and_help() -> None:
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    for m in METRICS:
        assert re.fullmatch(r"thinwatchd_[a-z_]+", m.name), m.name
        assert m.kind == "counter" if m.name.endswith("_total") else m.kind == "gauge"
        assert m.help and "\n" not in m.help and m.help.endswith("."), m.name


def test_every_metric_ever_written_is_still_written() -> None:
    assert {m.name for m in METRICS} == PUBLISHED


def test_the_alert_rules_use_only_metrics_in_the_table() -> None:
    exprs = " ".join(
        rule["expr"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    )
    used = set(re.findall(r"thinwatchd_[a-z_]+", exprs))
    assert used and used <= {m.name for m in METRICS}, used - PUBLISHED


def test_a_pool_with_every_figure_and_an_errored_one() -> None:
    status = parse_pool_status(
        "1 462/4096 9600/65536 - rw discard_passdown queue_if_no_space - 1024"
    )
    pools = [
        figures(
            "docker-pool",
            status,
            growths_data=3,
            growths_metadata=1,
            last_growth_seconds=0.25,
            backing_fs_free_bytes=Bytes(31137275904),
            data_file_allocated_bytes=Bytes(629149696),
            data_max_bytes=Bytes(16 * 1024**3),
            fill_rate=2097152.0,
            backing_fs=2049,
            backing_fs_fill_rate=2097152.0,
            full_in=FullIn(cap=7892.0, backing_fs=14000.5),
        ),
        figures(
            "builds",
            ThinPoolErrored(),
            failures=2,
            backing_fs_free_bytes=Bytes(0),
            refused=(GrowthTarget.DATA, GrowthTarget.METADATA),
        ),
    ]
    assert render(pools) == EXPECTED


# Backslash-newline continues a line (HELP lines are long).
EXPECTED = """\
# HELP thinwatchd_data_used_bytes Pool data in use.
# TYPE thinwatchd_data_used_bytes gauge
thinwatchd_data_used_bytes{pool="docker-pool"} 629145600
# HELP thinwatchd_data_total_bytes Pool data size.
# TYPE thinwatchd_data_total_bytes gauge
thinwatchd_data_total_bytes{pool="docker-pool"} 4294967296
# HELP thinwatchd_metadata_used_bytes Pool metadata in use.
# TYPE thinwatchd_metadata_used_bytes gauge
thinwatchd_metadata_used_bytes{pool="docker-pool"} 1892352
# HELP thinwatchd_metadata_total_bytes Pool metadata size.
# TYPE thinwatchd_metadata_total_bytes gauge
thinwatchd_metadata_total_bytes{pool="docker-pool"} 16777216
# HELP thinwatchd_needs_check 1 if the pool needs thin_check.
# TYPE thinwatchd_needs_check gauge
thinwatchd_needs_check{pool="docker-pool"} 0
# HELP thinwatchd_pool_mode 1 for the pool's current mode.
# TYPE thinwatchd_pool_mode gauge
thinwatchd_pool_mode{pool="docker-pool",mode="rw"} 1
thinwatchd_pool_mode{pool="docker-pool",mode="out_of_data_space"} 0
thinwatchd_pool_mode{pool="docker-pool",mode="ro"} 0
thinwatchd_pool_mode{pool="docker-pool",mode="Fail"} 0
thinwatchd_pool_mode{pool="builds",mode="rw"} 0
thinwatchd_pool_mode{pool="builds",mode="out_of_data_space"} 0
thinwatchd_pool_mode{pool="builds",mode="ro"} 0
thinwatchd_pool_mode{pool="builds",mode="Fail"} 0
# HELP thinwatchd_growths_total Completed growths.
# TYPE thinwatchd_growths_total counter
thinwatchd_growths_total{pool="docker-pool",target="data"} 3
thinwatchd_growths_total{pool="docker-pool",target="metadata"} 1
thinwatchd_growths_total{pool="builds",target="data"} 0
thinwatchd_growths_total{pool="builds",target="metadata"} 0
# HELP thinwatchd_growth_failures_total Failed growth attempts.
# TYPE thinwatchd_growth_failures_total counter
thinwatchd_growth_failures_total{pool="docker-pool"} 0
thinwatchd_growth_failures_total{pool="builds"} 2
# HELP thinwatchd_last_growth_seconds Duration of the last growth.
# TYPE thinwatchd_last_growth_seconds gauge
thinwatchd_last_growth_seconds{pool="docker-pool"} 0.25
# HELP thinwatchd_data_max_bytes The pool's cap (data.max_size): it never grows past this.
# TYPE thinwatchd_data_max_bytes gauge
thinwatchd_data_max_bytes{pool="docker-pool"} 17179869184
# HELP thinwatchd_growth_refused 1 while growth is refused (cap reached, backing filesystem \
at its reserve, needs_check, read-only).
# TYPE thinwatchd_growth_refused gauge
thinwatchd_growth_refused{pool="docker-pool",target="data"} 0
thinwatchd_growth_refused{pool="docker-pool",target="metadata"} 0
thinwatchd_growth_refused{pool="builds",target="data"} 1
thinwatchd_growth_refused{pool="builds",target="metadata"} 1
# HELP thinwatchd_fill_rate_bytes_per_second How fast the pool's data grew lately (the \
steepest of the last minute).
# TYPE thinwatchd_fill_rate_bytes_per_second gauge
thinwatchd_fill_rate_bytes_per_second{pool="docker-pool"} 2097152.0
# HELP thinwatchd_seconds_to_cap Seconds until the pool's data reaches data.max_size at its \
fill rate.
# TYPE thinwatchd_seconds_to_cap gauge
thinwatchd_seconds_to_cap{pool="docker-pool"} 7892.0
# HELP thinwatchd_seconds_to_backing_fs_reserve Seconds until the data file's filesystem \
reaches the pool's reserve, at the fill rates of every pool on it.
# TYPE thinwatchd_seconds_to_backing_fs_reserve gauge
thinwatchd_seconds_to_backing_fs_reserve{pool="docker-pool"} 14000.5
# HELP thinwatchd_data_file_allocated_bytes Bytes the data file takes on its filesystem; \
beyond thinwatchd_data_used_bytes, what discards (fstrim) would give back.
# TYPE thinwatchd_data_file_allocated_bytes gauge
thinwatchd_data_file_allocated_bytes{pool="docker-pool"} 629149696
# HELP thinwatchd_backing_fs_free_bytes Free bytes on the data file's filesystem.
# TYPE thinwatchd_backing_fs_free_bytes gauge
thinwatchd_backing_fs_free_bytes{pool="docker-pool"} 31137275904
thinwatchd_backing_fs_free_bytes{pool="builds"} 0
"""


def test_metrics_come_in_the_order_they_first_have_a_sample() -> None:
    """A pool with no status yet has no usage: a later pool's usage comes after the modes."""
    status = parse_pool_status("0 141/4096 0/1024 - rw discard_passdown queue_if_no_space - 1024")
    text = render([figures("new", None), figures("old", status)])
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    assert helps.index("thinwatchd_pool_mode") < helps.index("thinwatchd_data_used_bytes")
    assert len(helps) == len(set(helps))
    assert 'thinwatchd_pool_mode{pool="new",mode="rw"} 0' in text  # status unknown: 0 in each


def test_label_values_are_escaped() -> None:
    text = render([figures('a"b\\c\nd', None)])
    assert 'thinwatchd_growth_failures_total{pool="a\\"b\\\\c\\nd"} 0\n' in text


def test_no_pools_no_metrics() -> None:
    assert render([]) == "\n"
