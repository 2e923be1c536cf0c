"""Fuzzing the real loader: any config file gives Settings or one ConfigError line, in a second.

Documents are mutations of config.example.yaml (lines deleted, duplicated, swapped, re-indented;
keys and values replaced, types swapped, random text and bytes, deep nesting and alias bombs
inserted, the file truncated) and random YAML trees, anchors and aliases among them. Each goes
through a real file, most through `thinwatchd check-config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinwatchd.base.errors import EX_CONFIG, ConfigError
from thinwatchd.cli import main
from thinwatchd.config.load import load_settings
from thinwatchd.config.settings import PoolSettings, Settings

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.yaml"
EXAMPLE_LINES = EXAMPLE.read_text().splitlines(keepends=True)
#: The example without its comments parses four times faster, so it gets more mutations.
BARE_LINES = [line for line in EXAMPLE_LINES if line.strip() and not line.lstrip().startswith("#")]

KEYS = st.sampled_from(
    [
        *(f.name for f in dataclasses.fields(PoolSettings) if f.name != "name"),
        *("daemon", "defaults", "pools", "docker-pool", "data", "metadata", "when_full"),
        *("threshold", "step", "step_percent", "max_size", "adaptive_low_water", "error_after"),
        *("check_interval", "metrics_file", "log_level", "<<", "? a", "- a", "", "control"),
    ]
)
#: Values that reach the validators' corners, types swapped, and YAML that changes the structure.
SPECIAL_VALUES = st.sampled_from(
    [
        "0",
        "-1",
        "1",
        "128",
        "2097152",
        "010",
        "0x10",
        "1:30",
        "1e999",
        "-0",
        "NaN",
        ".inf",
        "9" * 400,
        "1G",
        "1 gig",
        "64KiB",
        "16646400KiB",
        "9E",
        "80%",
        "0.8",
        "100.1%",
        "-5%",
        "10s",
        "500ms",
        "2h",
        "never",
        "null",
        "~",
        "true",
        "yes",
        "off",
        "/a",
        "/a/",
        "a/b",
        "/var/lib/thinwatchd/docker-pool/data",
        "[]",
        "[skip_block_zeroing]",
        "[read_only]",
        "{}",
        "{a: 1}",
        "[[x]]",
        "&x 5",
        "*x",
        "*undefined",
        "!!int 5",
        "!!python/object:os.system",
        "!!binary aGk=",
        '"\\x00"',
        '"\\u2028"',
        "'a''b'",
        "|\n  text",
        ">-\n  text",
        "? [a]",
        "- a",
        "a: b: c",
        "{",
        "[",
        "'",
        '"',
        "&a [*a]",
        "<<: *x",
        "\t",
        "%",
        "@",
        "`",
    ]
)
#: Any character but controls (YAML refuses them: inserted bytes below bring a few of those).
UNICODE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
VALUES = st.one_of(SPECIAL_VALUES, st.integers().map(str), st.floats().map(str), UNICODE)


@st.composite
def mutated(draw: st.DrawFn, lines: list[str]) -> bytes:
    """Return the lines after 1 to 4 random edits, as bytes, perhaps truncated or with bad bytes."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip(" "))]
        key, colon, _ = line.strip().partition(":")
        edit = draw(
            st.sampled_from(
                [
                    *("delete", "duplicate", "swap", "value", "key", "indent", "insert"),
                    *("unicode", "nest", "laughs"),
                ]
            )
        )
        if edit == "delete":
            del lines[i]
        elif edit == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif edit == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif edit == "value" and colon:
            lines[i] = f"{indent}{key}: {draw(VALUES)}\n"
        elif edit == "key":
            rest = line.strip().partition(":")[2] if colon else " " + line.strip()
            lines[i] = f"{indent}{draw(KEYS)}:{rest}\n"
        elif edit == "indent":
            lines[i] = " " * draw(st.integers(0, 12)) + line.lstrip(" ")
        elif edit == "insert":
            lines.insert(i, indent + draw(VALUES) + "\n")
        elif edit == "nest":  # deep nesting made the parser recurse, and slowly
            opener = draw(st.sampled_from(["[", "{a: ", "- "]))
            depth = draw(st.sampled_from([10, 100, 1000, 10_000, 100_000]))
            lines[i] = f"{indent}{key or 'k'}: {opener * depth}\n"
        elif edit == "laughs":  # each level refers to the one before ten times
            levels = draw(st.integers(1, 9))
            refs = [", ".join([f"*a{n - 1}"] * 10) for n in range(1, levels + 1)]
            laughs = [
                f"a0: &a0 [{draw(VALUES)!r}]",
                *(f"a{n + 1}: &a{n + 1} [{r}]" for n, r in enumerate(refs)),
            ]
            lines[i : i + 1] = [f"{indent}{laugh}\n" for laugh in laughs]
            lines.insert(i + len(laughs), f"{indent}{key or 'k'}: *a{levels}\n")
        else:  # random unicode anywhere in the line
            at = draw(st.integers(0, len(line)))
            lines[i] = line[:at] + draw(UNICODE) + line[at:]
    data = "".join(lines).encode("utf-8", "surrogatepass")
    # (sampled_from, not integers: Hypothesis favours the ends of a range, here 0, and so empty.)
    if draw(st.sampled_from([False] * 7 + [True])):
        data = data[: draw(st.sampled_from(range(len(data) + 1)))]
    if draw(st.sampled_from([False] * 15 + [True])):  # bytes not UTF-8, or control characters
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))


