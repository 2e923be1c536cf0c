"""The pure parts of bench/peers.py: kernel-log parsing, stalls, percentiles, room taken and the
tables."""

from __future__ import annotations

import pytest

from bench.peers import parse_args, parse_workload, schedule
from bench.peers_report import (
    aggregate,
    dd_bytes,
    event_to_grown,
    for_pool,
    growths,
    longest_stall,
    out_of_space_episodes,
    percentile,
    pool_tag,
    regroup,
    report,
    room,
    room_table,
    table,
    unanswered_event,
)

M = 1 << 20

TAG = pool_tag(253, 4)
LOG = [
    (10.0, "device-mapper: thin: 253:4: reached low water mark for data device: sending event."),
    (10.5, "device-mapper: thin: 253:7: reached low water mark for data device: sending event."),
    (11.0, "device-mapper: thin: 253:4: switching pool to out-of-data-space (queue IO) mode"),
    (11.2, "device-mapper: thin: 253:4: growing the data device from 1024 to 3072 blocks"),
    (11.2, "device-mapper: thin: 253:4: switching pool to write mode"),
    (20.0, "device-mapper: thin: 253:4: reached low water mark for data device: sending event."),
    (20.05, "device-mapper: thin: 253:4: growing the data device from 3072 to 5120 blocks"),
]


def test_for_pool_keeps_only_that_pools_lines() -> None:
    assert len(for_pool(LOG, TAG)) == 6
    assert for_pool(LOG, pool_tag(253, 7)) == [LOG[1]]


def test_event_to_grown_pairs_each_event_with_the_next_growth() -> None:
    assert event_to_grown(for_pool(LOG, TAG)) == pytest.approx([1.2, 0.05])
    assert growths(for_pool(LOG, TAG)) == 2


def test_event_without_growth_gives_nothing() -> None:
    assert event_to_grown(for_pool(LOG, pool_tag(253, 7))) == []


def test_out_of_space_episode_ends_at_the_switch_back() -> None:
    ((start, seconds),) = out_of_space_episodes(for_pool(LOG, TAG))
    assert start == 11.0
    assert seconds == pytest.approx(0.2)


def test_queue_then_error_io_is_one_episode_that_never_ends() -> None:
    fixed = [
        (5.0, "253:9: switching pool to out-of-data-space (queue IO) mode"),
        (65.0, "253:9: switching pool to out-of-data-space (error IO) mode"),
    ]
    assert out_of_space_episodes(fixed) == [(5.0, None)]


def test_two_episodes() -> None:
    log = [
        (1.0, "253:4: switching pool to out-of-data-space (queue IO) mode"),
        (2.0, "253:4: switching pool to write mode"),
        (3.0, "253:4: switching pool to out-of-data-space (queue IO) mode"),
        (3.5, "253:4: switching pool to write mode"),
    ]
    assert out_of_space_episodes(log) == [(1.0, 1.0), (3.0, 0.5)]


def test_longest_stall_between_progress_changes() -> None:
    samples = [(0.0, 0), (0.05, 1), (0.1, 1), (0.15, 1), (0.9, 2), (0.95, 3)]
    assert longest_stall(samples, end=1.0) == pytest.approx(0.85)


def test_longest_stall_counts_a_writer_stuck_until_it_fails() -> None:
    samples = [(0.0, 0), (0.1, 5), (0.2, 5), (30.0, 5)]
    assert longest_stall(samples, end=61.0) == pytest.approx(60.9)


def test_longest_stall_starts_at_the_first_write() -> None:
    samples = [(0.0, 0), (0.1, 0), (2.0, 0), (2.05, 4), (2.1, 8)]
    assert longest_stall(samples, end=2.2) == pytest.approx(0.1)


def test_a_writer_that_never_wrote_stalled_throughout() -> None:
    assert longest_stall([(0.0, 0), (0.05, 0)], end=61.0) == pytest.approx(61.0)


def test_longest_stall_of_nothing_is_zero() -> None:
    assert longest_stall([], end=3.0) == 0.0


def test_dd_bytes_reads_the_last_summary() -> None:
    stderr = (
        "dd: error writing '/dev/mapper/x': No space left on device\n"
        "64+0 records in\n63+0 records out\n66060288 bytes (66 MB, 63 MiB) copied, 61 s\n"
    )
    assert dd_bytes(stderr) == 66060288
    assert dd_bytes("nothing") is None


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([0.3], 90) == 0.3
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([float(x) for x in range(11)], 90) == pytest.approx(9.0)


