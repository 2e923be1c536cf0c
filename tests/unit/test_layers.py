"""The layers contract (pyproject.toml [tool.importlinter], run by scripts/lint) holds today, and
breaks on an import that climbs: a copy of the package with one upward import fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(root / "pyproject.toml")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_the_layers_hold() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_import_that_climbs_breaks_them(tmp_path: Path) -> None:
    shutil.copytree(REPO / "thinwatchd", tmp_path / "thinwatchd")
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    policy = tmp_path / "thinwatchd" / "policy" / "decide.py"
    policy.write_text(policy.read_text() + "\nfrom thinwatchd.growth import extender  # climbs\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "thinwatchd.policy.decide -> thinwatchd.growth.extender" in done.stdout
