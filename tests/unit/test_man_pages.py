"""The man pages (docs/man/): thinwatchd.yaml(5) is what tools/man_pages.py makes of the code
now, and says of each key what the parser does (its default, and its range probed at the edges);
thinwatchd(8) names every command and option of the argparse parser and no other, every exit
code and MESSAGE_ID; and both format without a warning from groff, as lintian runs it."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from thinwatchd import __version__
from thinwatchd.base import errors
from thinwatchd.base.errors import ConfigError
from thinwatchd.base.logs import MessageId
from thinwatchd.cli import _parser
from thinwatchd.config.load import build_settings, parse_settings
from thinwatchd.config.settings import DEFAULT_CONFIG_PATH
from thinwatchd.config.strict_yaml import load_strict_yaml
from thinwatchd.daemon.instance_lock import DEFAULT_LOCK_PATH
from thinwatchd.publish.estimates import ESTIMATES_NAME
from tools import man_pages
from tools.man_pages import KEYS, Probe

REPO = Path(__file__).resolve().parents[2]
DAEMON_PAGE = REPO / "docs" / "man" / "thinwatchd.8"
CONFIG_PAGE = REPO / "docs" / "man" / "thinwatchd.yaml.5"
UNIT = REPO / "systemd" / "thinwatchd.service"


def unescape(roff: str) -> str:
    """Roff text as a reader sees it, near enough: fonts dropped, escapes undone."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    return text.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")


_FONT_MACRO = re.compile(r"\.(B|I|BR|RB|BI|IB|IR|RI) (.*)")
_REQUEST = re.compile(r"\.[A-Za-z]+|\.\\\".*")


def reader(line: str) -> str:
    """One source line as a reader sees it: .B and .I join their words with spaces, .BR and
    the other alternating macros with none (".BR auto | journal" reads "auto|journal")."""
    found = _FONT_MACRO.fullmatch(line)
    if found:
        lexer = shlex.shlex(found[2], posix=True)
        lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""
        line = (" " if found[1] in ("B", "I") else "").join(lexer)
    return unescape(line)


def prose(lines: list[str]) -> str:
    """The text of lines as one line, requests (.TP, .PP, .nf, comments) left out."""
    return " ".join(reader(x) for x in lines if not _REQUEST.fullmatch(x))


def sections(page: str) -> dict[str, list[str]]:
    """Each .SH section's source lines, by title."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in page.splitlines():
        if line.startswith(".SH "):
            current = found.setdefault(line[4:].strip('"'), [])
        else:
            current.append(line)
    return found


def tags(lines: list[str]) -> list[str]:
    """The tag of each .TP/.TQ item in lines, as a reader sees it."""
    return [reader(line) for before, line in itertools.pairwise(lines) if before in (".TP", ".TQ")]


def tag_options(tag: str) -> set[str]:
    """The options an OPTIONS tag names: "-h, --help" both, "--config file" --config."""
    return {part.split()[0] for part in tag.split(",")}


# --- thinwatchd.yaml(5) -------------------------------------------------------------------------


def test_config_page_is_generated_from_the_code_as_it_is() -> None:
    text = man_pages.render()
    assert CONFIG_PAGE.read_text(encoding="utf-8") == text, (
        f"{CONFIG_PAGE.relative_to(REPO)} is stale: run .venv/bin/python -m tools.man_pages"
    )


def test_the_generator_knows_exactly_the_keys_config_reads() -> None:
    assert sorted(KEYS) == sorted(man_pages.config_keys())


def page_defaults() -> dict[str, str]:
    """Each key's default as the committed page shows it, under KEYS's name for the key."""
    found: dict[str, str] = {}
    section, tag = "", ""
    lines = CONFIG_PAGE.read_text(encoding="utf-8").splitlines()
    summary = re.compile(r"(?:\\fB(?P<key>[^\\]+)\\fR: )?\\fI.*Default: (?P<default>.*)\.")
    for before, line in itertools.pairwise(["", *lines]):
        if line.startswith(".SH "):
            section = line[4:]
        if before == ".TP":
            tag = reader(line)
        shown = summary.fullmatch(line)
        if shown:
            key = unescape(shown["key"] or tag)
            key = f"daemon.{key}" if section == "DAEMON SETTINGS" else key
            found[key] = unescape(shown["default"])
    return found


def test_config_page_gives_every_key_its_default_from_settings() -> None:
    defaults = page_defaults()
    assert sorted(defaults) == sorted(KEYS)
    for key, shown in defaults.items():
        default = man_pages.key_default(key)
        if shown == "none (required)":
            assert default is dataclasses.MISSING, key
            continue
        written = load_strict_yaml(f"v: {shown}")
        assert isinstance(written, dict)
        parsed = man_pages.key_parser(key)(written["v"])
        assert parsed == default, f"{key}: the page says {shown}, settings.py has {default!r}"


def config_with(key: str, value: object, beside: dict[str, object]) -> dict[str, Any]:
    """A config of one pool "p" with key (as KEYS names it) set to value, and beside's keys."""
    daemon: dict[str, Any] = {}
    pool: dict[str, Any] = {"data_file": "/srv/pool/data", "metadata_file": "/srv/pool/meta"}
    for name, v in {**beside, key: value}.items():
        head, _, tail = name.partition(".")
        if head == "daemon":
            daemon[tail] = v
        elif tail:
            pool.setdefault(head, {})[tail] = v
        else:
            pool[name] = v
    return {"daemon": daemon, "pools": {"p": pool}}


PROBES = [(key, probe) for key, spec in KEYS.items() for probe in spec.probes]