def test_parse_workload() -> None:
    assert parse_workload("dd600") == ("dd", 600)
    assert parse_workload("ext4") == ("ext4", 0)
    for bad in ("dd", "dd0", "xfs", "ddx"):
        with pytest.raises(SystemExit):
            parse_workload(bad)


def cell(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "writer_s": 10.0,
        "writer_exit": 0,
        "out_of_space": [],
        "growths": 0,
        "event_to_grown_s": [],
        "longest_stall_s": 0.1,
        "pool_data_bytes": 1024 << 20,
        "backing_size": 1024 << 20,
        "backing_allocated": 600 << 20,
        "used_rest_bytes": 0,
        "room_rest_bytes": 2 * M,
        "used_at_peak_bytes": 600 * M,
        "room_peak_bytes": 610 * M,
        "used_end_bytes": 600 * M,
        "room_end_bytes": 610 * M,
    }
    base.update(kw)
    return base


def test_table_rows_ratios_and_failures() -> None:
    result = {
        "cells": {
            "dd600": {
                "presized": cell(),
                "lvm2": cell(
                    writer_s=30.0,
                    growths=7,
                    event_to_grown_s=[1.4, 1.6],
                    out_of_space=[(1.0, 0.5), (5.0, 1.0)],
                ),
                "docker-fixed": cell(
                    writer_s=61.0,
                    writer_exit=1,
                    out_of_space=[(1.0, None)],
                    writer_says="No space left on device",
                    written_bytes=63 << 20,
                ),
            }
        }
    }
    lines = table(result).splitlines()
    assert len(lines) == 5
    assert lines[2].startswith("| dd600 | presized | 0 | 10.0 | 1.00 | 0 | - / - |")
    assert lines[2].endswith("| 1,024 | 600 | 2 / 610 / 610 | 1.02 | ok |")
    assert "| **2** (1.5 s) | 30.0 | 3.00 | 7 | 1,500 / 1,580 |" in lines[3]
    fixed = lines[4]
    assert "**1** (never left)" in fixed
    assert "| 6.10 |" not in fixed  # no ratio for a writer that failed
    assert "**No space left on device** after 61.0 s, 63 MiB written" in fixed


def test_table_without_presized_has_no_ratio() -> None:
    text = table({"cells": {"ext4": {"thinwatchd": cell()}}})
    assert "| ext4 | thinwatchd | 0 | 10.0 | - |" in text


def test_unanswered_event() -> None:
    records = for_pool(LOG, TAG)
    assert not unanswered_event(records)
    assert unanswered_event(records[:-1])
    assert not unanswered_event([])


def test_aggregate_rounds() -> None:
    rounds = [
        {
            **cell(writer_s=10.0, growths=3, event_to_grown_s=[0.1], out_of_space=[(1.0, 0.2)]),
            "series": {"t": [0.0]},
        },
        {**cell(writer_s=14.0, growths=5, event_to_grown_s=[0.3]), "series": {"t": [1.0]}},
    ]
    agg = aggregate(rounds)
    assert agg["writer_s"] == 12.0
    assert agg["writer_range_s"] == (10.0, 14.0)
    assert agg["writer_exit"] == 0
    assert agg["growths"] == 4
    assert agg["event_to_grown_s"] == [0.1, 0.3]
    assert agg["out_of_space"] == [(1.0, 0.2)]
    assert agg["series"] == {"t": [0.0]}
    assert "| 12.0 (10.0-14.0) |" in table({"cells": {"dd600": {"presized": agg}}})


def test_aggregate_keeps_a_failure_and_an_error() -> None:
    failed = cell(
        writer_s=61.0, writer_exit=1, writer_says="No space left on device", written_bytes=64 << 20
    )
    agg = aggregate([failed, {"error": "RuntimeError('x')"}])
    assert agg["writer_exit"] == 1
    assert agg["writer_s"] == 61.0
    assert agg["writer_says"] == "No space left on device"
    assert agg["errors"] == ["RuntimeError('x')"]
    assert "error" not in agg
    assert aggregate([{"error": "boom"}])["error"] == "boom"


