"""The estimates file: the running daemon's fill rates and times to full, for `thinwatchd status`.

`status` runs apart from the daemon and sees only the kernel's state now; a fill rate needs a
history. The daemon writes what it measured after each pass (atomically, beside its instance
lock in /run/thinwatchd), and `status` shows it while it is fresh: a file left by a daemon that
has stopped says nothing. A file that is not what the daemon writes (a symlink, a FIFO, too big,
nested too deep, NaN or a figure out of range: anyone who could write /run/thinwatchd) says
nothing either, after one line on stderr saying why; `status` never fails over it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from thinwatchd.base.small_files import FILE_KINDS, file_kind, read_capped
from thinwatchd.publish.figures import PoolMetrics

__all__ = [
    "ESTIMATES_NAME",
    "MAX_ESTIMATES_BYTES",
    "Estimate",
    "read_estimates",
    "render_estimates",
]

#: The file's name, in the directory of the daemon's instance lock.
ESTIMATES_NAME = "estimates.json"
_VERSION = 1


@dataclass(frozen=True)
class Estimate:
    """One pool's figures as the daemon last measured them (seconds from when it was read)."""

    fill_rate_bytes_per_second: float | None
    seconds_to_cap: float | None  # None: not filling, or no cap
    seconds_to_backing_fs_reserve: float | None  # None: not filling, or the filesystem unknown


def render_estimates(figures: Iterable[PoolMetrics], now: float) -> str:
    """Return the file's text for the pools' figures, measured at now (wall-clock seconds)."""
    pools = {
        m.name: {
            "fill_rate_bytes_per_second": m.fill_rate,
            "seconds_to_cap": None if m.full_in is None else m.full_in.cap,
            "seconds_to_backing_fs_reserve": None if m.full_in is None else m.full_in.backing_fs,
        }
        for m in figures
    }
    return json.dumps({"version": _VERSION, "written_at": now, "pools": pools}) + "\n"


def read_estimates(
    path: Path, now: float, max_age: float, warn: Callable[[str], None] | None = None
) -> dict[str, Estimate] | None:
    """Return each pool's estimate from the file at path, counted down to now.

    None if there is no such file or it is older than max_age seconds (no daemon keeps it fresh):
    that is no problem, and nothing is said. None too for a file that is unsafe or not what the
    daemon writes (_read_checked says which), after one line on stderr (or to warn) saying why:
    `status` then shows no estimates, and its exit code does not change.
    """
    try:
        doc = _read_checked(path)
    except FileNotFoundError:
        return None
    except _Unusable as e:
        (warn or _say)(f"ignoring {_printable(path)}: {e}")
        return None
    age = now - doc.written_at
    if not -60 <= age <= max_age:  # the daemon stopped, or the clock jumped
        return None
    return {name: _estimate(figures, max(0.0, age)) for name, figures in doc.pools.items()}


#: The largest file read. An entry takes at most 289 bytes (a 127-byte name, three 23-character
#: figures); a config defines at most 3,332 pools (20,000 values, 6 a pool), so its file is at
#: most 963,008 bytes. Twice that leaves room for pools a reload removed (watched until a
#: restart); the checks and json take a few tens of milliseconds over it.
MAX_ESTIMATES_BYTES = 2 * 1024**2
#: The file is nested 3 deep ({"pools": {name: {...}}}); this leaves room for a future version.
_MAX_DEPTH = 8
#: Its integers are small (the version); a figure beyond a float's range is no measurement, nor
#: is one above this (a rate or a duration of 10^30: 10^22 years).
_MAX_DIGITS = 20
_MAX_FIGURE = 1e30
_FIGURES = ("fill_rate_bytes_per_second", "seconds_to_cap", "seconds_to_backing_fs_reserve")


class _Unusable(ValueError):
    """The file is not one to read: says why, in a few words on one line."""


class _Document(NamedTuple):
    written_at: float
    pools: dict[str, dict[str, float | None]]


def _say(line: str) -> None:
    print(f"thinwatchd: {line}", file=sys.stderr)


def _printable(text: object) -> str:
    shown = str(text)
    return shown if shown.isprintable() else repr(shown)