def _tree(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    keys = st.one_of(KEYS, st.text(max_size=8), st.integers(), st.booleans())
    collections = st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=6),
    )
    # The same object twice is dumped as an anchor and an alias.
    return st.one_of(collections, collections.map(lambda c: [c, c]))


TREES = st.recursive(SCALARS | SPECIAL_VALUES, _tree, max_leaves=25)
#: Random trees, often under `pools:`, and pools with their files, so the validators see them.
POOLS = st.dictionaries(KEYS, TREES, max_size=4).map(
    lambda pool: {"pools": {"p": {"data_file": "/d", "metadata_file": "/m", **pool}}}
)
DOCUMENTS = st.one_of(
    TREES,
    st.fixed_dictionaries({"pools": TREES}, optional={"daemon": TREES, "defaults": TREES}),
    POOLS,
    POOLS,
)


@st.composite
def dumped(draw: st.DrawFn) -> bytes:
    """Return a random tree in one of YAML's styles."""
    text = yaml.dump(
        draw(DOCUMENTS),
        Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),  # libyaml's is ten times faster
        default_flow_style=draw(st.sampled_from([None, True, False])),
        default_style=draw(st.sampled_from([None, '"', "'"])),
        allow_unicode=draw(st.booleans()),
    )
    return text.encode("utf-8", "surrogatepass")


def _load(path: Path, data: bytes) -> None:
    """Load data from a real file: Settings or one ConfigError line, and nothing else."""
    path.write_bytes(data)
    try:
        result = load_settings(path)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(result, Settings) and result.pools


FUZZ = settings(
    deadline=1000,  # milliseconds, for each document
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(FUZZ, max_examples=2500)
@given(mutated(EXAMPLE_LINES))
def test_check_config_on_mutated_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    code = main(["--config", str(path), "check-config"])
    out, err = capsys.readouterr()
    assert code in (0, EX_CONFIG), err
    if code == EX_CONFIG:
        assert err.startswith("thinwatchd: ") and err.count("\n") == 1 and not out, err
    else:
        assert out.startswith(f"{path}: OK") and not err


@settings(FUZZ, max_examples=1800)
@given(mutated(BARE_LINES))
def test_loader_on_mutated_bare_example(tmp_path: Path, data: bytes) -> None:
    _load(tmp_path / "config.yaml", data)


@settings(FUZZ, max_examples=1200)  # 2500 + 1800 + 1200 documents in about 20 s of CPU
@given(dumped())
def test_loader_on_random_trees(tmp_path: Path, data: bytes) -> None:
    _load(tmp_path / "config.yaml", data)