def test_schedule_reverses_every_other_round_and_runs_docker_fixed_once_at_the_end() -> None:
    args = parse_args(
        ["--systems", "presized,docker-fixed,lvm2", "--workloads", "dd600,ext4", "--rounds", "2"]
    )
    assert schedule(args) == [
        (0, "dd600", "presized"),
        (0, "dd600", "lvm2"),
        (0, "ext4", "presized"),
        (0, "ext4", "lvm2"),
        (1, "dd600", "lvm2"),
        (1, "dd600", "presized"),
        (1, "ext4", "lvm2"),
        (1, "ext4", "presized"),
        (0, "dd600", "docker-fixed"),
        (0, "ext4", "docker-fixed"),
    ]


def test_cells_group_runs_in_first_round_order() -> None:
    runs = [
        {"workload": "dd600", "system": "b", **cell(writer_s=1.0)},
        {"workload": "dd600", "system": "a", **cell(writer_s=2.0)},
        {"workload": "dd600", "system": "b", **cell(writer_s=3.0)},
    ]
    grouped = regroup(runs)
    assert list(grouped["dd600"]) == ["b", "a"]
    assert grouped["dd600"]["b"]["writer_s"] == 2.0


def test_room_at_rest_at_the_peak_and_at_the_end() -> None:
    rest = (0.0, 64 * M, 0, 1200 * M)
    series = [(0.1, 64 * M, 10 * M, 1200 * M), (5.0, 2000 * M, 900 * M, 2200 * M)]
    end = (9.0, 2000 * M, 600 * M, 2100 * M)  # a discard gave some back
    assert room(rest, series, end) == {
        "used_rest_bytes": 0,
        "room_rest_bytes": 1200 * M,
        "used_at_peak_bytes": 900 * M,
        "room_peak_bytes": 2200 * M,
        "used_end_bytes": 600 * M,
        "room_end_bytes": 2100 * M,
    }


def test_room_peak_counts_the_end_and_not_the_rest() -> None:
    rest = (0.0, 64 * M, 0, 500 * M)  # before the writer: not its peak
    end = (3.0, 64 * M, 40 * M, 45 * M)
    got = room(rest, [], end)
    assert (got["room_peak_bytes"], got["used_at_peak_bytes"]) == (45 * M, 40 * M)
    assert room(rest, [(1.0, 64 * M, 30 * M, 35 * M)], end)["room_peak_bytes"] == 45 * M


def test_aggregate_takes_the_median_room() -> None:
    agg = aggregate(
        [cell(room_end_bytes=600 * M), cell(room_end_bytes=700 * M), cell(room_end_bytes=800 * M)]
    )
    assert agg["room_end_bytes"] == 700 * M
    assert agg["room_rest_bytes"] == 2 * M


def test_table_of_a_run_without_room_figures_shows_dashes() -> None:
    old = {k: v for k, v in cell().items() if "rest" not in k and "peak" not in k}
    del old["used_end_bytes"], old["room_end_bytes"]
    text = table({"cells": {"dd600": {"lvm2": aggregate([old])}}})
    assert text.splitlines()[2].endswith("| 1,024 | - | - / - / - | - | ok |")
    assert room_table({"cells": {"dd600": {"lvm2": aggregate([old])}}}) == ""


def test_room_table_says_how_much_more_than_lvm2() -> None:
    result = {
        "cells": {
            "dd600": {
                "thinwatchd": cell(
                    room_rest_bytes=1216 * M, room_peak_bytes=1817 * M, room_end_bytes=1817 * M
                ),
                "lvm2": cell(
                    room_rest_bytes=16 * M, room_peak_bytes=617 * M, room_end_bytes=617 * M
                ),
            },
            "ext4": {"thinwatchd": cell()},  # no lvm2 cell: no row
        }
    }
    lines = room_table(result).splitlines()
    assert lines[0].startswith("| workload | system | room taken MiB: rest / peak / end |")
    assert len(lines) == 4
    assert lines[2] == (
        "| dd600 | thinwatchd | 1,216 / 1,817 / 1,817 | 1,200 / 1,200 / 1,200 | 2.94 / 2.94 |"
    )
    assert lines[3] == "| dd600 | lvm2 | 16 / 617 / 617 | 0 / 0 / 0 | 1.00 / 1.00 |"
    assert report(result) == table(result) + "\n\n" + room_table(result)


def test_report_without_lvm2_is_the_table() -> None:
    result = {"cells": {"dd600": {"presized": cell()}}}
    assert report(result) == table(result)
