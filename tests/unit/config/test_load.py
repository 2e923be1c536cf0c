"""Unit tests for thinwatchd.config.load: YAML in, validated Settings or one ConfigError out."""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from thinwatchd.base.errors import EX_CONFIG, ConfigError
from thinwatchd.base.units import Bytes, DataBlocks, Sectors
from thinwatchd.config import strict_yaml
from thinwatchd.config.load import MAX_CONFIG_BYTES, build_settings, load_settings, parse_settings
from thinwatchd.config.settings import (
    METADATA_MAX_BYTES,
    DaemonSettings,
    DataGrowth,
    MetadataGrowth,
    NoSpaceSettings,
    PoolSettings,
    Settings,
)
from thinwatchd.config.strict_yaml import MAX_VALUES
from thinwatchd.kernel.names import pool_name
from thinwatchd.thin.table import Feature

GiB, MiB, KiB = 1024**3, 1024**2, 1024
EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.yaml"
DATA, META = "/var/lib/thinwatchd/p/data", "/var/lib/thinwatchd/p/metadata"


def config(pool: str = "", top: str = "", data: str = DATA, meta: str = META) -> str:
    """Return a config with one pool "p"; pool holds extra pool lines, top extra top-level ones."""
    pool_lines = textwrap.indent(textwrap.dedent(pool), "    ")
    pool_head = f"pools:\n  p:\n    data_file: {data}\n    metadata_file: {meta}\n"
    return textwrap.dedent(top) + pool_head + pool_lines


def only_pool(text: str) -> PoolSettings:
    (pool,) = parse_settings(text, "test.yaml").pools
    return pool


def default_pool(name: str = "p", data: str = DATA, meta: str = META) -> PoolSettings:
    return PoolSettings(name=pool_name(name), data_file=Path(data), metadata_file=Path(meta))


# --- What loads ---------------------------------------------------------------------------------


def test_minimal_pool_takes_every_default() -> None:
    assert parse_settings(config(), "test.yaml") == Settings(DaemonSettings(), (default_pool(),))


def test_example_loads_and_is_the_defaults() -> None:
    pool = default_pool(
        "docker-pool",
        "/var/lib/thinwatchd/docker-pool/data",
        "/var/lib/thinwatchd/docker-pool/metadata",
    )
    assert load_settings(EXAMPLE) == Settings(DaemonSettings(), (pool,))


def test_example_documents_every_setting() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == {"daemon", "defaults", "pools"}
    assert set(raw["daemon"]) == {f.name for f in dataclasses.fields(DaemonSettings)}
    pool = raw["pools"]["docker-pool"]
    assert set(pool) == {f.name for f in dataclasses.fields(PoolSettings)} - {"name"}
    for section, kind in (("data", DataGrowth), ("metadata", MetadataGrowth)):
        keys = {k.replace("threshold", "threshold_percent") for k in pool[section]}
        assert keys == {f.name for f in dataclasses.fields(kind)}
    assert set(pool["when_full"]) == {f.name for f in dataclasses.fields(NoSpaceSettings)}


