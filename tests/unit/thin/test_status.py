"""Parsing thin-pool status and table lines as drivers/md/dm-thin.c prints them."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from thinwatchd.base.errors import StatusParseError
from thinwatchd.base.units import DataBlocks, MetaBlocks, Sectors
from thinwatchd.kernel.api import Target
from thinwatchd.thin.status import (
    DiscardMode,
    NoSpacePolicy,
    PoolMode,
    ThinPoolErrored,
    ThinPoolFailed,
    ThinPoolWorkingStatus,
    parse_pool_status,
)
from thinwatchd.thin.table import (
    Feature,
    ThinPoolLine,
    ThinPoolTable,
    device_number,
    parse_pool_table,
    table_differences,
    thin_pool_target,
)

# Lines in the exact shape pool_status() emits them, trailing space included.
FRESH = "0 141/524288 0/1024 - rw discard_passdown queue_if_no_space - 1024 "


def test_fresh_pool() -> None:
    s = parse_pool_status(FRESH)
    assert s == ThinPoolWorkingStatus(
        transaction_id=0,
        meta_used=MetaBlocks(141),
        meta_total=MetaBlocks(524288),
        data_used=DataBlocks(0),
        data_total=DataBlocks(1024),
        held_root=None,
        mode=PoolMode.WRITE,
        discard=DiscardMode.PASSDOWN,
        no_space_policy=NoSpacePolicy.QUEUE,
        needs_check=False,
        metadata_low_watermark=MetaBlocks(1024),
    )
    assert (s.data_free, s.data_percent, s.meta_free) == (1024, 0.0, 524288 - 141)
    assert s.meta_percent == pytest.approx(100 * 141 / 524288)
    assert str(s) == FRESH.strip()


@pytest.mark.parametrize(
    ("line", "check"),
    [
        (
            "3 300/4096 1024/1024 250 out_of_data_space ignore_discard queue_if_no_space - 1024 ",
            {"mode": PoolMode.OUT_OF_DATA_SPACE, "held_root": 250, "discard": DiscardMode.IGNORE},
        ),
        (
            "5 2000/4096 100/1024 - ro no_discard_passdown error_if_no_space needs_check 1024 ",
            {"mode": PoolMode.READ_ONLY, "needs_check": True, "discard": DiscardMode.NO_PASSDOWN},
        ),
        (
            "7 4096/4096 500/1024 - ro discard_passdown queue_if_no_space - 1024 ",
            {"mode": PoolMode.READ_ONLY, "out_of_metadata_space": True},
        ),
        (
            "2 10/64 0/16 - rw discard_passdown error_if_no_space - 16 ",
            {"no_space_policy": NoSpacePolicy.ERROR, "metadata_low_watermark": 16},
        ),
        (  # kernels before 4.19: no metadata_low_watermark
            "1 10/4096 0/16 - rw discard_passdown queue_if_no_space -",
            {"metadata_low_watermark": None, "out_of_metadata_space": False},
        ),
    ],
)
def test_status_fields(line: str, check: dict[str, object]) -> None:
    s = parse_pool_status(line)
    assert isinstance(s, ThinPoolWorkingStatus)
    for name, value in check.items():
        assert getattr(s, name) == value, name
    assert parse_pool_status(str(s)) == s


@pytest.mark.parametrize("line", ["Fail", "Fail ", "  Fail\n"])
def test_fail_line(line: str) -> None:
    s = parse_pool_status(line)
    assert s == ThinPoolFailed()
    assert str(s) == "Fail"
    assert s.mode is PoolMode.FAIL


def test_error_line() -> None:
    assert parse_pool_status("Error") == ThinPoolErrored()
    assert str(ThinPoolErrored()) == "Error" and ThinPoolErrored().mode is PoolMode.ERROR


def test_empty_data_pool_counts_as_full() -> None:
    s = parse_pool_status("0 1/16 0/0 - rw discard_passdown queue_if_no_space - 4")
    assert isinstance(s, ThinPoolWorkingStatus)
    assert s.data_percent == 100.0


@pytest.mark.parametrize(
    ("line", "field", "index", "value"),
    [
        ("", "transaction_id", 0, ""),
        ("x 1/2 1/2 - rw discard_passdown queue_if_no_space - 4", "transaction_id", 0, "x"),
        ("-1 1/2 1/2 - rw discard_passdown queue_if_no_space - 4", "transaction_id", 0, "-1"),
        ("1 12 1/2 - rw discard_passdown queue_if_no_space - 4", "metadata usage", 1, "12"),
        ("1 3/2 1/2 - rw discard_passdown queue_if_no_space - 4", "metadata usage", 1, "3/2"),
        ("1 1/2 1/x - rw discard_passdown queue_if_no_space - 4", "data usage", 2, "1/x"),
        ("1 1/2 1/2 0x1 rw discard_passdown queue_if_no_space - 4", "held_root", 3, "0x1"),
        ("1 1/2 1/2 - RW discard_passdown queue_if_no_space - 4", "mode", 4, "RW"),
        ("1 1/2 1/2 - Fail discard_passdown queue_if_no_space - 4", "mode", 4, "Fail"),
        ("1 1/2 1/2 - rw discard queue_if_no_space - 4", "discard", 5, "discard"),
        ("1 1/2 1/2 - rw discard_passdown queue - 4", "no_space_policy", 6, "queue"),
        ("1 1/2 1/2 - rw discard_passdown queue_if_no_space check 4", "needs_check", 7, "check"),
        (
            "1 1/2 1/2 - rw discard_passdown queue_if_no_space - 4.5",
            "metadata_low_watermark",
            8,
            "4.5",
        ),
        ("1 1/2 1/2 - rw discard_passdown queue_if_no_space - 4 x", "end of line", 9, "x"),
        ("1 1/2 1/2 - rw discard_passdown", "no_space_policy", 6, ""),
        ("Fail Fail", "transaction_id", 0, "Fail"),
    ],
)
def test_bad_status_names_the_token(line: str, field: str, index: int, value: str) -> None:
    with pytest.raises(StatusParseError) as info:
        parse_pool_status(line)
    assert (info.value.field, info.value.index, info.value.value) == (field, index, value)
    assert info.value.line == line
    assert repr(value) in str(info.value)


uints = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def working_statuses(draw: st.DrawFn) -> ThinPoolWorkingStatus:
    meta_total, data_total = draw(uints), draw(uints)
    return ThinPoolWorkingStatus(
        transaction_id=draw(uints),
        meta_used=MetaBlocks(draw(st.integers(0, meta_total))),
        meta_total=MetaBlocks(meta_total),
        data_used=DataBlocks(draw(st.integers(0, data_total))),
        data_total=DataBlocks(data_total),
        held_root=draw(st.none() | uints),
        # FAIL and ERROR are whole lines, never the mode field of a working status
        mode=draw(
            st.sampled_from([PoolMode.WRITE, PoolMode.OUT_OF_DATA_SPACE, PoolMode.READ_ONLY])
        ),
        discard=draw(st.sampled_from(DiscardMode)),
        no_space_policy=draw(st.sampled_from(NoSpacePolicy)),
        needs_check=draw(st.booleans()),
        metadata_low_watermark=draw(st.none() | uints.map(MetaBlocks)),
    )


@given(working_statuses())
def test_status_round_trips(s: ThinPoolWorkingStatus) -> None:
    assert parse_pool_status(str(s)) == s
    assert parse_pool_status(str(s) + " \n") == s  # the kernel's trailing space


@given(working_statuses(), st.data())
def test_any_bad_token_is_named(s: ThinPoolWorkingStatus, data: st.DataObject) -> None:
    tokens = str(s).split()
    index = data.draw(st.integers(0, len(tokens) - 1))
    tokens[index] = data.draw(st.sampled_from(["bogus", "1/", "+1", "\u0661"]))
    with pytest.raises(StatusParseError) as info:
        parse_pool_status(" ".join(tokens))
    assert info.value.index == index
    assert info.value.value == tokens[index]


# --- tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # What the kernel prints back: devices as major:minor, the count always, a trailing space.
        (
            "253:0 253:1 128 32768 1 skip_block_zeroing ",
            ThinPoolTable(
                "253:0", "253:1", Sectors(128), DataBlocks(32768), (Feature.SKIP_BLOCK_ZEROING,)
            ),
        ),
        ("7:0 7:1 128 32768 0 ", ThinPoolTable("7:0", "7:1", Sectors(128), DataBlocks(32768))),
        # What we may load: paths, no feature count, any case.
        (
            "/dev/loop0 /dev/loop1 256 10",
            ThinPoolTable("/dev/loop0", "/dev/loop1", Sectors(256), DataBlocks(10)),
        ),
        (
            "7:0 7:1 2097152 0 2 Error_If_No_Space SKIP_BLOCK_ZEROING",
            ThinPoolTable(
                "7:0",
                "7:1",
                Sectors(2097152),
                DataBlocks(0),
                (Feature.ERROR_IF_NO_SPACE, Feature.SKIP_BLOCK_ZEROING),
            ),
        ),
    ],
)
def test_parse_table(params: str, expected: ThinPoolTable) -> None:
    assert parse_pool_table(params) == expected


def test_params_always_write_the_count() -> None:
    t = ThinPoolTable("7:0", "7:1", Sectors(128), DataBlocks(32768))
    assert t.params() == str(t) == "7:0 7:1 128 32768 0"
    t = ThinPoolTable(
        "7:0",
        "7:1",
        Sectors(128),
        DataBlocks(5),
        (Feature.IGNORE_DISCARD, Feature.SKIP_BLOCK_ZEROING),
    )
    assert t.params() == "7:0 7:1 128 5 2 ignore_discard skip_block_zeroing"


@pytest.mark.parametrize(
    ("params", "field", "index", "value"),
    [
        ("7:0 7:1 128", "low_water_mark", 3, ""),
        ("7:0 7:1 64 10", "data_block_size", 2, "64"),
        ("7:0 7:1 200 10", "data_block_size", 2, "200"),
        ("7:0 7:1 4194304 10", "data_block_size", 2, "4194304"),
        ("7:0 7:1 128 -1", "low_water_mark", 3, "-1"),
        ("7:0 7:1 128 10 x", "feature count", 4, "x"),
        ("7:0 7:1 128 10 2 skip_block_zeroing", "feature count", 4, "2"),
        ("7:0 7:1 128 10 5 a b c d e", "feature count", 4, "5"),
        ("7:0 7:1 128 10 1 zero_blocks", "feature", 5, "zero_blocks"),
        ("7:0 7:1 128 10 2 read_only READ_ONLY", "feature", 6, "READ_ONLY"),
        ("7:0 7:1 128 10 1 read_only extra", "end of line", 6, "extra"),
        ("7:0 7:0 128 10", "data_dev", 1, "7:0"),
    ],
)
def test_bad_table_names_the_token(params: str, field: str, index: int, value: str) -> None:
    with pytest.raises(StatusParseError) as info:
        parse_pool_table(params)
    assert (info.value.field, info.value.index, info.value.value) == (field, index, value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data_block_size": 100},
        {"low_water_mark": -1},
        {"features": ("frobnicate",)},
        {"features": ("read_only", "read_only")},
        {"features": tuple(Feature)},  # five: the kernel takes at most four
        {"metadata_dev": ""},
        {"data_dev": "/dev/loop 1"},
    ],
)
def test_table_refuses_what_the_kernel_would(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "metadata_dev": "7:0",
        "data_dev": "7:1",
        "data_block_size": 128,
        "low_water_mark": 0,
    }
    with pytest.raises(ValueError):
        ThinPoolTable(**(fields | kwargs))  # type: ignore[arg-type]


def test_table_helpers() -> None:
    t = ThinPoolTable(
        "7:0",
        "7:1",
        Sectors(128),
        DataBlocks(32768),
        (Feature.ERROR_IF_NO_SPACE, Feature.SKIP_BLOCK_ZEROING),
    )
    assert t.canonical().features == ("skip_block_zeroing", "error_if_no_space")
    assert t.no_space_policy is NoSpacePolicy.ERROR
    queued = t.with_no_space_policy(NoSpacePolicy.QUEUE)
    assert queued.features == ("skip_block_zeroing",)
    assert queued.no_space_policy is NoSpacePolicy.QUEUE
    assert queued.with_no_space_policy(NoSpacePolicy.ERROR) == t.canonical()
    assert t.with_low_water_mark(DataBlocks(7)).low_water_mark == 7


def test_table_differences() -> None:
    wanted = ThinPoolTable(
        "7:0",
        "7:1",
        Sectors(128),
        DataBlocks(32768),
        (Feature.ERROR_IF_NO_SPACE, Feature.SKIP_BLOCK_ZEROING),
    )
    printed = parse_pool_table("7:00 7:1 128 32768 2 skip_block_zeroing error_if_no_space ")
    assert table_differences(printed, wanted) == frozenset()
    other = ThinPoolTable("/dev/loop0", "7:2", Sectors(256), DataBlocks(1), ())
    assert table_differences(other, wanted) == {
        "metadata_dev",
        "data_dev",
        "data_block_size",
        "low_water_mark",
        "features",
    }


def test_device_number() -> None:
    assert device_number(os.makedev(7, 3)) == "7:3"
    assert device_number(os.makedev(259, 1048575)) == "259:1048575"


@st.composite
def tables(draw: st.DrawFn) -> ThinPoolTable:
    devs = st.tuples(st.integers(0, 4095), st.integers(0, 2**20 - 1)).map(
        lambda d: f"{d[0]}:{d[1]}"
    )
    meta, data = draw(devs), draw(devs)
    if meta == data:
        data = "/dev/loop-data"
    features = draw(st.permutations(list(Feature)))[: draw(st.integers(0, 4))]
    return ThinPoolTable(
        meta,
        data,
        Sectors(128 * draw(st.integers(1, 16384))),
        DataBlocks(draw(uints)),
        tuple(features),
    )


@given(tables())
def test_table_round_trips(t: ThinPoolTable) -> None:
    assert parse_pool_table(t.params()) == t
    # As the kernel prints it back: canonical order, trailing space; still the same table.
    printed = parse_pool_table(t.canonical().params() + " ")
    assert table_differences(printed, t) == frozenset()


@given(tables(), st.data())
def test_any_bad_table_token_is_named(t: ThinPoolTable, data: st.DataObject) -> None:
    tokens = t.params().split()
    index = data.draw(st.integers(2, len(tokens) - 1))  # devices are free-form
    tokens[index] = "bogus"
    with pytest.raises(StatusParseError) as info:
        parse_pool_table(" ".join(tokens))
    assert info.value.index == index


def test_a_pools_table_is_one_thin_pool_line_from_sector_0() -> None:
    params = "7:0 7:1 128 32768 1 skip_block_zeroing"
    target = Target(Sectors(0), Sectors(2048), "thin-pool", params)
    line = ThinPoolLine.from_targets([target])
    table = ThinPoolTable(
        "7:0", "7:1", Sectors(128), DataBlocks(32768), (Feature.SKIP_BLOCK_ZEROING,)
    )
    assert line == ThinPoolLine(Sectors(2048), table)
    assert line.to_target() == target
    for others in (
        [],
        [
            target,
            Target(Sectors(2048), Sectors(8), "error", ""),
        ],  # a second line (an operator's dmsetup)
        [Target(Sectors(8), Sectors(2048), "thin-pool", params)],
        [Target(Sectors(0), Sectors(2048), "linear", "7:0 0")],
    ):
        assert thin_pool_target(others) is None and ThinPoolLine.from_targets(others) is None


def test_features_are_members_whatever_the_caller_gave() -> None:
    table = ThinPoolTable("7:0", "7:1", Sectors(128), DataBlocks(0), (Feature.ERROR_IF_NO_SPACE,))
    assert table.features == (Feature.ERROR_IF_NO_SPACE,)
    assert table.with_no_space_policy(NoSpacePolicy.QUEUE).features == ()


@pytest.mark.parametrize("word", ["Fail", "Error"])
def test_a_whole_line_word_is_never_a_mode_field(word: str) -> None:
    with pytest.raises(StatusParseError) as info:
        parse_pool_status(f"0 1/2 3/4 - {word} discard_passdown queue_if_no_space - 5 ")
    assert (info.value.index, info.value.value) == (4, word)
