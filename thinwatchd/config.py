"""Read the YAML config into validated Settings; every mistake becomes one ConfigError.

This is the only place that reads config text: sizes, percents and durations become numbers here,
once. ``config.example.yaml`` documents every key.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from yaml.reader import ReaderError

from thinwatchd.errors import ConfigError
from thinwatchd.kernel.names import pool_name
from thinwatchd.settings import (
    METADATA_MAX_BYTES,
    DaemonSettings,
    DataGrowth,
    MetadataGrowth,
    NoSpaceSettings,
    PoolSettings,
    Settings,
)
from thinwatchd.strict_yaml import load_strict_yaml
from thinwatchd.table import MAX_BLOCK_SECTORS, MIN_BLOCK_SECTORS, Feature, valid_block_size
from thinwatchd.units import (
    DURATION_HINT,
    META_BLOCK_BYTES,
    PERCENT_HINT,
    SECTOR_BYTES,
    SIZE_HINT,
    format_bytes,
    parse_duration,
    parse_percent,
    parse_size,
    show_value,
)

__all__ = [
    "FEATURES",
    "LOG_LEVELS",
    "MAX_CONFIG_BYTES",
    "METADATA_MIN_BYTES",
    "build_settings",
    "load_settings",
    "parse_settings",
    "printable_path",
]

#: The thin-pool feature args a pool may list. read_only is not among them: a read-only pool
#: allocates nothing, so there would be nothing to grow and every write to a thin volume fails.
FEATURES = tuple(f.value for f in Feature if f is not Feature.READ_ONLY)
LOG_LEVELS = ("debug", "info", "warning", "error")
#: lvm2's minimum pool metadata size; the kernel needs room for its superblock and space maps.
METADATA_MIN_BYTES = 2 * 1024**2
#: The largest config file read. The example, documenting every key, is 8 KiB. libyaml parses a
#: MiB in milliseconds and strict_yaml caps the values, so even a hostile file fails fast.
MAX_CONFIG_BYTES = 1024**2


def load_settings(path: Path) -> Settings:
    """Read and validate the config file at path; raise ConfigError for any problem."""
    return parse_settings(_read_config(path), printable_path(path))


def printable_path(path: object) -> str:
    """Return path for a one-line message: quoted if it holds a newline or other control."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _read_config(path: Path) -> str:
    """Return the text of path, which must be a regular UTF-8 file of at most MAX_CONFIG_BYTES."""
    shown = printable_path(path)

    def refused(problem: str) -> ConfigError:
        return ConfigError("", f"cannot read {shown}: {problem}")

    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer. O_NOCTTY: nor may a tty become ours.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        kind = _file_kind(path) if e.errno == errno.ENXIO else None  # a socket cannot be opened
        raise refused(_not_regular(kind) if kind else e.strerror or str(e)) from None
    try:
        mode = os.fstat(fd).st_mode  # of what was opened, not of what the name meant a moment ago
        if not stat.S_ISREG(mode):
            raise refused(_not_regular(_FILE_KINDS.get(stat.S_IFMT(mode), "special file")))
        data = bytearray()
        while len(data) <= MAX_CONFIG_BYTES:  # read one byte past the cap to see it is passed
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise refused(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        limit = f"{MAX_CONFIG_BYTES // 1024**2} MiB"
        raise refused(f"it is larger than {limit}, the limit for a config file; {_WRONG_FILE}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refused(f"byte {e.start} is not UTF-8; save the file as UTF-8") from None


_WRONG_FILE = "--config must name the YAML config file"
_FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _file_kind(path: Path) -> str | None:
    try:
        return _FILE_KINDS.get(stat.S_IFMT(os.stat(path).st_mode))
    except OSError:
        return None


def _not_regular(kind: str) -> str:
    return f"it is a {kind}, not a regular file; {_WRONG_FILE}"


def parse_settings(text: str, source: str) -> Settings:
    """Parse YAML text (called source in messages) and validate it; raise ConfigError."""
    try:
        data = load_strict_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = ", ".join(part for part in (e.context, e.problem) if part) or "invalid YAML"
        raise ConfigError("", f"{where}: {_one_line(problem)}") from None
    except ReaderError as e:  # a control character: no mark, and libyaml counts bytes
        where = source
        if isinstance(e.character, int):  # the first bad character is its first occurrence
            at = text.find(chr(e.character))
            line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
            where = f"{source}, line {line}, column {column}"
        raise ConfigError("", f"{where}: {_one_line(str(e).splitlines()[0])}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{source}: {_one_line(str(e).splitlines()[0])}") from None
    except RecursionError:  # not expected: strict_yaml caps the nesting well below the limit
        raise ConfigError("", f"{source}: nested too deeply") from None
    if data is None:
        raise ConfigError("", f"{source} is empty; it needs at least a pools: section")
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the top level must be a mapping, not {show_value(data)}")
    return build_settings(data)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "invalid YAML"


def build_settings(data: object) -> Settings:
    """Validate an already-parsed YAML document; raise ConfigError naming the first bad key."""
    top = _mapping(data, "", "with a pools: section")
    _check_keys(top, ("daemon", "defaults", "pools"), "")
    daemon = _daemon(top.get("daemon"))
    defaults = _read_layer(top.get("defaults"), "defaults")
    # A bad default is reported even where every pool overrides it. Relations between keys are
    # checked per pool, after merging.
    _parse_leaves(defaults[0], _TOP)
    for name, leaves in defaults[1].items():
        _parse_leaves(leaves, _SECTIONS[name])
    if "pools" not in top:
        raise ConfigError("pools", "missing; define at least one pool")
    pools_raw = _mapping(top["pools"], "pools", "of pool names to pools")
    if not pools_raw:
        raise ConfigError("pools", "is empty; define at least one pool")
    pools = tuple(_pool(name, raw, defaults) for name, raw in pools_raw.items())
    _check_files_unique(daemon, pools)
    return Settings(daemon=daemon, pools=pools)


# --- Single values: each parser takes the raw value and raises _Invalid ----------------------


class _Invalid(Exception):
    """A value is wrong; the caller adds the key path (and `where`, a suffix like "[2]")."""

    def __init__(self, message: str, *, shown: bool = False, where: str = "") -> None:
        super().__init__(message)
        self.shown = shown  # the message already names the value
        self.where = where


Parser = Callable[[object], Any]


def _via(parse: Callable[[str | int | float], Any], what: str, hint: str) -> Parser:
    """Return a parser that applies a units parser, whose messages already name the value."""

    def parser(value: object) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Invalid(f"is not {what}; {hint}")
        try:
            return parse(value)
        except ValueError as e:
            raise _Invalid(str(e), shown=True) from None

    return parser


def _within(parse: Parser, ok: Callable[[Any], bool], allowed: str) -> Parser:
    """Return a parser that also checks the parsed value's range."""

    def parser(value: object) -> Any:
        parsed = parse(value)
        if not ok(parsed):
            raise _Invalid(f"is out of range; use {allowed}")
        return parsed

    return parser


_size = _via(parse_size, "a size", SIZE_HINT)
_duration = _via(parse_duration, "a duration", DURATION_HINT)
_percent = _via(parse_percent, "a percentage", PERCENT_HINT)


def _size_or_share(share_key: str) -> Parser:
    """Return a size parser that sends people who wrote a percentage to share_key."""

    def parser(value: object) -> int:
        if isinstance(value, str) and value.rstrip().endswith("%"):
            raise _Invalid(f"is not a size; {SIZE_HINT}, or set {share_key}: {value.strip()}")
        size: int = _size(value)
        return size

    return parser


def _metadata_size(value: object) -> int:
    size: int = _size(value)
    size -= size % META_BLOCK_BYTES  # the kernel uses whole 4 KiB metadata blocks
    if size < METADATA_MIN_BYTES:
        raise _Invalid("is too small; use at least 2MiB")
    if size > METADATA_MAX_BYTES:
        most = f"{METADATA_MAX_BYTES // 1024}KiB, about {METADATA_MAX_BYTES / 1024**3:.2f}GiB"
        raise _Invalid(f"is more than the kernel can use; use at most {most}")
    return size


def _share(value: object) -> float:
    """Parse a percentage; a bare number below 1 is refused because it looks like a fraction."""
    percent: float = _percent(value)
    if 0 < percent < 1 and not (isinstance(value, str) and "%" in value):
        raise _Invalid(f"is ambiguous; write {percent * 100:g}% or, for under 1%, {percent:g}%")
    return percent


def _whole(value: object) -> int | None:
    """Return value as a whole number if it is one (YAML gives text, Python callers ints)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,20}\s*", value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _block_size(value: object) -> int:
    """Parse data_block_size: a plain number is sectors, as in the table; with a unit, a size."""
    sectors = _whole(value)
    if isinstance(value, str) and sectors is None:
        with contextlib.suppress(ValueError):
            size = parse_size(value)
            sectors = size // SECTOR_BYTES if size % SECTOR_BYTES == 0 else None
    if sectors is None or not valid_block_size(sectors):
        lo, hi = MIN_BLOCK_SECTORS, MAX_BLOCK_SECTORS
        lo_kib, hi_gib = lo * SECTOR_BYTES // 1024, hi * SECTOR_BYTES // 1024**3
        raise _Invalid(
            f"is not a valid block size; use {lo} to {hi} sectors in steps of {lo}, or a size "
            f"from {lo_kib}KiB to {hi_gib}GiB in steps of {lo_kib}KiB"
        )
    return sectors


def _low_water_mark(value: object) -> int:
    blocks = _whole(value)
    if blocks is None or not 1 <= blocks < 2**63:
        raise _Invalid("is not a number of data blocks; use 1 or more")
    return blocks


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("is not a boolean; use true or false")
    return value


def _file(value: object) -> Path:
    absolute = isinstance(value, str) and value.startswith("/") and "\0" not in value
    if not absolute or os.path.basename(str(value)) in ("", ".", ".."):  # not a directory
        raise _Invalid("is not an absolute path to a file; use one like /srv/pool/data")
    return Path(str(value))


def _optional(parse: Parser) -> Parser:
    return lambda value: None if value is None else parse(value)


def _one_of(value: object, allowed: tuple[str, ...], what: str, where: str = "") -> str:
    if isinstance(value, str) and value in allowed:
        return value
    close = difflib.get_close_matches(value, allowed, n=1) if isinstance(value, str) else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    message = f"{show_value(value)} is not {what}; use one of {', '.join(allowed)}{guess}"
    raise _Invalid(message, shown=True, where=where)


def _features(value: object) -> tuple[Feature, ...]:
    if not isinstance(value, list):
        raise _Invalid("is not a list; use one like [skip_block_zeroing], or [] for none")
    features: list[Feature] = []
    for index, item in enumerate(value):
        if item == "read_only":
            message = "'read_only' is not allowed: a read-only pool cannot allocate, so cannot grow"
            raise _Invalid(message, shown=True, where=f"[{index}]")
        if _one_of(item, FEATURES, "a thin-pool feature", f"[{index}]") in features:
            raise _Invalid(
                f"{item!r} is listed twice; list it once", shown=True, where=f"[{index}]"
            )
        features.append(Feature(item))
    return tuple(features)


# --- Sections and pools ------------------------------------------------------------------------

_TOP: dict[str, Parser] = {
    "data_file": _file,
    "metadata_file": _file,
    "data_size": _size,
    "metadata_size": _metadata_size,
    "data_block_size": _block_size,
    "low_water_mark": _low_water_mark,
    "features": _features,
    "preallocate": _bool,
    "direct_io": _bool,
    "reserve": _size_or_share("reserve_percent"),
    "reserve_percent": _within(_share, lambda p: p < 100, "0% to below 100%"),
}
_THRESHOLD = _within(_share, lambda p: 0 < p <= 100, "more than 0% and at most 100%")
_SECTIONS: dict[str, dict[str, Parser]] = {
    "data": {
        "threshold": _THRESHOLD,
        "step": _size_or_share("step_percent"),
        "step_percent": _share,
        "max_size": _optional(_size),
        "adaptive_low_water": _bool,
    },
    "metadata": {
        "threshold": _THRESHOLD,
        "step": _size_or_share("step_percent"),
        "step_percent": _share,
        "max_size": _metadata_size,
    },
    # "never" and null both mean: keep queueing writes, as the kernel does by default.
    "when_full": {"error_after": lambda v: None if v in (None, "never") else _duration(v)},
}
_DAEMON: dict[str, Parser] = {
    "check_interval": _within(_duration, lambda s: 1 <= s <= 3600, "1s to 1h"),
    "metrics_file": _optional(_file),
    "log_level": lambda v: _one_of(v.lower() if isinstance(v, str) else v, LOG_LEVELS, "a level"),
    "warn_full_within": _within(_duration, lambda s: 0 <= s <= 720 * 3600, "0s to 720h"),
}
_FILE_KEYS = ("data_file", "metadata_file")
_FIELD_NAMES = {"threshold": "threshold_percent"}  # YAML key -> dataclass field, where they differ


class _Leaf(NamedTuple):
    value: object
    path: str  # where it was written: pools.<name>.… or defaults.…


#: One pool's keys (or the defaults): the plain keys, and each section's keys kept apart so that
#: a pool's data: section overrides the defaults' data: key by key (a deep merge).
_Layer = tuple[dict[str, _Leaf], dict[str, dict[str, _Leaf]]]


def _mapping(value: object, path: str, what: str) -> dict[str, object]:
    """Return value as a dict with str keys; null (a section with only comments) is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(path, f"{show_value(value)} is not a mapping; use a mapping {what}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, f"key {show_value(key)} is not a string; quote it")
    return value


def _check_keys(mapping: dict[str, object], allowed: tuple[str, ...], path: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            guess = f"did you mean {close[0]!r}? " if close else ""
            shown = key if key.isprintable() else repr(key)  # keep the message on one line
            where = f"{path}.{shown}" if path else shown
            raise ConfigError(where, f"unknown key {key!r}; {guess}allowed: {', '.join(allowed)}")


def _read_layer(raw: object, path: str) -> _Layer:
    mapping = _mapping(raw, path, "of pool settings")
    for key in _FILE_KEYS:
        if path == "defaults" and key in mapping:
            raise ConfigError(f"defaults.{key}", "cannot be a default; each pool needs its own")
    _check_keys(mapping, (*_TOP, *_SECTIONS), path)
    top: dict[str, _Leaf] = {}
    sections: dict[str, dict[str, _Leaf]] = {name: {} for name in _SECTIONS}
    for key, value in mapping.items():
        key_path = f"{path}.{key}"
        if key in _SECTIONS:
            section = _mapping(value, key_path, f"of {key} settings")
            _check_keys(section, tuple(_SECTIONS[key]), key_path)
            sections[key] = {k: _Leaf(v, f"{key_path}.{k}") for k, v in section.items()}
        else:
            top[key] = _Leaf(value, key_path)
    return top, sections


def _parse_leaves(leaves: dict[str, _Leaf], parsers: dict[str, Parser]) -> dict[str, Any]:
    """Parse each leaf with its key's parser; return dataclass keyword arguments."""
    parsed: dict[str, Any] = {}
    for key, (value, path) in leaves.items():
        try:
            parsed[_FIELD_NAMES.get(key, key)] = parsers[key](value)
        except _Invalid as e:
            raise ConfigError(
                path + e.where, str(e) if e.shown else f"{show_value(value)} {e}"
            ) from None
    return parsed


def _daemon(raw: object) -> DaemonSettings:
    mapping = _mapping(raw, "daemon", "of daemon settings")
    _check_keys(mapping, tuple(_DAEMON), "daemon")
    leaves = {key: _Leaf(value, f"daemon.{key}") for key, value in mapping.items()}
    return DaemonSettings(**_parse_leaves(leaves, _DAEMON))


def _pool(key: str, raw: object, defaults: _Layer) -> PoolSettings:
    """Build one pool from its keys over the defaults, then check how the keys relate."""
    try:
        name = pool_name(key)
    except ValueError as exc:
        raise ConfigError("pools", str(exc)) from None
    path = f"pools.{name}"
    own_top, own_sections = _read_layer(raw, path)
    top = defaults[0] | own_top
    sections = {s: defaults[1][s] | own_sections[s] for s in _SECTIONS}
    for key in _FILE_KEYS:
        if key not in top:
            raise ConfigError(f"{path}.{key}", "missing; every pool needs an absolute path here")
    pool = PoolSettings(
        name=name,
        **_parse_leaves(top, _TOP),
        data=DataGrowth(**_parse_leaves(sections["data"], _SECTIONS["data"])),
        metadata=MetadataGrowth(**_parse_leaves(sections["metadata"], _SECTIONS["metadata"])),
        when_full=NoSpaceSettings(**_parse_leaves(sections["when_full"], _SECTIONS["when_full"])),
    )

    def fail(key_path: str, leaves: dict[str, _Leaf], problem: str) -> ConfigError:
        """Return the error for key_path, saying where the value came from."""
        leaf = leaves.get(key_path.rpartition(".")[2])
        inherited = f" (from {leaf.path})" if leaf and leaf.path.startswith("defaults.") else ""
        shown = show_value(leaf.value) + inherited if leaf else "the default"
        return ConfigError(f"{path}.{key_path}", f"{shown} {problem}")

    # The kernel ignores a partial last block, so data sizes are rounded down to whole blocks.
    block = pool.data_block_size * SECTOR_BYTES
    data_size = pool.data_size - pool.data_size % block
    if data_size == 0:
        least = f"{format_bytes(block)} ({block} bytes)"
        raise fail("data_size", top, f"is less than one data block; use at least {least}")
    max_size = pool.data.max_size
    if max_size is not None:
        max_size -= max_size % block
        if max_size < data_size:
            least = f"data_size ({format_bytes(data_size)})"
            raise fail("data.max_size", sections["data"], f"is below {least}; use null for no cap")
    if pool.metadata.max_size < pool.metadata_size:
        least = f"metadata_size ({format_bytes(pool.metadata_size)})"
        raise fail("metadata.max_size", sections["metadata"], f"is below {least}; raise it")
    for section, growth in (("data", pool.data), ("metadata", pool.metadata)):
        if growth.step == 0 and growth.step_percent == 0:
            problem = "with step_percent 0 would never grow the file; set one above 0"
            raise fail(f"{section}.step", sections[section], problem)
    return replace(pool, data_size=data_size, data=replace(pool.data, max_size=max_size))


def _check_files_unique(daemon: DaemonSettings, pools: tuple[PoolSettings, ...]) -> None:
    """Refuse two uses of one file: a shared file would corrupt both pools."""
    uses = [(f"pools.{p.name}.{key}", getattr(p, key)) for p in pools for key in _FILE_KEYS]
    owners: dict[str, str] = {}
    for key_path, file in [*uses, ("daemon.metrics_file", daemon.metrics_file)]:
        normal = os.path.normpath(file) if file else None  # lexical: files may not exist yet
        if normal in owners:
            raise ConfigError(key_path, f"{str(file)!r} is already {owners[normal]}; use another")
        if normal:
            owners[normal] = key_path