def _read_checked(path: Path) -> _Document:
    """Return the checked contents of path; raise FileNotFoundError, or _Unusable saying why.

    As for the config: a regular file only, opened without following a symlink (O_NOFOLLOW) and
    without waiting for a FIFO's writer (O_NONBLOCK), at most MAX_ESTIMATES_BYTES, UTF-8 JSON
    nested at most _MAX_DEPTH deep (checked before json recurses), and every figure a finite
    number from 0 to _MAX_FIGURE (NaN, Infinity and huge integers are refused as they are parsed).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _Unusable(_open_refused(path, e)) from None
    try:
        info = os.fstat(fd)  # of what was opened, not of what the name meant a moment ago
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable(f"it is a {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_ESTIMATES_BYTES:
            raise _Unusable(_too_big())
        data = read_capped(fd, MAX_ESTIMATES_BYTES)
    except OSError as e:
        raise _Unusable(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if data is None:
        raise _Unusable(_too_big())
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Unusable(f"byte {e.start} is not UTF-8") from None
    return _checked(_parse(text))


def _open_refused(path: Path, error: OSError) -> str:
    if error.errno in (errno.ELOOP, errno.ENXIO):  # O_NOFOLLOW met a symlink; or a socket
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                return "it is a symlink; the daemon writes a regular file there"
            if stat.S_IFMT(mode) in FILE_KINDS:
                return f"it is a {FILE_KINDS[stat.S_IFMT(mode)]}, not a regular file"
    return error.strerror or str(error)


def _too_big() -> str:
    return f"it is larger than {MAX_ESTIMATES_BYTES // 1024**2} MiB, more than the daemon writes"


# Strings, complete or not (an unterminated one runs to the end), so that brackets in them do not
# count; unrolled, so that the scan is linear whatever the text.
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def _parse(text: str) -> object:
    """Return the JSON value of text; refuse deep nesting before json recurses into it, and NaN,
    Infinity, and numbers beyond a float's range as they are parsed."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    for _ in range(_MAX_DEPTH):  # each pass removes the innermost level: O(size) a level
        brackets, removed = _INNERMOST.subn("", brackets)
        if not removed:
            break
    if _INNERMOST.search(brackets):
        raise _Unusable(f"it is nested more than {_MAX_DEPTH} levels deep")
    if brackets:  # unclosed or crossed: json would recurse into as many unclosed [ as there are
        raise _Unusable("it is not JSON: its brackets do not match")
    try:
        return json.loads(text, parse_int=_integer, parse_float=_float, parse_constant=_no_constant)
    except _Unusable:
        raise
    except ValueError as e:  # json.JSONDecodeError: one line, with the line and column
        raise _Unusable(f"it is not JSON: {e}") from None


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_DIGITS:
        raise _Unusable(f"it holds an integer of {len(digits.lstrip('-'))} digits")
    return int(digits)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unusable(f"{_shorten(text)} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise _Unusable(f"it holds {name}, which is not a number")


def _shorten(text: str) -> str:
    return text if len(text) <= 30 else text[:27] + "..."


def _checked(doc: object) -> _Document:
    """Return doc as a _Document if it is what the daemon writes; raise _Unusable saying why."""
    if not isinstance(doc, dict):
        raise _Unusable("it is not a JSON object")
    version = doc.get("version")
    if version != _VERSION or isinstance(version, bool):
        raise _Unusable(f"it is version {_shown(version)}; this thinwatchd reads {_VERSION}")
    written_at = _figure(doc, "written_at")
    if written_at is None:
        raise _Unusable("written_at is null")
    pools = doc.get("pools")
    if not isinstance(pools, dict):
        raise _Unusable(f"pools is {_shown(pools)}, not an object of pools")
    checked: dict[str, dict[str, float | None]] = {}
    for name, figures in pools.items():
        where = f"pools.{_shorten(_printable(name))}"
        if not isinstance(figures, dict):
            raise _Unusable(f"{where} is {_shown(figures)}, not an object")
        checked[name] = {key: _figure(figures, key, f"{where}.") for key in _FIGURES}
    return _Document(written_at, checked)


def _figure(mapping: dict[str, object], key: str, where: str = "") -> float | None:
    """Return mapping[key]: null, or a number from 0 to _MAX_FIGURE, as a float."""
    if key not in mapping:
        raise _Unusable(f"{where}{key} is missing")
    value = mapping[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Unusable(f"{where}{key} is {_shown(value)}, not a number")
    if not 0 <= value <= _MAX_FIGURE:
        raise _Unusable(f"{where}{key} is {_shown(value)}, not from 0 to {_MAX_FIGURE:g}")
    return float(value)


def _shown(value: object) -> str:
    """Return value as JSON would write it, shortened to keep the line short."""
    return _shorten(json.dumps(value) if isinstance(value, bool | None) else repr(value))


def _estimate(figures: dict[str, float | None], age: float) -> Estimate:
    def left(key: str) -> float | None:
        seconds = figures[key]
        return None if seconds is None else max(0.0, seconds - age)

    return Estimate(
        figures["fill_rate_bytes_per_second"],
        left("seconds_to_cap"),
        left("seconds_to_backing_fs_reserve"),
    )
