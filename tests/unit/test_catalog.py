"""The journal catalog (systemd/thinwatchd.catalog): one entry per MessageId, each read by
systemd's own parser (journalctl --update-catalog into a scratch root) exactly as written, and
each @FIELD@ it substitutes one that every log call of that MESSAGE_ID sends (found in the
source, so a field dropped from a call fails here rather than print a bare name in
`journalctl -x`). tests/systemd/test_catalog.py shows it under a real entry in the guest."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from thinwatchd.base.logs import MessageId

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "systemd" / "thinwatchd.catalog"
PACKAGE = REPO / "thinwatchd"

_ID_LINE = re.compile(r"-- ([0-9a-f]{32})")
_FIELD = re.compile(r"@([A-Z0-9_]+)@")


@dataclass(frozen=True)
class Entry:
    message_id: str
    headers: tuple[tuple[str, str], ...]
    body: str

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def text(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.headers) + "\n" + self.body


def parse_catalog(text: str) -> list[Entry]:
    """Read catalog text as systemd's catalog_import_file() does: comments dropped, an entry
    from each "-- <id>" line, its headers up to the first empty line, then its body (inner
    empty lines kept, trailing ones dropped). A line before the first id must be a comment."""
    entries: list[Entry] = []
    current: tuple[str, list[tuple[str, str]], list[str]] | None = None
    in_body = False

    def close() -> None:
        if current is not None:
            message_id, headers, body = current
            entries.append(Entry(message_id, tuple(headers), "\n".join(body).strip("\n")))

    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        found = _ID_LINE.fullmatch(line)
        if found:
            close()
            current, in_body = (found[1], [], []), False
            continue
        if current is None:
            assert not line.strip(), f"line {number}: text before the first entry: {line!r}"
            continue
        if in_body:
            current[2].append(line)
        elif not line.strip():
            in_body = True
        else:
            key, colon, value = line.partition(": ")
            assert colon and re.fullmatch(r"[A-Za-z-]+", key), f"line {number}: {line!r}"
            current[1].append((key, value))
    close()
    return entries


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return parse_catalog(CATALOG.read_text(encoding="utf-8"))


def test_every_message_id_has_exactly_one_entry(entries: list[Entry]) -> None:
    counts = Counter(e.message_id for e in entries)
    ours = {m.value: m.name for m in MessageId}
    assert {i: n for i, n in counts.items() if n > 1} == {}, "an id with two entries"
    missing = sorted(name for value, name in ours.items() if value not in counts)
    assert missing == [], "MessageIds without a catalog entry"
    assert sorted(set(counts) - set(ours)) == [], "entries for no MessageId"


def test_each_entry_says_who_defined_it_and_where_to_read_more(entries: list[Entry]) -> None:
    for e in entries:
        assert len(e.header("Subject")) == 1 and e.header("Subject")[0].strip(), e.message_id
        assert e.header("Defined-By") == ["thinwatchd"], e.message_id
        assert e.header("Support") == ["man:thinwatchd(8)"], e.message_id
        assert "man:thinwatchd(8)" in e.header("Documentation"), e.message_id
        # What happened and what to do: more than a restated subject.
        assert len(e.body.split()) >= 30, e.message_id


# --- The fields each MESSAGE_ID is logged with, read from the source ---------------------------


def _message_ids(node: ast.expr) -> set[str]:
    """The MessageId members an argument names: MessageId.X, or either of a conditional."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "MessageId"
    ):
        return {MessageId[node.attr].value}
    if isinstance(node, ast.IfExp):
        return _message_ids(node.body) | _message_ids(node.orelse)
    return set()


def _always(node: ast.expr | None, names: dict[str, list[ast.expr]]) -> set[str]:
    """The fields a fields argument always holds: dict literals' keys, `|` of them, POOL from
    pool_fields() (and the journal's fields(), which calls it), what both arms of a conditional
    hold, and a local name assigned once. Anything else holds nothing for sure."""
    if isinstance(node, ast.Dict):
        return {
            k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
        }
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _always(node.left, names) | _always(node.right, names)
    if isinstance(node, ast.IfExp):
        return _always(node.body, names) & _always(node.orelse, names)
    if isinstance(node, ast.Call):
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return {"POOL"} if called in ("pool_fields", "fields") else set()
    if isinstance(node, ast.Name) and len(names.get(node.id, [])) == 1:
        return _always(names[node.id][0], names)
    return set()


