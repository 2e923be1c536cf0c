"""A pool and its data survive a real reboot: two boots of the VM on one persistent disk.

Runs on the host (it drives the VM itself), so it is marked `vm`, not `kernel`. With CI=true a
missing VM test bed is a failure, never a skip.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm import hostcheck

REPO = Path(__file__).resolve().parents[2]


def boot(image: Path, step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.vm",
            "run",
            "--quiet",
            "--scratch",
            str(image),
            "--scratch-size",
            "4",
            "--timeout",
            "600",
            "--",
            sys.executable,
            "-m",
            "tests.kernel.reboot_steps",
            step,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def checksum(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stdout.splitlines() if line.startswith("checksum=")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return lines[-1]


def test_pool_and_data_survive_a_guest_reboot(tmp_path: Path) -> None:
    missing = hostcheck.missing_pieces()
    if missing:
        message = f"the VM test bed lacks {'; '.join(missing)}. {hostcheck.HOW_TO_GET_PIECES}"
        if hostcheck.in_ci():
            pytest.fail(f"CI=true, so this is a failure: {message}")
        pytest.skip(message)
    image = tmp_path / "scratch.img"
    first = boot(image, "before")
    written = checksum(first)
    second = boot(image, "after")
    assert checksum(second) == written
    assert "adopted over its existing metadata" in second.stderr, second.stderr
    assert "created on" in first.stderr