def test_every_value_form() -> None:
    pool = only_pool(
        config("""
        data_size: 1.5T
        metadata_size: 100MB
        data_block_size: 1MiB
        low_water_mark: 010
        features: [ignore_discard, error_if_no_space]
        preallocate: True
        reserve: 4k
        reserve_percent: 5
        data: {threshold: 90%, step: 2G, step_percent: 0, max_size: 2T, adaptive_low_water: false}
        metadata: {threshold: 50, step: 1GiB, step_percent: 0.5%, max_size: 8G}
        when_full: {error_after: 500ms}
        """)
    )
    assert pool == dataclasses.replace(
        default_pool(),
        data_size=Bytes(3 * 1024**4 // 2),
        metadata_size=Bytes(100 * MiB),
        data_block_size=Sectors(2048),
        low_water_mark=DataBlocks(10),  # read as written, not as YAML 1.1 octal
        features=(Feature.IGNORE_DISCARD, Feature.ERROR_IF_NO_SPACE),
        preallocate=True,
        reserve=Bytes(4 * KiB),
        reserve_percent=5.0,
        data=DataGrowth(90.0, Bytes(2 * GiB), 0.0, Bytes(2 * 1024**4), False),
        metadata=MetadataGrowth(50.0, Bytes(GiB), 0.5, Bytes(8 * GiB)),
        when_full=NoSpaceSettings(0.5),
    )


@pytest.mark.parametrize("never", ["never", "null", "~", ""])
def test_error_after_never(never: str) -> None:
    assert only_pool(config(f"when_full: {{error_after: {never}}}")).when_full.error_after is None


def test_daemon_section() -> None:
    text = config(top="daemon: {check_interval: 2m, metrics_file: /run/t.prom, log_level: DEBUG}\n")
    assert parse_settings(text, "t").daemon == DaemonSettings(120.0, Path("/run/t.prom"), "debug")


@pytest.mark.parametrize(
    ("lines", "field", "expected"),
    [
        ("data_block_size: 128", "data_block_size", 128),
        ("data_block_size: '2097152'", "data_block_size", 2097152),
        ("data_block_size: 64KiB", "data_block_size", 128),
        ("data_block_size: 1G", "data_block_size", 2097152),
        # 384 sectors = 192 KiB blocks: 1 GiB holds 5461 of them; the rest is dropped.
        ("data_block_size: 384\ndata_size: 1G", "data_size", 5461 * 192 * KiB),
        ("data_size: 100000", "data_size", 65536),
        ("metadata_size: 3000000", "metadata_size", 2998272),  # whole 4 KiB blocks
        (
            "metadata_size: 3M\nmetadata: {max_size: 5000000}",
            "metadata",
            MetadataGrowth(max_size=Bytes(4997120)),
        ),
        ("data: {max_size: 100.5G}", "data", DataGrowth(max_size=Bytes(100 * GiB + GiB // 2))),
        (
            "data_size: 1G\ndata: {max_size: 2000000001}",
            "data",
            DataGrowth(max_size=Bytes(1999962112)),
        ),
        ("features: []", "features", ()),
        ("low_water_mark: 1", "low_water_mark", 1),
        ("data: {threshold: 100%}", "data", DataGrowth(threshold_percent=100.0)),
        ("reserve_percent: 99.9%", "reserve_percent", 99.9),
    ],
)
def test_values_are_normalised(lines: str, field: str, expected: object) -> None:
    assert getattr(only_pool(config(lines)), field) == expected


def test_defaults_apply_to_every_pool_and_merge_by_key() -> None:
    text = textwrap.dedent("""
        defaults:
          reserve: 2GiB
          features: []
          data: {step: 4G, threshold: 70%}
          when_full: {error_after: never}
        pools:
          a:
            data_file: /a/data
            metadata_file: /a/meta
          b:
            data_file: /b/data
            metadata_file: /b/meta
            reserve: 0
            data: {threshold: 95%}
        """)
    a, b = parse_settings(text, "t").pools
    assert (a.name, b.name) == ("a", "b")  # the file's order
    assert a.reserve == 2 * GiB and b.reserve == 0
    assert a.features == b.features == ()
    assert a.data == DataGrowth(threshold_percent=70.0, step=Bytes(4 * GiB))
    # step still from defaults
    assert b.data == DataGrowth(threshold_percent=95.0, step=Bytes(4 * GiB))
    assert a.when_full.error_after is None and b.when_full.error_after is None
    assert a.metadata == MetadataGrowth()


def test_empty_sections_mean_defaults() -> None:
    text = config("data:\nmetadata:\nwhen_full:\n", top="daemon:\ndefaults:\n")
    assert parse_settings(text, "t") == Settings(DaemonSettings(), (default_pool(),))


def test_yaml_merge_keys_may_be_overridden() -> None:
    text = textwrap.dedent("""
        pools:
          a: &base
            data_file: /a/data
            metadata_file: /a/meta
            data_size: 10G
          b:
            <<: *base
            data_file: /b/data
            metadata_file: /b/meta
        """)
    a, b = parse_settings(text, "t").pools
    assert a.data_size == b.data_size == 10 * GiB
    assert b.data_file == Path("/b/data")


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config())
    assert load_settings(path).pools == (default_pool(),)


# --- What is refused ----------------------------------------------------------------------------

ERRORS = [
    # (config text, key path, message fragment)
    # unknown keys, with a suggestion
    (config(top="deamon: {}\n"), "deamon", "unknown key 'deamon'; did you mean 'daemon'?"),
    (config(top="daemon: {log_levl: info}\n"), "daemon.log_levl", "did you mean 'log_level'?"),
    (config("data_szie: 1G"), "pools.p.data_szie", "did you mean 'data_size'?"),
    (config("data: {treshold: 80%}"), "pools.p.data.treshold", "did you mean 'threshold'?"),
    (
        config("metadata: {adaptive_low_water: true}"),
        "pools.p.metadata.adaptive_low_water",
        "unknown key 'adaptive_low_water'; allowed: threshold, step, step_percent, max_size",
    ),
    (config("when_full: {error_afer: 1s}"), "pools.p.when_full.error_afer", "'error_after'?"),
    (config(top="defaults: {reserv: 1G}\n"), "defaults.reserv", "did you mean 'reserve'?"),
    (config("name: x"), "pools.p.name", "unknown key 'name'"),
    # shapes and types
    (config("data: 5"), "pools.p.data", "'5' is not a mapping"),
    (config("data_size: [1]"), "pools.p.data_size", "a list is not a size; use a number of bytes"),
    (config("data_size: {a: 1}"), "pools.p.data_size", "a mapping is not a size"),
    (
        config("preallocate: yes"),
        "pools.p.preallocate",
        "'yes' is not a boolean; use true or false",
    ),
    (config("preallocate: off"), "pools.p.preallocate", "'off' is not a boolean"),
    (config("data: {adaptive_low_water: 1}"), "pools.p.data.adaptive_low_water", "not a boolean"),
    (config("features: skip_block_zeroing"), "pools.p.features", "is not a list"),
    (config("features:"), "pools.p.features", "null is not a list"),
    (config(top="daemon: [1]\n"), "daemon", "a list is not a mapping"),
    ("pools: 5\n", "pools", "'5' is not a mapping"),
    ("pools:\n  p: 5\n", "pools.p", "'5' is not a mapping"),
    ("pools:\n  true: {}\n", "pools", "key true is not a string; quote it"),
    # pools
    ("daemon: {}\n", "pools", "missing; define at least one pool"),
    ("pools: {}\n", "pools", "is empty"),
    ("pools:\n", "pools", "is empty"),
    ("pools:\n  p: {metadata_file: /m}\n", "pools.p.data_file", "missing"),
    ("pools:\n  p: {data_file: /d}\n", "pools.p.metadata_file", "missing"),
    (config(top="defaults: {data_file: /x}\n"), "defaults.data_file", "cannot be a default"),
    # pool names
    ("pools:\n  'a b': {}\n", "pools", "'a b' cannot be a device-mapper name: it contains ' '"),
    ("pools:\n  a/b: {}\n", "pools", "it contains '/'"),
    ("pools:\n  control: {}\n", "pools", "'control' is reserved"),
    ("pools:\n  '..': {}\n", "pools", "is reserved"),
    ("pools:\n  '': {}\n", "pools", "it is empty"),
    ("pools:\n  caf\u00e9: {}\n", "pools", "contains '\u00e9'"),
    (f"pools:\n  {'x' * 128}: {{}}\n", "pools", "it is 128 bytes long; the limit is 127"),
    # files
    (config(data="var/lib/x"), "pools.p.data_file", "'var/lib/x' is not an absolute path"),
    (config(data="/var/lib/"), "pools.p.data_file", "is not an absolute path to a file"),
    (config(meta="/var/.."), "pools.p.metadata_file", "not an absolute path to a file"),
    (config(meta="5"), "pools.p.metadata_file", "'5' is not an absolute path"),
    (config(meta=DATA), "pools.p.metadata_file", f"'{DATA}' is already pools.p.data_file"),
    (config(meta="/var/lib/thinwatchd/p/./data"), "pools.p.metadata_file", "already"),
    (
        config() + f"  q:\n    data_file: /q/data\n    metadata_file: {META}\n",
        "pools.q.metadata_file",
        "is already pools.p.metadata_file",
    ),
    (
        config(top=f"daemon: {{metrics_file: {DATA}}}\n"),
        "daemon.metrics_file",
        "is already pools.p.data_file",
    ),
    (config(top="daemon: {metrics_file: x.prom}\n"), "daemon.metrics_file", "not an absolute"),
    # sizes
    (
        config("data: {step: 1 gig}"),
        "pools.p.data.step",
        "'1 gig' is not a size; use a number of bytes or a number with a unit like 512MiB or 1GiB",
    ),
    (config("data_size: -1G"), "pools.p.data_size", "'-1G' is negative"),
    (config("data_size: 9E"), "pools.p.data_size", "larger than any file"),
    (
        config("data_size: 1K"),
        "pools.p.data_size",
        "'1K' is less than one data block; use at least 64.0KiB (65536 bytes)",
    ),
    (config("data_size: 0"), "pools.p.data_size", "less than one data block"),
    (config("reserve: 5%"), "pools.p.reserve", "or set reserve_percent: 5%"),
    (config("data: {step: 20%}"), "pools.p.data.step", "or set step_percent: 20%"),
    (config("metadata_size: 1M"), "pools.p.metadata_size", "'1M' is too small; use at least 2MiB"),
    (config("metadata_size: 16G"), "pools.p.metadata_size", "use at most 16646400KiB"),
    (
        config("metadata: {max_size: 15.9GiB}"),
        "pools.p.metadata.max_size",
        "'15.9GiB' is more than the kernel can use",
    ),
    (
        config("data: {max_size: 512M}"),
        "pools.p.data.max_size",
        "'512M' is below data_size (1.0GiB)",
    ),
    (
        config("data: {max_size: 60K}", top="defaults: {data_size: 64K}\n"),
        "pools.p.data.max_size",
        "'60K' is below data_size",
    ),
    (
        config(top="defaults: {data: {max_size: 100M}}\n"),
        "pools.p.data.max_size",
        "'100M' (from defaults.data.max_size) is below data_size",
    ),
    (
        config("metadata_size: 1G\nmetadata: {max_size: 512M}"),
        "pools.p.metadata.max_size",
        "'512M' is below metadata_size (1.0GiB)",
    ),
    (
        config("data: {step: 0, step_percent: 0}"),
        "pools.p.data.step",
        "'0' with step_percent 0 would never grow the file",
    ),
    (config("metadata: {step: 0, step_percent: 0%}"), "pools.p.metadata.step", "never grow"),
    # block size and low-water mark
    (
        config("data_block_size: 64"),
        "pools.p.data_block_size",
        "'64' is not a valid block size; use 128 to 2097152 sectors in steps of 128",
    ),
    (config("data_block_size: 200"), "pools.p.data_block_size", "not a valid block size"),
    (config("data_block_size: 2097280"), "pools.p.data_block_size", "not a valid block size"),
    (config("data_block_size: 96KiB"), "pools.p.data_block_size", "not a valid block size"),
    (config("data_block_size: 2G"), "pools.p.data_block_size", "not a valid block size"),
    (config("data_block_size: big"), "pools.p.data_block_size", "not a valid block size"),
    (config("data_block_size: 128.0"), "pools.p.data_block_size", "not a valid block size"),
    (config("low_water_mark: 0"), "pools.p.low_water_mark", "'0' is not a number of data blocks"),
    (config("low_water_mark: -1"), "pools.p.low_water_mark", "not a number of data blocks"),
    (config("low_water_mark: 2G"), "pools.p.low_water_mark", "not a number of data blocks"),
    # features
    (config("features: [read_only]"), "pools.p.features[0]", "'read_only' is not allowed"),
    (
        config("features: [ignore_discard, ignore_discard]"),
        "pools.p.features[1]",
        "'ignore_discard' is listed twice",
    ),
    (
        config("features: [skip_zeroing]"),
        "pools.p.features[0]",
        "'skip_zeroing' is not a thin-pool feature; use one of skip_block_zeroing, ignore_discard, "
        "no_discard_passdown, error_if_no_space (did you mean 'skip_block_zeroing'?)",
    ),
    (config("features: [[x]]"), "pools.p.features[0]", "a list is not a thin-pool feature"),
    # percentages
    (
        config("data: {threshold: 0}"),
        "pools.p.data.threshold",
        "'0' is out of range; use more than 0% and at most 100%",
    ),
    (config("data: {threshold: 100.1%}"), "pools.p.data.threshold", "out of range"),
    (
        config("metadata: {threshold: 0.8}"),
        "pools.p.metadata.threshold",
        "'0.8' is ambiguous; write 80% or, for under 1%, 0.8%",
    ),
    (
        config("data: {threshold: eighty}"),
        "pools.p.data.threshold",
        "'eighty' is not a percentage; use a number like 80 or 80%",
    ),
    (config("data: {step_percent: -5%}"), "pools.p.data.step_percent", "'-5%' is negative"),
    (config("reserve_percent: 100%"), "pools.p.reserve_percent", "out of range"),
    (config("reserve_percent: .5"), "pools.p.reserve_percent", "ambiguous"),
    # durations and the daemon
    (
        config(top="daemon: {check_interval: 0.5s}\n"),
        "daemon.check_interval",
        "'0.5s' is out of range; use 1s to 1h",
    ),
    (config(top="daemon: {check_interval: 2h}\n"), "daemon.check_interval", "out of range"),
    (
        config(top="daemon: {check_interval: 1:30}\n"),
        "daemon.check_interval",
        "'1:30' is not a duration; use a number of seconds or a number with a unit like 500ms",
    ),
    (
        config(top="daemon: {log_level: warn}\n"),
        "daemon.log_level",
        "'warn' is not a level; use one of debug, info, warning, error (did you mean 'warning'?)",
    ),
    (config(top="daemon: {log_level: 3}\n"), "daemon.log_level", "'3' is not a level"),
    (
        config("when_full: {error_after: soon}"),
        "pools.p.when_full.error_after",
        "'soon' is not a duration",
    ),
    (config("when_full: {error_after: -1s}"), "pools.p.when_full.error_after", "is negative"),
    # a bad default is reported even though the only pool overrides it
    (
        config("reserve: 1G", top="defaults: {reserve: lots}\n"),
        "defaults.reserve",
        "'lots' is not a size",
    ),
]


@pytest.mark.parametrize(("text", "key_path", "fragment"), ERRORS)
def test_errors_name_the_key_and_the_value(text: str, key_path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "test.yaml")
    assert caught.value.key_path == key_path
    assert fragment in caught.value.message
    assert "\n" not in str(caught.value)
    assert str(caught.value) == f"{key_path}: {caught.value.message}"


FILE_ERRORS = [
    # (config text, message fragment): problems with the file as a whole
    ("", "test.yaml is empty; it needs at least a pools: section"),
    ("# only a comment\n", "test.yaml is empty"),
    ("- a\n- b\n", "test.yaml: the top level must be a mapping, not a list"),
    ("just text\n", "the top level must be a mapping, not 'just text'"),
    ("pools:\n  p: [\n", "test.yaml, line 3, column 1: "),
    ("pools:\n  p: {a: 1\n  q: 2\n", "test.yaml, line 3, column 4"),
    ("a: b\n  c: d\n", "test.yaml, line 2, column 4: mapping values are not allowed"),
    ("pools: {}\npools: {}\n", "test.yaml, line 2, column 1: found duplicate key 'pools'"),
    ("a: b\n---\nc: d\n", "test.yaml, line 2, column 1: expected a single document"),
    ("pools: !!python/object:os.system {}\n", "could not determine a constructor"),
    ("pools: !!int 5\n", "could not determine a constructor for the tag"),
    ("pools: !!bool maybe\n", "'maybe' is not true or false"),
    ("pools:\n  ? [a]\n  : 1\n", "line 2, column 5: found a key that is not text"),
    ("pools: *nothing\n", "found undefined alias"),
    ("\x07", "test.yaml, line 1, column 1: unacceptable character #x0007"),
    ("pools:\n  \u00e9: \x00\n", "test.yaml, line 2, column 6: unacceptable character #x0000"),
    ("[" * 5000, "test.yaml"),
]


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with libyaml's parser (as shipped) and with the pure-Python fallback."""
    if request.param == "pure-python":
        monkeypatch.setattr(strict_yaml, "_Loader", strict_yaml._PureLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML was built without libyaml")
    return str(request.param)


@pytest.mark.usefixtures("yaml_parser")
@pytest.mark.parametrize(("text", "fragment"), FILE_ERRORS)
def test_file_errors_name_the_file(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "test.yaml")
    assert caught.value.key_path == ""
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "absent.yaml")
    assert str(caught.value) == f"cannot read {tmp_path}/absent.yaml: No such file or directory"


# --- Hostile input: every file and document ends in one ConfigError line, quickly ---------------


def _keys(nbytes: int) -> bytes:
    """Return nbytes of distinct `key: value` lines, the shape of the 60 MB file in issue 7."""
    lines = (f"key{i}: value\n".encode() for i in range(nbytes // 8))
    return b"".join(lines)[:nbytes]


def _laughs(levels: int, *, merge: bool = False) -> str:
    """Return a pool whose features (or, with merge, data section) expand to 10**levels nodes."""
    lines = ["lol0: &lol0 {" + ", ".join(f"k{i}: lol" for i in range(10)) + "}"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*lol{level - 1}"] * 10)
        lines.append(f"lol{level}: &lol{level} " + (f"{{<<: [{refs}]}}" if merge else f"[{refs}]"))
    top = "defaults:\n  x-laughs:\n" + "".join(f"    {line}\n" for line in lines)
    return top + config(f"data: *lol{levels}" if merge else f"features: *lol{levels}")


def _loads_quickly(path: Path, seconds: float = 1.0) -> ConfigError:
    """Load path; return the ConfigError it must raise within the given CPU time.

    CPU time, not wall time: on a busy CI box the wall clock would measure the neighbours.
    """
    start = time.process_time()
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert time.process_time() - start < seconds, f"{path}: {caught.value}"
    assert "\n" not in str(caught.value)
    return caught.value


def test_directory_and_binary_files(tmp_path: Path) -> None:
    error = _loads_quickly(tmp_path)
    assert str(error) == (
        f"cannot read {tmp_path}: it is a directory, not a regular file; "
        "--config must name the YAML config file"
    )
    (tmp_path / "bad.yaml").write_bytes(b"pools: \xff\n")
    assert "byte 7 is not UTF-8" in str(_loads_quickly(tmp_path / "bad.yaml"))


def test_special_files_are_refused(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    assert "Too many levels of symbolic links" in str(_loads_quickly(loop))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.yaml"))
        assert "is a socket, not a regular file" in str(_loads_quickly(tmp_path / "sock.yaml"))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(config())
    real_open = os.open

    def refuse(file: object, *args: Any, **kwargs: Any) -> int:
        if str(file) == str(path):  # root ignores file modes, so EACCES is simulated
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    assert str(_loads_quickly(path)) == f"cannot read {path}: Permission denied"


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("flow nesting", "pools: " + "[" * 500_000, "nest"),  # libyaml stops it at 1000
        ("mapping nesting", "pools: " + "{a: " * 200_000, "nested more than"),
        ("block nesting", "".join(" " * i + f"k{i}:\n" for i in range(1000)), "nested more than"),
        ("billion laughs", _laughs(9), "alias *lol2 expands the document to more than"),
        ("merge laughs", _laughs(9, merge=True), "alias *lol2 expands the document to more"),
        ("recursive alias", config("features: &self [*self]"), "alias *self refers to a node"),
        ("recursive merge", config("data: &self {<<: *self}"), "alias *self refers to a node"),
        (
            "keys up to the size cap",
            _keys(MAX_CONFIG_BYTES).decode(),
            f"has more than {MAX_VALUES}",
        ),
        ("one flow list up to the cap", "pools: [" + "a, " * (MiB // 3 - 4) + "]", "has more"),
    ],
)
def test_hostile_documents_fail_fast(
    tmp_path: Path, yaml_parser: str, name: str, text: str, fragment: str
) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    seconds = 1.0 if yaml_parser == "libyaml" else 3.0  # the fallback scans a MiB in Python
    assert fragment in str(_loads_quickly(path, seconds)), name


def test_size_cap_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    text = config().encode()
    path.write_bytes(text + b"#" * (MAX_CONFIG_BYTES - len(text)))
    assert load_settings(path).pools == (default_pool(),)
    path.write_bytes(text + b"#" * (MAX_CONFIG_BYTES + 1 - len(text)))
    assert str(_loads_quickly(path)) == (
        f"cannot read {path}: it is larger than 1 MiB, the limit for a config file; "
        "--config must name the YAML config file"
    )


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="the pure-Python parser is slower")
def test_big_config_with_comments_loads(tmp_path: Path) -> None:
    """Comments and long values cost little: a config of nearly the cap's size loads at once."""
    path = tmp_path / "big.yaml"
    comment = "# " + "x" * 1000 + "\n"
    path.write_text(comment * (MiB // len(comment) - 2) + config())
    start = time.process_time()
    assert load_settings(path).pools == (default_pool(),)
    assert time.process_time() - start < 1.0


def _check_config_in_child(path: Path | str, *command: str) -> tuple[int, str, float]:
    """Run check-config (or command) on path in a child with 1 GiB of address space and 10 s.

    Return the exit code, stderr, and the CPU seconds main() took (inf if it never returned).
    """
    code = (
        "import sys, time; from thinwatchd.cli import main; start = time.process_time(); "
        "code = main(sys.argv[1:]); print(time.process_time() - start); sys.exit(code)"
    )

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))

    done = subprocess.run(
        [sys.executable, "-c", code, "--config", str(path), *(command or ["check-config"])],
        capture_output=True,
        text=True,
        timeout=10,
        preexec_fn=limit_memory,
        check=False,
        cwd=EXAMPLE.parent,
    )
    seconds = float(done.stdout.splitlines()[-1]) if done.stdout.strip() else float("inf")
    return done.returncode, done.stderr, seconds


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("fifo", "is a fifo, not a regular file"),
        ("/dev/zero", "is a character device, not a regular file"),
        ("60 MB of keys", "is larger than 1 MiB, the limit for a config file"),
    ],
)
def test_issue_7_files_exit_78_at_once(tmp_path: Path, name: str, fragment: str) -> None:
    """The three files of issue 7: a FIFO hung, /dev/zero and 60 MB ran out of memory or time."""
    path = tmp_path / "config.yaml"
    if name == "fifo":
        os.mkfifo(path)
    elif name == "60 MB of keys":
        with path.open("wb") as f:
            f.writelines([_keys(MiB)] * 60)
    else:
        path = Path(name)
    code, stderr, seconds = _check_config_in_child(path)
    assert code == EX_CONFIG, stderr
    assert stderr.startswith(f"thinwatchd: cannot read {path}: ") and fragment in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert seconds < 1.0


# --- Who may write it (issue 19, item 8): the file and every directory above it, as sshd's
# StrictModes; a config decides which files root formats and grows ----------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
NOBODY = 65534


def _safe_dir(tmp_path: Path) -> Path:
    """Return a directory only we can write (pytest's tmp_path may sit in a group-writable one
    when the tests are not run as root; then skip)."""
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    try:
        load_settings(_write(directory / "probe.yaml"))
    except ConfigError as e:
        pytest.skip(f"the test directory itself is refused: {e}")
    return directory


def _write(path: Path, mode: int = 0o644) -> Path:
    path.write_text(config())
    os.chmod(path, mode)
    return path


def _refused(path: Path) -> str:
    error = _loads_quickly(path)
    assert error.key_path == "" and str(path) in str(error)
    return str(error)


def _owners() -> str:
    return "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()}"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620, 0o602], ids=oct)
def test_a_config_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _write(_safe_dir(tmp_path) / "config.yaml", mode)
    assert _refused(path) == (
        f"{path} is owned by uid {os.geteuid()} with mode {mode:04o}; a config file must be "
        f"owned by {_owners()} and writable by nobody else: it decides which files root formats "
        f"and grows. Fix it with: chmod go-w {path}"
    )


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o640, 0o444, 0o400], ids=oct)
def test_a_config_only_we_can_write_loads(tmp_path: Path, mode: int) -> None:
    path = _write(_safe_dir(tmp_path) / "config.yaml", mode)
    assert load_settings(path).pools == (default_pool(),)


