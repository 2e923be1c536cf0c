"""The command line: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from thinwatchd.cli import main
from thinwatchd.errors import EX_CONFIG

REPO = Path(__file__).resolve().parents[2]


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(REPO / "config.example.yaml"), "check-config"]) == 0
    assert "OK (1 pool: docker-pool)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "pools:\n  p:\n    data_file: /x/d\n    metadata_file: /x/m\n    data: {step: 1 gig}\n",
            "pools.p.data.step: '1 gig' is not a size",
        ),
        (
            "pools:\n  p:\n    data_file: /x/d\n    metadata_file: /x/m\n    low_watermark: 5\n",
            "low_watermark",
        ),
        ("pools: [\n", "line"),
        ("", "empty"),
    ],
)
def test_bad_config_exits_78_with_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    for command in ("check-config", "run", "status"):
        done = subprocess.run(
            [sys.executable, "-m", "thinwatchd", "--config", str(config), command],
            capture_output=True, text=True, cwd=REPO, check=False,
        )  # fmt: skip
        assert done.returncode == EX_CONFIG, done.stderr
        assert fragment in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "check-config"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "No such file" in err
    assert err.count("nope.yaml") == 1
