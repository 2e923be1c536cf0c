"""The status table: what the data file takes on disk, and when to say how to give it back."""

from __future__ import annotations

from thinwatchd.report import RECLAIM_HINT_BYTES, PoolReport, format_table

GiB = 1024**3


def report(used: int, allocated: int) -> PoolReport:
    return PoolReport(
        "docker-pool", True, "rw", data_used=used, data_total=100 * GiB, data_percent=1.0,
        metadata_percent=1.0, data_file="/var/lib/thinwatchd/data", data_file_size=100 * GiB,
        data_file_allocated=allocated, reclaimable=max(0, allocated - used),
        backing_fs_free=50 * GiB,
    )  # fmt: skip


def test_the_table_shows_what_the_data_file_takes_on_disk() -> None:
    header, row = format_table([report(2 * GiB, 2 * GiB)]).splitlines()
    assert header.split() == [
        "POOL", "SIZE", "DATA%", "META%", "MODE", "FILE", "ALLOCATED", "FS", "FREE"
    ]  # fmt: skip
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