@as_root
def test_a_config_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = _write(_safe_dir(tmp_path) / "config.yaml", 0o644)
    os.chown(path, NOBODY, NOBODY)
    message = _refused(path)
    assert message.startswith(f"{path} is owned by uid {NOBODY} with mode 0644; ")
    assert message.endswith(f"Fix it with: chown root {path}")
    os.chmod(path, 0o664)
    assert _refused(path).endswith(f"Fix it with: chown root {path} && chmod go-w {path}")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o2775], ids=oct)
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever can write a directory on the way can rename the config and put another there."""
    safe = _safe_dir(tmp_path)
    (safe / "thinwatchd").mkdir()
    path = _write(safe / "thinwatchd" / "config.yaml")
    for directory in (path.parent, safe):  # its own directory, and one further up
        os.chmod(directory, mode)
        assert _refused(path) == (
            f"{path}: its directory {directory} is owned by uid {os.geteuid()} with mode "
            f"{mode:04o}; every directory up to / must be owned by {_owners()} and writable by "
            "nobody else (or sticky, as /tmp), or the config could be swapped. Fix it with: "
            f"chmod go-w {directory}"
        )
        os.chmod(directory, 0o755)
    assert load_settings(path).pools == (default_pool(),)


@as_root
def test_a_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    safe = _safe_dir(tmp_path)
    path = _write(safe / "config.yaml")
    os.chown(safe, NOBODY, NOBODY)
    assert _refused(path).endswith(f"Fix it with: chown root {safe}")


@as_root
def test_a_sticky_directory_is_safe_when_root_owns_it(tmp_path: Path) -> None:
    """As /tmp (1777): only an entry's owner, the directory's owner or root may rename or remove
    it, and every entry on the way is checked to be root's (or ours)."""
    sticky = _safe_dir(tmp_path) / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    private = sticky / "pytest-of-root"  # as tempfile.mkdtemp or pytest make under /tmp
    private.mkdir(mode=0o700)
    for path in (_write(sticky / "config.yaml"), _write(private / "config.yaml")):
        assert load_settings(path).pools == (default_pool(),)
    os.chown(private, NOBODY, NOBODY)  # its owner could swap the file
    assert "its directory" in _refused(private / "config.yaml")
    os.chown(sticky, NOBODY, NOBODY)  # the sticky directory's owner may remove any entry
    assert _refused(sticky / "config.yaml").endswith(f"Fix it with: chown root {sticky}")


