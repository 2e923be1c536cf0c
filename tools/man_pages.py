"""Write docs/man/thinwatchd.yaml.5, the thinwatchd.yaml(5) man page, from the code.

    .venv/bin/python -m tools.man_pages           # rewrite the page
    .venv/bin/python -m tools.man_pages --check   # exit 1, with a diff, if it is out of date

tests/unit/test_man_pages.py runs the same comparison, so a page that no longer says what the
code does fails CI. Each part of the page comes from where the code keeps it:

- which keys exist: config/load.py's parser tables (_DAEMON, _TOP, _SECTIONS), the only place keys
  are read. KEYS below must name exactly those keys, or this script fails;
- each key's default: config/settings.py's dataclasses, spelled as config.example.yaml writes
  it, and only if the key's own parser reads that spelling back to the same value;
- each key's prose: its comment in config.example.yaml (which tests/unit/config/test_load.py checks
  sets every key), and "How values are written" from the example's header;
- each key's type and range: KEYS below. The test probes every range at its edges through the
  real parser (config.build_settings), so a range the parser no longer keeps fails;
- feature and log-level names, the size and file limits: the constants the parsers use.

thinwatchd(8) (docs/man/thinwatchd.8) is written by hand: it is mostly prose on exit codes,
signals and files, and the test checks it against the argparse parser, errors.py and logs.py.

Why no tool from Debian or PyPI: none reads a config schema. argparse-manpage documents a
command line only; Debian 12's (1.2.2) can set neither the section (8) nor the NAME line's
description (lintian: bad-whatis-entry), and 4.x gives each subcommand a section of its own
("COMMAND 'thinwatchd run'", with its usage text) for three commands and five options, so the
hand-written page plus a test against the parser reads better and cannot drift either. scdoc or
pandoc would only replace the roff escaping here (_text, three lines) with a build dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinwatchd import __version__
from thinwatchd.base.units import sectors_to_bytes
from thinwatchd.config import load as config
from thinwatchd.config.settings import (
    DEFAULT_CONFIG_PATH,
    METADATA_MAX_BYTES,
    DaemonSettings,
    PoolSettings,
)
from thinwatchd.config.strict_yaml import MAX_DEPTH, MAX_VALUES, load_strict_yaml
from thinwatchd.config.values import FEATURES, LOG_LEVELS, METADATA_MIN_BYTES
from thinwatchd.thin.table import MAX_BLOCK_SECTORS, MIN_BLOCK_SECTORS

__all__ = [
    "EXAMPLE_CONFIG",
    "KEYS",
    "PAGE",
    "GenerationError",
    "Key",
    "Probe",
    "config_keys",
    "key_default",
    "key_parser",
    "main",
    "render",
]

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.yaml"
PAGE = REPO / "docs" / "man" / "thinwatchd.yaml.5"


class GenerationError(Exception):
    """The sources disagree (a key without its KEYS entry, an example off its default)."""


def size(n: int) -> str:
    """Return n bytes in the largest binary unit that divides it exactly: 16646400KiB."""
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n and n % 1024**power == 0:
            return f"{n // 1024**power}{unit}"
    return str(n)


@dataclass(frozen=True)
class Probe:
    """A value the page says a key takes (or refuses), for the test to try on the parser."""

    value: object  # as the strict YAML reader gives it: text, None, a bool or a list
    accepted: bool
    # Other keys of the same pool (or of daemon:) the probe needs, dotted as in KEYS.
    beside: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Key:
    """What the page says of a key's values; its default and prose come from elsewhere."""

    kind: str  # what a value is, with its unit
    range: str  # which values the parser takes
    probes: tuple[Probe, ...]


def _key(
    kind: str,
    range_: str,
    ok: Sequence[object] = (),
    bad: Sequence[object] = (),
    also: Sequence[Probe] = (),
) -> Key:
    probes = [Probe(v, True) for v in ok] + [Probe(v, False) for v in bad]
    return Key(kind, range_, (*probes, *also))


_META_MIN, _META_MAX = size(METADATA_MIN_BYTES), size(METADATA_MAX_BYTES)
_BLOCK_LO, _BLOCK_HI = sectors_to_bytes(MIN_BLOCK_SECTORS), sectors_to_bytes(MAX_BLOCK_SECTORS)
_THRESHOLD = _key("percentage", "more than 0%, at most 100%", ("0.5%", "100%"), ("0%", "100.5%"))
_BOOLEAN = _key("boolean", "true or false", (True, False), ("yes", "1"))


