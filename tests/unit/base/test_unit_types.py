"""The units are types: mypy refuses a size in the wrong unit where the kernel API, the table,
the policy or the settings want another (what the 'int  # sectors' comments could not)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mypy import api

REPO = Path(__file__).resolve().parents[3]

PRELUDE = """
from dataclasses import replace

from thinwatchd.kernel.api import FilesApi, Target
from thinwatchd.policy.decide import Grow, GrowthTarget
from thinwatchd.config.settings import PoolSettings
from thinwatchd.thin.table import ThinPoolTable
from thinwatchd.base.units import (
    Bytes, DataBlocks, MetaBlocks, Sectors, bytes_to_sectors, data_blocks_to_sectors,
)

blocks, sectors, size, meta = DataBlocks(16), Sectors(2048), Bytes(1 << 20), MetaBlocks(4)
"""

MIXUPS = {
    "blocks as a table length": 'Target(Sectors(0), blocks, "thin-pool", "")',
    "bytes as a table length": 'Target(Sectors(0), size, "thin-pool", "")',
    "sectors as a low-water mark": 'ThinPoolTable("7:0", "7:1", sectors, sectors)',
    "bytes as a block size": 'ThinPoolTable("7:0", "7:1", size, blocks)',
    "blocks as a file size": "def f(fs: FilesApi) -> None: fs.grow('/x', blocks, preallocate=True)",
    "metadata blocks as data blocks": 'Grow("p", GrowthTarget.DATA, size, size, meta, "why")',
    "bytes as a setting's mark": "def f(s: PoolSettings) -> None: replace(s, low_water_mark=size)",
    "a bare int as sectors": 'Target(Sectors(0), 2048, "thin-pool", "")',
    "sectors converted as bytes": "bytes_to_sectors(sectors)",
    "bytes converted as data blocks": "data_blocks_to_sectors(size, sectors)",
}

RIGHT = """
def f(s: PoolSettings) -> None: replace(s, low_water_mark=blocks, data_block_size=sectors)
Target(Sectors(0), data_blocks_to_sectors(blocks, Sectors(128)), "thin-pool", "")
Target(Sectors(0), bytes_to_sectors(size), "thin-pool", "")
ThinPoolTable("7:0", "7:1", Sectors(128), blocks)
Grow("p", GrowthTarget.DATA, size, Bytes(2 * size), blocks, "why")
"""


def _mypy(body: str, tmp_path: Path) -> tuple[str, int]:
    source = tmp_path / "snippet.py"
    source.write_text(PRELUDE + textwrap.dedent(body))
    stdout, stderr, status = api.run(
        ["--strict", "--no-error-summary", "--cache-dir", str(REPO / ".mypy_cache"), str(source)]
    )
    return stdout + stderr, status


def test_the_right_units_pass(tmp_path: Path) -> None:
    out, status = _mypy(RIGHT, tmp_path)
    assert status == 0, out


@pytest.mark.parametrize("line", MIXUPS.values(), ids=MIXUPS.keys())
def test_a_size_in_the_wrong_unit_is_refused(line: str, tmp_path: Path) -> None:
    out, status = _mypy(line + "\n", tmp_path)
    errors = [e for e in out.splitlines() if ": error: " in e]
    assert status == 1 and len(errors) == 1 and errors[0].endswith("[arg-type]"), out