def test_symlinks_are_checked_where_they_are_and_where_they_lead(tmp_path: Path) -> None:
    safe = _safe_dir(tmp_path)
    unsafe = safe / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)
    # A link in a safe directory to a file in an unsafe one: the file could be swapped.
    (safe / "to-unsafe.yaml").symlink_to(_write(unsafe / "config.yaml"))
    assert f"its directory {unsafe} " in _refused(safe / "to-unsafe.yaml")
    # A link in an unsafe directory to a safe file: the link could be pointed elsewhere.
    (unsafe / "to-safe.yaml").symlink_to(_write(safe / "config.yaml"))
    assert f"its directory {unsafe} " in _refused(unsafe / "to-safe.yaml")
    # Links between safe directories are fine.
    (safe / "link.yaml").symlink_to(safe / "config.yaml")
    assert load_settings(safe / "link.yaml").pools == (default_pool(),)


@pytest.mark.parametrize("command", ["check-config", "status", "run"])
def test_every_command_refuses_an_unsafe_config_in_one_line(tmp_path: Path, command: str) -> None:
    """check-config says why; status refuses it too, as run (and a reload) do."""
    path = _write(_safe_dir(tmp_path) / "config.yaml", 0o666)
    lock = ["--lock-file", str(tmp_path / "lock")] if command != "check-config" else []
    code, stderr, _ = _check_config_in_child(path, command, *lock)
    assert code == EX_CONFIG, stderr
    assert stderr == f"thinwatchd: {_refused(path)}\n"