def _step(section: str) -> Key:
    return _key(
        "size (bytes)",
        "0 or more; step and step_percent cannot both be 0",
        ("0", "1TiB"),
        ("-1", "20%"),
        (Probe("0", False, {f"{section}.step_percent": "0%"}),),
    )


_STEP_PERCENT = _key("percentage of the file's size", "0% or more", ("0%", "500%"), ("-1%",))

#: Every key: daemon keys as daemon.<key>, a pool's as written under pools.<name> (or defaults).
KEYS: dict[str, Key] = {
    "daemon.check_interval": _key(
        "duration (seconds)", "1s to 1h", ("1s", "1h"), ("999ms", "3601s")
    ),
    "daemon.metrics_file": _key(
        "path",
        "an absolute path to a file, or null (no metrics)",
        ("/var/lib/m.prom", None),
        ("m.prom", "/var/lib/"),
    ),
    "daemon.log_level": _key(
        "level",
        f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}",
        (*LOG_LEVELS, "INFO"),
        ("verbose", "notice"),
    ),
    "daemon.warn_full_within": _key(
        "duration (seconds)", "0s (never) to 720h (30 days)", ("0s", "720h"), ("720h1s", "721h")
    ),
    "data_file": _key(
        "path",
        "an absolute path to a file; required, and no two pools may share a file",
        ("/srv/pool/d",),
        ("srv/pool/d", "/srv/pool/", None),
        (Probe("/srv/pool/m", False, {"metadata_file": "/srv/pool/m"}),),
    ),
    "metadata_file": _key(
        "path",
        "an absolute path to a file; required, and no two pools may share a file",
        ("/srv/pool/m",),
        ("srv/pool/m", "/srv/pool/", None),
    ),
    "data_size": _key(
        "size (bytes)",
        f"at least one data block ({size(_BLOCK_LO)} at the default data_block_size); rounded "
        "down to whole data blocks",
        ("64KiB", "100TiB"),
        ("65535", "0"),
    ),
    "metadata_size": _key(
        "size (bytes)",
        f"{_META_MIN} to {_META_MAX}; rounded down to whole 4KiB blocks",
        (_META_MIN, _META_MAX),
        (size(METADATA_MIN_BYTES - 4096), size(METADATA_MAX_BYTES + 4096)),
    ),
    "data_block_size": _key(
        "512-byte sectors, or a size",
        f"{MIN_BLOCK_SECTORS} to {MAX_BLOCK_SECTORS} sectors in steps of {MIN_BLOCK_SECTORS} "
        f"({size(_BLOCK_LO)} to {size(_BLOCK_HI)} in steps of {size(_BLOCK_LO)}); fixed for an "
        "existing pool",
        (str(MIN_BLOCK_SECTORS), str(MAX_BLOCK_SECTORS), size(_BLOCK_LO), size(_BLOCK_HI)),
        (
            str(MIN_BLOCK_SECTORS // 2),
            str(MIN_BLOCK_SECTORS * 3 // 2),
            str(MAX_BLOCK_SECTORS + MIN_BLOCK_SECTORS),
            size(_BLOCK_LO * 3 // 2),
        ),
    ),
    "low_water_mark": _key("data blocks", "1 or more", ("1", "4096"), ("0", "1.5")),
    "features": _key(
        "list of thin-pool features",
        f"each of {', '.join(FEATURES)} at most once; [] for none",
        ([], list(FEATURES)),
        (["read_only"], [FEATURES[0], FEATURES[0]], "skip_block_zeroing"),
    ),
    "preallocate": _BOOLEAN,
    "direct_io": _BOOLEAN,
    "reserve": _key("size (bytes)", "0 or more", ("0", "1TiB"), ("-1", "5%")),
    "reserve_percent": _key(
        "percentage of the filesystem's size", "0% to below 100%", ("0%", "99.9%"), ("100%",)
    ),
    "data.threshold": _THRESHOLD,
    "data.step": _step("data"),
    "data.step_percent": _STEP_PERCENT,
    "data.max_size": _key(
        "size (bytes), or null",
        "null (no cap of its own), or at least data_size; rounded down to whole data blocks",
        (None, "1GiB"),
        ("1023MiB",),
    ),
    "data.adaptive_low_water": _BOOLEAN,
    "data.crash_room": _BOOLEAN,
    "metadata.threshold": _THRESHOLD,
    "metadata.step": _step("metadata"),
    "metadata.step_percent": _STEP_PERCENT,
    "metadata.max_size": _key(
        "size (bytes)",
        f"at least metadata_size, at most {_META_MAX}",
        ("128MiB", _META_MAX),
        ("127MiB", size(METADATA_MAX_BYTES + 4096)),
    ),
    "when_full.error_after": _key(
        "duration (seconds), or never",
        "0s or more; never (or null) leaves writes queued",
        ("0s", "24h", "never", None),
        ("-1s", "sometimes"),
    ),
}

#: The EXAMPLE section's configuration (the test loads it).
EXAMPLE_CONFIG = """\
daemon:
  metrics_file: /var/lib/prometheus/node-exporter/thinwatchd.prom
defaults:
  reserve: 2GiB
pools:
  docker-pool:
    data_file: /var/lib/thinwatchd/docker-pool/data
    metadata_file: /var/lib/thinwatchd/docker-pool/metadata
    data:
      max_size: 200GiB
  build-pool:
    data_file: /var/lib/thinwatchd/build-pool/data
    metadata_file: /var/lib/thinwatchd/build-pool/metadata
    data_size: 4GiB
    preallocate: false
    when_full:
      error_after: never
"""


def config_keys() -> list[str]:
    """Return every key config/load.py reads, named as in KEYS."""
    keys = [f"daemon.{k}" for k in config._DAEMON]
    keys += list(config._TOP)
    keys += [f"{s}.{k}" for s, parsers in config._SECTIONS.items() for k in parsers]
    return keys


def key_parser(key: str) -> Callable[[object], Any]:
    """Return config/load.py's parser for a key of KEYS."""
    head, _, tail = key.partition(".")
    if head == "daemon":
        return config._DAEMON[tail]
    if tail:
        return config._SECTIONS[head][tail]
    return config._TOP[key]


def key_default(key: str) -> object:
    """Return the key's default from config/settings.py, or dataclasses.MISSING if required."""
    head, _, tail = key.partition(".")
    if head == "daemon":
        return getattr(DaemonSettings(), tail)
    pool_fields = {f.name: f for f in dataclasses.fields(PoolSettings)}
    if tail:
        factory = pool_fields[head].default_factory
        assert callable(factory), head
        return getattr(factory(), config._FIELD_NAMES.get(tail, tail))
    return pool_fields[key].default


def _yaml(value: object) -> str:
    """Return a value as the strict YAML reader gave it, spelled back as YAML."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


@dataclass
class _Example:
    """config.example.yaml: each key's comment, its header's, and its values."""

    header: list[str]
    docs: dict[str, list[str]]  # "daemon", "daemon.check_interval", "pools", "data", "data.step"
    values: dict[str, object]  # the same keys' values (sections left out)


_KEY_LINE = re.compile(r"( *)([A-Za-z0-9_.-]+):")


def _read_example(text: str) -> _Example:
    header: list[str] | None = None
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    docs: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip(" ")
        if stripped.startswith("#"):
            body = stripped[1:]
            pending.append(body[1:] if body.startswith(" ") else body)
            continue
        if not stripped:
            if header is None and pending:
                header = pending
            pending = []
            continue
        found = _KEY_LINE.match(line)
        if found is None:
            raise GenerationError(f"{EXAMPLE}:{number}: not a key line: {line!r}")
        indent = len(found[1])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, found[2]))
        docs[_example_path([name for _, name in stack])] = pending
        pending = []
    loaded = load_strict_yaml(text)
    assert isinstance(loaded, dict)
    (pool,) = loaded["pools"].values()
    values: dict[str, object] = {f"daemon.{k}": v for k, v in loaded["daemon"].items()}
    for key, value in pool.items():
        if isinstance(value, dict):
            values |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            values[key] = value
    return _Example(header or [], docs, values)


def _example_path(names: list[str]) -> str:
    """Name a key of the example as KEYS does (the pool's own name left out)."""
    if names[0] == "pools" and len(names) > 1:
        return ".".join(names[2:]) or "pools.<name>"
    return ".".join(names)


# --- roff ---------------------------------------------------------------------------------------


def _text(line: str) -> str:
    """Escape one line of running text for roff."""
    line = line.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + line if line.startswith((".", "'")) else line


def _bold(word: str) -> str:
    return f"\\fB{_text(word)}\\fR"


_DEFINITION = re.compile(r"(?P<indent> +)(?P<term>\S+(?: \S+)*) {2,}(?P<text>\S.*)")


def _blocks(lines: list[str]) -> Iterator[tuple[str, list[Any]]]:
    """Split a comment into blocks: ("text", lines), ("defs", [(term, lines)]) for an indented
    term with its text two spaces on (continued at the text's column), and ("pre", lines) for
    other indented lines, kept as they are."""
    kind, column = "", 0
    items: list[Any] = []
    for line in [*lines, ""]:
        indent = len(line) - len(line.lstrip(" "))
        definition = _DEFINITION.fullmatch(line)
        if kind == "defs" and line.strip() and indent == column:
            items[-1][1].append(line.strip())
            continue
        if not line.strip():
            new = ""
        elif indent == 0:
            new = "text"
        elif definition is not None:
            new = "defs"
        else:
            new = "pre"
        if new != kind or not new:
            if kind:
                yield kind, items
            kind, items = new, []
        if new == "text":
            items.append(line.strip())
        elif new == "defs" and definition is not None:
            items.append((definition["term"], [definition["text"]]))
            column = definition.start("text")
        elif new == "pre":
            items.append(line)


def _prose(lines: list[str], paragraph: str, nested: bool, lead: bool = True) -> list[str]:
    """Roff for a comment's lines. paragraph starts each paragraph (.PP, or .IP inside a .TP),
    but the first only if lead; nested: inside a .TP, whose indentation it keeps."""
    out: list[str] = []
    for kind, items in _blocks(lines):
        if kind == "text":
            out += [paragraph] if out or lead else []
            out.append(_text(" ".join(items)))
        elif kind == "defs":
            out += [".RS"] if nested else []
            for term, text in items:
                out += [".TP", _bold(term), _text(" ".join(text))]
            out += [".RE"] if nested else []
        else:
            common = min(len(x) - len(x.lstrip(" ")) for x in items)
            out += [".RS", ".PP" if not nested else ".IP", ".nf"]
            out += [_text(x[common:]) for x in items]
            out += [".fi", ".RE"]
    return out


# --- The page -----------------------------------------------------------------------------------


def render() -> str:
    """Return the page's roff source."""
    example = _read_example(EXAMPLE.read_text(encoding="utf-8"))
    keys = config_keys()
    if set(KEYS) != set(keys):
        raise GenerationError(
            f"tools/man_pages.py KEYS lacks {sorted(set(keys) - set(KEYS))} and has "
            f"{sorted(set(KEYS) - set(keys))} that config/load.py does not read"
        )
    documented = [k for k in example.docs if k in KEYS]
    if set(documented) != set(keys):
        raise GenerationError(
            f"config.example.yaml does not set {sorted(set(keys) - set(documented))}"
        )
    defaults = {key: _shown_default(key, example.values[key]) for key in keys}
    check = load_strict_yaml(EXAMPLE_CONFIG)
    config.build_settings(check)  # raises ConfigError if the EXAMPLE section is wrong

    def entries(group_keys: list[str], shown: Callable[[str], str]) -> list[str]:
        out: list[str] = []
        for group in _groups(group_keys, example.docs):
            for i, key in enumerate(group):
                out += [".TP" if i == 0 else ".TQ", _bold(shown(key))]
            for i, key in enumerate(group):
                spec = KEYS[key]
                prefix = f"{_bold(shown(key))}: " if len(group) > 1 else ""
                out += [".br"] if i else []
                out.append(
                    f"{prefix}\\fI{_text(spec.kind)}\\fR: {_text(spec.range)}. "
                    f"Default: {defaults[key]}."
                )
            out += _prose(example.docs[group[0]], ".IP", nested=True)
        return out

    daemon = [k for k in documented if k.startswith("daemon.")]
    top = [k for k in documented if k in config._TOP]
    page = _HEAD.format(version=__version__, config=_text(str(DEFAULT_CONFIG_PATH)))
    lines = page.splitlines()
    lines += _description()
    lines += [".SH VALUES", *_values(example.header)]
    lines += [".SH DAEMON SETTINGS", "Under", _bold("daemon") + ":"]
    lines += entries(daemon, lambda k: k.partition(".")[2])
    lines += [".SH DEFAULTS", *_prose(example.docs["defaults"], ".PP", False, lead=False)]
    lines += [".SH POOLS", *_prose(example.docs["pools"], ".PP", False, lead=False)]
    lines += [
        ".PP",
        "Each pool's settings follow: the keys under",
        f"{_bold('pools.')}\\fIname\\fB.\\fR (or {_bold('defaults')}), named as written there.",
        "An error message names a key in full, as in",
        f"{_bold('pools.docker-pool.data.step')}.",
    ]
    lines += entries(top, lambda k: k)
    for section in config._SECTIONS:
        lines += [f".SS {section}", *_prose(example.docs[section], ".PP", False, lead=False)]
        lines += entries([k for k in documented if k.startswith(f"{section}.")], lambda k: k)
    lines += [".SH EXAMPLE", ".PP", ".RS", ".nf"]
    lines += [_text(line) for line in EXAMPLE_CONFIG.splitlines()]
    lines += [".fi", ".RE", *_TAIL.format(config=_text(str(DEFAULT_CONFIG_PATH))).splitlines()]
    return "\n".join(lines) + "\n"


def _shown_default(key: str, written: object) -> str:
    """Return roff for the key's default, as the example writes it, if it reads back as the
    default in config/settings.py; fail otherwise."""
    default = key_default(key)
    if default is dataclasses.MISSING:
        return "none (required)"
    parsed = key_parser(key)(written)
    if parsed != default:
        raise GenerationError(
            f"config.example.yaml sets {key}: {_yaml(written)}, which reads as {parsed!r}, but "
            f"its default in config/settings.py is {default!r}"
        )
    return _bold(_yaml(written))


def _groups(keys: list[str], docs: Mapping[str, list[str]]) -> Iterator[list[str]]:
    """Group each key without a comment of its own with the key before it, which it shares."""
    group: list[str] = []
    for key in keys:
        if group and not docs[key]:
            group.append(key)
            continue
        if group:
            yield group
        group = [key]
    if group:
        yield group


def _description() -> list[str]:
    limit = size(config.MAX_CONFIG_BYTES)
    return f"""\
.SH DESCRIPTION
.BR thinwatchd (8)
reads its configuration from this YAML file, or from the one given with
\\fB\\-\\-config\\fR.
It has three sections:
.TP
.B daemon
settings of the daemon as a whole (DAEMON SETTINGS below);
.TP
.B defaults
pool settings for every pool that does not set them itself (DEFAULTS);
.TP
.B pools
the pools, by name, at least one (POOLS).
.PP
Every key is optional except
.B pools
and each pool's
.B data_file
and
.BR metadata_file ;
a key left out takes the default given below.
.PP
.B thinwatchd check\\-config
checks the file.
.B systemctl reload thinwatchd
applies an edited file: the new policy at once, and any new pool is built.
A pool removed from the file is left running, never torn down.
If the edited file is broken, the daemon logs why and keeps its previous configuration.
.PP
The file decides which files root formats and grows, so it is refused unless it is a regular
file of at most {limit}, nested at most {MAX_DEPTH} levels deep with at most {MAX_VALUES}
values, owned by root (or by the user running thinwatchd) and writable by nobody else, in
directories up to
.I /
that are owned and writable alike or sticky, as
.I /tmp
is.
The error says which
.B chown
or
.B chmod
fixes it.
""".splitlines()


def _values(header: list[str]) -> list[str]:
    """The example header's "How values are written", as a definition list."""
    try:
        start = header.index("How values are written") + 1
    except ValueError:
        raise GenerationError(
            "config.example.yaml's header has no 'How values are written'"
        ) from None
    block = []
    for line in header[start:]:
        if not line.startswith(" "):
            break
        block.append(line)
    return _prose(block, ".PP", nested=False)


_HEAD = """\
.\\" thinwatchd.yaml(5): generated by tools/man_pages.py from thinwatchd/config/load.py,
.\\" thinwatchd/config/settings.py and config.example.yaml. Do not edit: change those, then run
.\\" .venv/bin/python -m tools.man_pages (tests/unit/test_man_pages.py fails until then).
.TH THINWATCHD.YAML 5 "" "thinwatchd {version}" "File Formats Manual"
.nh
.ad l
.SH NAME
thinwatchd.yaml \\- configuration file of thinwatchd, the thin pool growing daemon
.SH SYNOPSIS
.I {config}
"""

_TAIL = """\
.SH FILES
.TP
.I {config}
The configuration file.
.SH SEE ALSO
.BR thinwatchd (8),
.BR dmsetup (8),
.BR thin_check (8),
.BR systemd.exec (5),
.BR systemctl (1)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.man_pages", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say if the page is stale")
    args = parser.parse_args(argv)
    try:
        text = render()
    except GenerationError as exc:
        print(f"tools/man_pages.py: {exc}", file=sys.stderr)
        return 2
    old = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
    if text == old:
        return 0
    if args.check:
        diff = difflib.unified_diff(
            old.splitlines(keepends=True), text.splitlines(keepends=True), str(PAGE), "generated"
        )
        sys.stdout.writelines(diff)
        print(f"{PAGE} is stale: run .venv/bin/python -m tools.man_pages", file=sys.stderr)
        return 1
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