@pytest.fixture(scope="module")
def sites() -> dict[str, list[set[str]]]:
    return sent_fields()


def sent_fields() -> dict[str, list[set[str]]]:
    """For each MESSAGE_ID, the fields each event() call logging it always sends."""
    sites: dict[str, list[set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            names: dict[str, list[ast.expr]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if isinstance(target, ast.Name):
                        names.setdefault(target.id, []).append(node.value)
            for node in ast.walk(function):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id == "event"
                ):
                    continue
                args: list[ast.expr | None] = [*node.args, None, None, None, None]
                keywords = {k.arg: k.value for k in node.keywords}
                ids = _message_ids(keywords.get("message_id") or args[1])  # type: ignore[arg-type]
                fields = _always(keywords.get("fields", args[3]), names)
                assert ids, f"{path}:{node.lineno}: event() without a MessageId.X"
                for message_id in ids:
                    sites.setdefault(message_id, []).append(fields)
    return sites


def test_the_field_reader_sees_what_the_code_sends(sites: dict[str, list[set[str]]]) -> None:
    grown = sites[MessageId.DATA_GROWN.value]
    assert {"POOL", "TARGET", "OLD_SIZE_BYTES", "NEW_SIZE_BYTES"} <= set.intersection(*grown)
    assert "DIRTY_BYTES" not in set.intersection(*grown)  # only with a writeback sample
    (created,) = sites[MessageId.POOL_CREATED.value]
    assert created == {"POOL", "ACTIVATION"}  # through a local name
    mode = set.intersection(*sites[MessageId.POOL_MODE_CHANGED.value])
    assert mode == {"POOL"}  # NEEDS_CHECK and NO_SPACE_POLICY each from one of two calls


def test_every_message_id_is_logged(sites: dict[str, list[set[str]]]) -> None:
    unused = sorted(m.name for m in MessageId if m.value not in sites)
    assert unused == [], "a MessageId no event() call logs"


def test_substituted_fields_are_sent_with_every_entry(
    entries: list[Entry], sites: dict[str, list[set[str]]]
) -> None:
    for e in entries:
        used = set(_FIELD.findall(e.text()))
        always = set.intersection(*sites[e.message_id])
        name = MessageId(e.message_id).name
        assert used <= always, (
            f"{name}'s catalog entry substitutes {sorted(used - always)}, which not every "
            f"event() call for it sends (always sent: {sorted(always)}); journalctl -x would "
            "print the bare field name"
        )


# --- systemd's own parser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def journalctl() -> str:
    path = shutil.which("journalctl")
    if path is None:
        pytest.fail("journalctl is missing: this test needs systemd's (Debian: package systemd)")
    return path


def test_systemd_reads_every_entry_as_written(
    journalctl: str, entries: list[Entry], tmp_path: Path
) -> None:
    catalogs = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalogs.mkdir(parents=True)
    shutil.copy(CATALOG, catalogs / "thinwatchd.catalog")

    def run(*args: str) -> str:
        done = subprocess.run(
            [journalctl, f"--root={tmp_path}", *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and not done.stderr, done.stderr
        return done.stdout

    run("--update-catalog")
    assert (tmp_path / "var" / "lib" / "systemd" / "catalog" / "database").is_file()
    listed = run("--list-catalog").splitlines()
    assert sorted(listed) == sorted(
        f"{e.message_id} thinwatchd: {e.header('Subject')[0]}" for e in entries
    )
    # journalctl prints each entry back from its database: as we read it, nothing merged into
    # a neighbour (a malformed id line), dropped (a '#' in a body) or added.
    dumped = {e.message_id: e for e in parse_catalog(run("--dump-catalog"))}
    assert dumped == {e.message_id: e for e in entries}
