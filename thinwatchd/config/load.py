"""Read the YAML config into validated Settings; every mistake becomes one ConfigError.

This is the only place that reads config text: sizes, percents and durations become numbers here,
once. ``config.example.yaml`` documents every key.
"""

from __future__ import annotations

import difflib
import errno
import os
import shlex
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from yaml.reader import ReaderError

from thinwatchd.base.errors import ConfigError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.small_files import FILE_KINDS, file_kind, read_capped
from thinwatchd.base.units import data_block_bytes, whole_data_blocks
from thinwatchd.config.quantities import show_value
from thinwatchd.config.settings import (
    DaemonSettings,
    DataGrowth,
    MetadataGrowth,
    NoSpaceSettings,
    PoolSettings,
    Settings,
)
from thinwatchd.config.strict_yaml import load_strict_yaml
from thinwatchd.config.values import (
    LOG_LEVELS,
    Invalid,
    Parser,
    block_size,
    boolean,
    duration_value,
    features,
    file_path,
    low_water_blocks,
    metadata_size,
    one_of,
    optional,
    share,
    size_or_share,
    size_value,
    within,
)
from thinwatchd.kernel.names import pool_name

__all__ = [
    "MAX_CONFIG_BYTES",
    "build_settings",
    "load_settings",
    "parse_settings",
    "printable_path",
]

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
    """Return the text of path, which must be a regular UTF-8 file of at most MAX_CONFIG_BYTES
    that nobody but root (or our user) could have written (_check_trusted)."""
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
        info = os.fstat(fd)  # of what was opened, not of what the name meant a moment ago
        if not stat.S_ISREG(info.st_mode):
            raise refused(_not_regular(file_kind(info.st_mode)))
        _check_trusted(path, info, shown)
        data = read_capped(fd, MAX_CONFIG_BYTES)
    except OSError as e:
        raise refused(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if data is None:
        limit = f"{MAX_CONFIG_BYTES // 1024**2} MiB"
        raise refused(f"it is larger than {limit}, the limit for a config file; {_WRONG_FILE}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refused(f"byte {e.start} is not UTF-8; save the file as UTF-8") from None


_WRONG_FILE = "--config must name the YAML config file"


def _file_kind(path: Path) -> str | None:
    try:
        return FILE_KINDS.get(stat.S_IFMT(os.stat(path).st_mode))
    except OSError:
        return None


def _not_regular(kind: str) -> str:
    return f"it is a {kind}, not a regular file; {_WRONG_FILE}"


def _check_trusted(path: Path, info: os.stat_result, shown: str) -> None:
    """Refuse a config that anyone but root or our user could have written, or could swap.

    The config decides which files root formats and grows, so it is checked as sshd's
    StrictModes checks a user's files, and as pool files are (pool_files._inspect_pool_file):

    - the file (fstat of what was opened): owned by root or our user, and not writable by group
      or others;
    - every directory from the file's up to /: owned by root or our user, and not writable by
      group or others unless it is sticky. In a sticky directory (/tmp, 1777) only an entry's
      owner, the directory's owner or root may rename or remove the entry, and every entry on
      the way is checked to be root's or ours, so nobody else can swap it: a config in
      /tmp/xyz (tempfile.mkdtemp, 0700 root) or in /tmp itself is accepted; one in a directory
      another user owns is not, wherever it is;
    - symlinks are followed, and the directories of both the path as given (made absolute:
      those that hold its links) and the file it resolves to are checked. A link in a sticky
      directory owned by another user is not followed by the kernel (fs.protected_symlinks).

    Mode bits only: a POSIX ACL that grants write shows in the group bits (its mask), so it is
    refused too. The same rule holds for run, reload, check-config and status.
    """
    trusted = (0, os.geteuid())
    owners = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()}"
    if info.st_uid not in trusted or info.st_mode & 0o022:
        raise ConfigError(
            "",
            f"{shown} is {_owned(info)}; a config file must be owned by {owners} and writable by "
            f"nobody else: it decides which files root formats and grows. Fix it with: "
            f"{_fix(str(path), info, trusted)}",
        )
    for directory in _directories(path):
        try:
            found = os.stat(directory)
        except OSError as e:
            problem = f"cannot check its directory {printable_path(directory)}"
            raise ConfigError("", f"{shown}: {problem}: {e.strerror or e}") from None
        sticky = bool(found.st_mode & stat.S_ISVTX)
        if found.st_uid not in trusted or (found.st_mode & 0o022 and not sticky):
            raise ConfigError(
                "",
                f"{shown}: its directory {printable_path(directory)} is {_owned(found)}; every "
                f"directory up to / must be owned by {owners} and writable by nobody else (or "
                "sticky, as /tmp), or the config could be swapped. Fix it with: "
                f"{_fix(directory, found, trusted, sticky=sticky)}",
            )


def _owned(info: os.stat_result) -> str:
    return f"owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}"


def _fix(path: str, info: os.stat_result, trusted: tuple[int, int], sticky: bool = False) -> str:
    """Return the commands that make path trusted (_check_trusted), for a one-line message."""
    quoted = shlex.quote(path)
    shown = quoted if quoted.isprintable() else printable_path(path)
    commands = []
    if info.st_uid not in trusted:
        commands.append(f"chown {'root' if trusted[1] == 0 else trusted[1]} {shown}")
    if info.st_mode & 0o022 and not sticky:
        commands.append(f"chmod go-w {shown}")
    return " && ".join(commands)


def _directories(path: Path) -> list[str]:
    """Return the directories above path, nearest first: those of the path as given (made
    absolute), then those of the file it resolves to that are not among them."""
    directories: list[str] = []
    for name in (os.path.abspath(path), os.path.realpath(path)):
        directory = os.path.dirname(name)
        while directory not in directories:
            directories.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:  # / (or //)
                break
            directory = parent
    return directories


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


# --- Sections and pools ------------------------------------------------------------------------

_TOP: dict[str, Parser] = {
    "data_file": file_path,
    "metadata_file": file_path,
    "data_size": size_value,
    "metadata_size": metadata_size,
    "data_block_size": block_size,
    "low_water_mark": low_water_blocks,
    "features": features,
    "preallocate": boolean,
    "direct_io": boolean,
    "reserve": size_or_share("reserve_percent"),
    "reserve_percent": within(share, lambda p: p < 100, "0% to below 100%"),
}
_THRESHOLD = within(share, lambda p: 0 < p <= 100, "more than 0% and at most 100%")
_SECTIONS: dict[str, dict[str, Parser]] = {
    "data": {
        "threshold": _THRESHOLD,
        "step": size_or_share("step_percent"),
        "step_percent": share,
        "max_size": optional(size_value),
        "adaptive_low_water": boolean,
        "crash_room": boolean,
    },
    "metadata": {
        "threshold": _THRESHOLD,
        "step": size_or_share("step_percent"),
        "step_percent": share,
        "max_size": metadata_size,
    },
    # "never" and null both mean: keep queueing writes, as the kernel does by default.
    "when_full": {"error_after": lambda v: None if v in (None, "never") else duration_value(v)},
}
_DAEMON: dict[str, Parser] = {
    "check_interval": within(duration_value, lambda s: 1 <= s <= 3600, "1s to 1h"),
    "metrics_file": optional(file_path),
    "log_level": lambda v: one_of(v.lower() if isinstance(v, str) else v, LOG_LEVELS, "a level"),
    "warn_full_within": within(duration_value, lambda s: 0 <= s <= 720 * 3600, "0s to 720h"),
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
        except Invalid as e:
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
    data_size = whole_data_blocks(pool.data_size, pool.data_block_size)
    if data_size == 0:
        block = data_block_bytes(pool.data_block_size)
        least = f"{format_bytes(block)} ({block} bytes)"
        raise fail("data_size", top, f"is less than one data block; use at least {least}")
    max_size = pool.data.max_size
    if max_size is not None:
        max_size = whole_data_blocks(max_size, pool.data_block_size)
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