@pytest.mark.parametrize(
    ("key", "probe"),
    PROBES,
    ids=[f"{k}={p.value!r}{'+' if p.beside else ''}" for k, p in PROBES],
)
def test_each_range_the_page_gives_is_the_parsers(key: str, probe: Probe) -> None:
    config = config_with(key, probe.value, dict(probe.beside))
    if probe.accepted:
        build_settings(config)
        return
    with pytest.raises(ConfigError) as refused:
        build_settings(config)
    where = re.sub(r"\[\d+\]$", "", refused.value.key_path.removeprefix("pools.p."))
    assert where in {key, *probe.beside}, refused.value


def test_every_key_has_a_probe_each_way() -> None:
    for key, spec in KEYS.items():
        assert {p.accepted for p in spec.probes} == {True, False}, key


def test_config_page_example_loads() -> None:
    lines = sections(CONFIG_PAGE.read_text(encoding="utf-8"))["EXAMPLE"]
    body = lines[lines.index(".nf") + 1 : lines.index(".fi")]
    settings = parse_settings("\n".join(unescape(x) for x in body), "the EXAMPLE")
    assert len(settings.pools) == 2


# --- thinwatchd(8) ------------------------------------------------------------------------------


def daemon_page() -> str:
    return DAEMON_PAGE.read_text(encoding="utf-8")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_daemon_page_describes_every_command() -> None:
    assert tags(sections(daemon_page())["COMMANDS"]) == list(subcommands())


def test_daemon_page_describes_every_option_and_no_other() -> None:
    page = daemon_page()
    subsections: dict[str, list[str]] = {"": []}
    current = subsections[""]
    for line in sections(page)["OPTIONS"]:
        if line.startswith(".SS Options of "):
            current = subsections.setdefault(line.removeprefix(".SS Options of "), [])
        else:
            current.append(line)
    shared = option_strings(_parser())
    documented = set().union(*(tag_options(t) for t in tags(subsections[""])))
    assert documented == shared, "the options of thinwatchd itself"
    for name, sub in subcommands().items():
        own = option_strings(sub) - shared
        listed = set().union(*(tag_options(t) for t in tags(subsections.get(name, []))))
        assert listed == own, f"the options of thinwatchd {name}"
    assert set(subsections) - {""} <= set(subcommands())
    # Every long option the page writes is one of ours, or another tool's it quotes.
    written = set(re.findall(r"--[a-z][a-z-]*", prose(page.splitlines())))
    ours = shared.union(*(option_strings(s) for s in subcommands().values()))
    assert written - ours == {"--now", "--update-catalog"}  # systemctl's, journalctl's


def test_daemon_page_gives_the_choices_and_defaults() -> None:
    page = daemon_page()
    (target,) = [a for a in subcommands()["run"]._actions if "--log-target" in a.option_strings]
    assert target.choices is not None
    assert f"--log-target {'|'.join(target.choices)}" in tags(sections(page)["OPTIONS"])
    text = prose(page.splitlines())
    assert f"{target.default} (the default)" in text
    for needed in (str(DEFAULT_CONFIG_PATH), str(DEFAULT_LOCK_PATH), ESTIMATES_NAME):
        assert f"(default {needed})" in text or needed == ESTIMATES_NAME, needed
    files = tags(sections(page)["FILES"])
    for path in (
        DEFAULT_CONFIG_PATH,
        DEFAULT_LOCK_PATH,
        DEFAULT_LOCK_PATH.with_name(ESTIMATES_NAME),
    ):
        assert str(path) in files


def test_daemon_page_explains_every_exit_status() -> None:
    page = daemon_page()
    listed = tags(sections(page)["EXIT STATUS"])
    sysexits = {v for k, v in vars(errors).items() if k.startswith("EX_")}
    assert sorted(int(code) for code in listed) == sorted({0, 1, 130} | sysexits)
    found = re.search(r"^RestartPreventExitStatus=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert found is not None
    codes = found[1].split()
    said = f"{', '.join(codes[:-1])} or {codes[-1]}"
    assert f"does not restart the daemon after {said}" in prose(page.splitlines())


def test_daemon_page_lists_every_message_id() -> None:
    journal = tags(sections(daemon_page())["JOURNAL"])
    assert sorted(journal) == sorted(m.value for m in MessageId)


@pytest.mark.parametrize("page", [DAEMON_PAGE, CONFIG_PAGE], ids=lambda p: p.name)
def test_page_header_names_this_version_and_its_section(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    name, _, section = page.name.rpartition(".")
    head = re.search(r'^\.TH (\S+) (\d) "" "thinwatchd (\S+)"', text, re.MULTILINE)
    assert head is not None
    assert (head[1], head[2], head[3]) == (name.upper(), section, __version__)
    # lintian's bad-whatis-entry: lexgrog wants "name \- description" first under NAME.
    assert text.split(".SH NAME\n", 1)[1].startswith(name + " \\- ")


# --- groff, as lintian runs it ------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's man-db (scripts/bootstrap)")
    return path


@pytest.mark.parametrize("width", ["80", "120"])
@pytest.mark.parametrize("page", [DAEMON_PAGE, CONFIG_PAGE], ids=lambda p: p.name)
def test_man_formats_the_page_without_a_warning(page: Path, width: str) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "MANROFFSEQ": ""}
    done = subprocess.run(
        [_tool("man"), "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
        capture_output=True,
        text=True,
        env=env | {"MANWIDTH": width},
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    whatis = subprocess.run(
        [_tool("lexgrog"), str(page)], capture_output=True, text=True, env=env, check=False
    )
    name = page.name.rpartition(".")[0]
    assert whatis.returncode == 0 and f'"{name} - ' in whatis.stdout, whatis.stdout + whatis.stderr