def test_exit_code_is_ex_config() -> None:
    assert EX_CONFIG == 78


# --- Properties -----------------------------------------------------------------------------------

POOL_KEYS = [f.name for f in dataclasses.fields(PoolSettings) if f.name != "name"]
SECTION_KEYS = [
    "threshold",
    "step",
    "step_percent",
    "max_size",
    "adaptive_low_water",
    "error_after",
]
KEYS = st.sampled_from(["daemon", "defaults", "pools", "p", "q", *POOL_KEYS, *SECTION_KEYS])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "1G",
            "64KiB",
            "2M",
            "80%",
            "0.5",
            "10s",
            "never",
            "/a",
            "/b",
            "/a/",
            "read_only",
            "skip_block_zeroing",
            "-1",
            str(METADATA_MAX_BYTES),
            "128",
            "2097152",
            "0",
        ]
    ),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(KEYS, st.text(max_size=8), st.integers()), children, max_size=5),
    ),
    max_leaves=30,
)


def _pool_strategy() -> st.SearchStrategy[dict[object, object]]:
    """Pools that mostly get past the first checks, so the deeper ones are exercised too."""
    files = st.fixed_dictionaries(
        {
            "data_file": st.sampled_from(["/a", "/b", "/c"]),
            "metadata_file": st.sampled_from(["/m", "/n", "/a"]),
        }
    )
    keys = st.sampled_from([*POOL_KEYS, "data", "metadata", "when_full"])
    extra = st.dictionaries(keys, ANY_VALUE, max_size=4)
    return st.builds(lambda f, e: {**f, **e}, files, extra)


DOCUMENTS = st.one_of(
    ANY_VALUE,
    st.fixed_dictionaries(
        {
            "pools": st.dictionaries(
                st.sampled_from(["p", "q", "a b"]), _pool_strategy(), max_size=3
            )
        },
        optional={"daemon": ANY_VALUE, "defaults": ANY_VALUE},
    ),
)


@settings(max_examples=500, deadline=None)
@given(DOCUMENTS)
def test_validator_raises_only_config_error(document: object) -> None:
    try:
        result = build_settings(document)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(result, Settings) and result.pools


@settings(max_examples=300, deadline=None)  # the pure-Python YAML parser is slow on big documents
@given(st.one_of(st.text(), st.builds(yaml.safe_dump, DOCUMENTS)))
def test_parser_raises_only_config_error(text: str) -> None:
    try:
        parse_settings(text, "fuzz.yaml")
    except ConfigError as e:
        assert "\n" not in str(e)
