"""Unit tests for thinwatchd.config.quantities: sizes, shares and durations as written."""

from __future__ import annotations

import contextlib
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from thinwatchd.config.quantities import MAX_SIZE_BYTES, parse_duration, parse_percent, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4

# Every spelling of every size unit, with its power of 1024.
SPELLINGS = [("", 0), ("b", 0), ("B", 0)] + [
    (spelling, power)
    for power, letter in enumerate("KMGTPE", start=1)
    for spelling in (letter, letter + "B", letter + "iB", letter.lower(), letter.lower() + "ib")
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100G", 100 * GiB),
        ("100GiB", 100 * GiB),
        ("100GB", 100 * GiB),  # binary too, as in lvm2 and Docker
        ("100gb", 100 * GiB),
        ("512M", 512 * MiB),
        ("4k", 4 * KiB),
        ("1.5T", 3 * TiB // 2),
        ("0.5K", 512),
        (".5K", 512),
        ("1.", 1),
        ("1 GiB", GiB),
        (" 2G ", 2 * GiB),
        ("+1K", KiB),
        ("12", 12),
        ("12B", 12),
        ("0", 0),
        ("1.3B", 1),  # rounded down to a whole byte
        ("15.9GiB", 17072495001),
        ("7E", 7 * 1024**6),
        (4096, 4096),
        (4096.0, 4096),
    ],
)
def test_parse_size(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1 gig", "'1 gig' is not a size; use a number of bytes or a number with a unit"),
        ("", "is not a size"),
        ("G", "is not a size"),
        ("1e9", "is not a size"),
        ("1,5G", "is not a size"),
        ("1.5.G", "is not a size"),
        ("1Q", "is not a size"),
        ("1s", "is not a size"),  # sectors are not a unit here: 's' looks like seconds
        ("0x10", "is not a size"),
        ("١٢", "is not a size"),  # Arabic-Indic digits
        ("-1G", "'-1G' is negative"),
        (-1, "-1 is negative"),
        ("8E", "larger than any file can be"),
        (2**63, "larger than any file can be"),
        ("9" * 41, "is not a size"),
        (1.5, "1.5 is not a whole number of bytes"),
        (float("nan"), "nan is not a size"),
        (float("inf"), "inf is not a size"),
        (True, "true is not a size"),
        (None, "null is not a size"),
        ([1], "a list is not a size"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


@given(
    st.sampled_from(SPELLINGS), st.integers(min_value=0, max_value=MAX_SIZE_BYTES), st.booleans()
)
def test_parse_size_round_trips_whole_units(
    spelling: tuple[str, int], size: int, space: bool
) -> None:
    unit, power = spelling
    count = size // 1024**power
    assert parse_size(f"{count}{' ' if space else ''}{unit}") == count * 1024**power


@given(
    st.sampled_from([s for s in SPELLINGS if s[1] <= 3]),
    st.integers(min_value=0, max_value=MAX_SIZE_BYTES),
)
def test_parse_size_round_trips_exact_fractions(spelling: tuple[str, int], size: int) -> None:
    # size / 1024**power has a finite decimal expansion; write it out exactly.
    unit, power = spelling
    places = 10 * power
    digits = str(size * 5**places).rjust(places + 1, "0")
    text = f"{digits[: len(digits) - places]}.{digits[len(digits) - places :]}".rstrip("0")
    assume(len(text.partition(".")[2]) <= 40 and len(text.partition(".")[0]) <= 40)
    assert parse_size(text + unit) == size


@given(st.fractions(min_value=0, max_value=10**6), st.sampled_from(SPELLINGS))
def test_parse_size_rounds_fractions_down(value: Fraction, spelling: tuple[str, int]) -> None:
    unit, power = spelling
    text = f"{float(value):.6f}"
    exact = Fraction(text) * 1024**power
    assume(exact <= MAX_SIZE_BYTES)
    assert parse_size(text + unit) == int(exact)  # int() truncates: the value is >= 0


@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))))
def test_parse_size_rejects_garbage_with_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert 0 <= size <= MAX_SIZE_BYTES


@given(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.lists(st.integers()), st.text()
    )
)
def test_parsers_raise_only_value_error(value: object) -> None:
    for parse in (parse_size, parse_percent, parse_duration):
        with contextlib.suppress(ValueError):
            parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("80%", 80.0),
        ("80", 80.0),
        (80, 80.0),
        (12.5, 12.5),
        (" 12.5 % ", 12.5),
        ("0%", 0.0),
        ("250%", 250.0),
        (".5%", 0.5),
    ],
)
def test_parse_percent(value: str | int | float, expected: float) -> None:
    assert parse_percent(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("80 percent", "'80 percent' is not a percentage; use a number like 80 or 80%"),
        ("%", "is not a percentage"),
        ("80%%", "is not a percentage"),
        ("nan", "is not a percentage"),
        (float("inf"), "is not a percentage"),
        ("-5%", "'-5%' is negative"),
        (-1, "is negative"),
        (False, "is not a percentage"),
    ],
)
def test_parse_percent_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_percent(value)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("10", 10.0),
        (10, 10.0),
        (0.25, 0.25),
        ("0", 0.0),
        ("10S", 10.0),
        (" 3 s ", 3.0),
    ],
)
def test_parse_duration(value: str | int | float, expected: float) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("10 sec", "'10 sec' is not a duration; use a number of seconds or a number with a unit"),
        ("1:30", "is not a duration"),
        ("1m30s", "is not a duration"),
        ("1d", "is not a duration"),
        ("-1s", "'-1s' is negative"),
        (float("nan"), "is not a duration"),
        (10**400, "out of range"),
        (None, "is not a duration"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)  # type: ignore[arg-type]
    assert fragment in str(caught.value)
