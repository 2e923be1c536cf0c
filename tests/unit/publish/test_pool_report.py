"""The status table: what the data file takes on disk, when to say how to give it back, and
the running daemon's time-to-full estimates."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import cast

from thinwatchd.base.units import Bytes
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import DeviceMapperApi
from thinwatchd.kernel.names import pool_name
from thinwatchd.policy.forecast import RECLAIM_HINT_BYTES
from thinwatchd.publish.estimates import Estimate
from thinwatchd.publish.pool_report import PoolReport, format_table, pool_report, with_estimate

GiB = 1024**3


def report(used: int, allocated: int) -> PoolReport:
    return PoolReport(
        "docker-pool",
        True,
        "rw",
        data_used=Bytes(used),
        data_total=Bytes(100 * GiB),
        data_percent=1.0,
        metadata_percent=1.0,
        data_file="/var/lib/thinwatchd/data",
        data_file_size=Bytes(100 * GiB),
        data_file_allocated=Bytes(allocated),
        reclaimable=Bytes(max(0, allocated - used)),
        backing_fs_free=Bytes(50 * GiB),
    )


def test_the_table_shows_what_the_data_file_takes_on_disk() -> None:
    header, row = format_table([report(2 * GiB, 2 * GiB)]).splitlines()
    assert header.split() == [
        "POOL",
        "SIZE",
        "DATA%",
        "META%",
        "MODE",
        "FILE",
        "ALLOCATED",
        "FS",
        "FREE",
        "CAP",
        "IN",
        "FS",
        "FULL",
        "IN",
    ]
    assert row.split()[6] == "2.0GiB"


def test_space_discards_would_give_back_is_pointed_out_when_large() -> None:
    lines = format_table([report(1 * GiB, 1 * GiB + RECLAIM_HINT_BYTES)]).splitlines()
    assert lines[-1] == (
        "docker-pool: 1.0GiB of /var/lib/thinwatchd/data is allocated beyond the 1.0GiB in use; "
        "fstrim the filesystems on its thin volumes (for containerd's devmapper snapshotter: "
        "discard_blocks = true) to give it back"
    )


def test_a_little_slack_is_not_worth_a_word() -> None:
    small = report(1 * GiB, 1 * GiB + RECLAIM_HINT_BYTES - 1)
    relative = report(20 * GiB, 20 * GiB + RECLAIM_HINT_BYTES)  # under a tenth of 21 GiB
    assert len(format_table([small, relative]).splitlines()) == 3


def test_the_daemons_estimates_are_shown_in_the_table_and_json() -> None:
    estimate = Estimate(
        fill_rate_bytes_per_second=50e6, seconds_to_cap=None, seconds_to_backing_fs_reserve=12_000
    )
    shown = with_estimate(report(2 * GiB, 2 * GiB), estimate)
    header, row = format_table([shown], "/run/thinwatchd/estimates.json").splitlines()
    cap_in, fs_full_in = header.index("CAP IN"), header.index("FS FULL IN")
    assert row[cap_in:fs_full_in].strip() == "-"  # no cap
    assert row[fs_full_in:] == "3 h 20 min"
    doc = shown.as_json()
    assert doc["fill_rate_bytes_per_second"] == 50e6
    assert doc["seconds_to_backing_fs_reserve"] == 12_000 and doc["seconds_to_cap"] is None


def test_without_a_running_daemon_the_estimates_are_unknown_and_the_table_says_why() -> None:
    lines = format_table([report(2 * GiB, 2 * GiB)], "/run/thinwatchd/estimates.json").splitlines()
    assert lines[1].split()[-2:] == ["?", "?"]
    assert lines[-1].startswith(
        "?: no estimate from a running thinwatchd (none fresh in /run/thinwatchd/estimates.json)"
    )
    assert report(2 * GiB, 2 * GiB).as_json()["estimated"] is False


def test_a_preallocated_file_has_nothing_to_give_back() -> None:
    """pool_report leaves reclaimable unset for a preallocated pool: no hint however much of
    its file is allocated beyond the data in use."""
    preallocated = dataclasses.replace(report(1 * GiB, 100 * GiB), reclaimable=None)
    assert len(format_table([preallocated]).splitlines()) == 2


class _NoDevices:
    """A device-mapper with no pool device: pool_report reads only the data file."""

    def info(self, name: str) -> None:
        return None


def test_the_data_file_is_measured_even_without_a_pool_device(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.write(b"x" * 65536)
        f.truncate(GiB)  # sparse beyond the first 64 KiB
    settings = PoolSettings(
        name=pool_name("pool"), data_file=data, metadata_file=tmp_path / "metadata"
    )
    report = pool_report(cast(DeviceMapperApi, _NoDevices()), settings)
    assert (report.active, report.mode, report.data_file_size) == (False, "absent", GiB)
    assert report.data_file_allocated == os.stat(data).st_blocks * 512
    assert 65536 <= (report.data_file_allocated or 0) < GiB
    assert report.backing_fs_free is not None and report.backing_fs_free > 0  # changes by itself

    data.unlink()
    gone = pool_report(cast(DeviceMapperApi, _NoDevices()), settings)
    assert (gone.data_file_size, gone.data_file_allocated, gone.backing_fs_free) == (None,) * 3
