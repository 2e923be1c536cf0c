"""Sizes, shares and durations as the config writes them: "100GiB", "80%", "500ms"."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from thinwatchd.base.units import Bytes

__all__ = [
    "DURATION_HINT",
    "MAX_SIZE_BYTES",
    "PERCENT_HINT",
    "SIZE_HINT",
    "parse_duration",
    "parse_percent",
    "parse_size",
    "show_value",
]

#: What a size looks like, for error messages.
SIZE_HINT = "use a number of bytes or a number with a unit like 512MiB or 1GiB"
PERCENT_HINT = "use a number like 80 or 80%"
DURATION_HINT = "use a number of seconds or a number with a unit like 500ms, 10s, 2m or 1h"

#: The largest file Linux can hold (off_t is signed 64-bit); anything bigger is a typo.
MAX_SIZE_BYTES = 2**63 - 1

# Every size unit is binary, whatever its spelling: K, KB and KiB all mean 1024 bytes. lvm2
# (lvcreate -L 100G) and Docker (units.RAMInBytes, dm.basesize=100G) read them that way, so a
# size copied from either means the same here; case does not matter.
_SIZE_UNITS = {"": Fraction(1), "b": Fraction(1)} | {
    spelling: Fraction(1024**power)
    for power, letter in enumerate("kmgtpe", start=1)
    for spelling in (letter, letter + "b", letter + "ib")
}
_DURATION_UNITS = {
    "": Fraction(1),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
_PERCENT_UNITS = {"": Fraction(1), "%": Fraction(1)}
# ASCII digits only: \d would let through other scripts' digits. The length cap keeps absurd
# inputs away from int() and its 4300-digit limit.
_NUMBER = r"(?P<sign>[-+]?)(?P<number>[0-9]{1,40}(?:\.[0-9]{0,40})?|\.[0-9]{1,40})"
_SIZE_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>[A-Za-z]*)\s*")
_PERCENT_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>%?)\s*")
_DURATION_RE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>[A-Za-z]*)\s*")


def show_value(value: object) -> str:
    """Return value as YAML would spell it, shortened, for an error message."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if isinstance(value, int) and value.bit_length() > 256:
        return "a very large number"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(
    value: str | int | float,
    pattern: re.Pattern[str],
    units: dict[str, Fraction],
    what: str,
    hint: str,
) -> Fraction:
    """Return the exact value of value (times its unit), rejecting anything else with ValueError."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{show_value(value)} is not {what}; {hint}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{show_value(value)} is not {what}; {hint}")
        amount = Fraction(value)
    elif isinstance(value, int):
        amount = Fraction(value)
    else:
        match = pattern.fullmatch(value)
        factor = units.get(match["unit"].lower()) if match else None
        if match is None or factor is None:
            raise ValueError(f"{show_value(value)} is not {what}; {hint}")
        amount = Fraction(match["number"]) * factor
        if match["sign"] == "-":
            amount = -amount
    if amount < 0:
        raise ValueError(f"{show_value(value)} is negative; {what} must be 0 or more")
    return amount


def parse_size(value: str | int | float) -> Bytes:
    """Return the number of bytes in a size like "100GiB", "1.5T", "4k" or 4096.

    Units are binary whatever their spelling (G = GB = GiB = 1024**3), case-insensitive, from B
    to E(iB); no unit means bytes. A fractional result is rounded down to a whole byte. Raise
    ValueError, with a message naming the value and what is allowed, for anything else,
    including negative sizes and sizes above MAX_SIZE_BYTES.
    """
    if isinstance(value, float) and math.isfinite(value) and not value.is_integer():
        raise ValueError(f"{show_value(value)} is not a whole number of bytes; {SIZE_HINT}")
    size = math.floor(_number(value, _SIZE_RE, _SIZE_UNITS, "a size", SIZE_HINT))
    if size > MAX_SIZE_BYTES:
        raise ValueError(f"{show_value(value)} is larger than any file can be (8EiB)")
    return Bytes(size)


def parse_percent(value: str | int | float) -> float:
    """Return the percentage in "80%", "80", 80 or 80.5 as a float (80.0).

    Raise ValueError for anything else, including negative and non-finite values. The caller
    checks the range, which depends on the setting.
    """
    return _as_float(
        value, _number(value, _PERCENT_RE, _PERCENT_UNITS, "a percentage", PERCENT_HINT)
    )


def parse_duration(value: str | int | float) -> float:
    """Return the seconds in a duration like "500ms", "10s", "2m", "1h" or a plain number.

    Units are ms, s, m and h, case-insensitive; no unit means seconds. Raise ValueError for
    anything else, including negative and non-finite values.
    """
    return _as_float(
        value, _number(value, _DURATION_RE, _DURATION_UNITS, "a duration", DURATION_HINT)
    )


def _as_float(value: object, amount: Fraction) -> float:
    """Return amount as a float, or raise ValueError if it is too large for one."""
    try:
        return float(amount)
    except OverflowError:
        raise ValueError(f"{show_value(value)} is out of range") from None
