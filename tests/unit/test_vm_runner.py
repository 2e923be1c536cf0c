"""The VM runner's boot deadline, with a stand-in for qemu that can hang before the command.

A stand-in is enough here: what is tested is the host's side (kill a boot that never reaches
the command, boot again, keep the hung console), not the guest.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import FakeCommand
from tests.vm import runner
from tests.vm.runner import GuestConfig, Outcome, run_guest

# Boots numbered up to HANG_BOOTS never reach the command; later ones run it and exit 7.
_FAKE_QEMU = r"""#!{python}
import os, sys, time
from pathlib import Path
count_file = Path({count_file!r})
boots = int(count_file.read_text() or "0") + 1 if count_file.exists() else 1
count_file.write_text(str(boots))
share = next(a for a in sys.argv if "mount_tag=vmbed" in a).split("path=")[1].split(",")[0]
sys.stdout.write(f"boot {{boots}}\n")
if boots <= int(os.environ["FAKE_QEMU_HANG_BOOTS"]):
    time.sleep(3600)
out = Path(share) / "out"
(out / "started").write_text("")
(out / "exit-status").write_text("7\n")
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, fake_command: FakeCommand, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in on PATH; return the file that counts its boots."""
    count_file = tmp_path / "boots"
    fake_command(
        "qemu-system-x86_64", _FAKE_QEMU.format(python=sys.executable, count_file=str(count_file))
    )
    monkeypatch.setattr(runner, "compile_checkout", lambda: None)
    return count_file


def _kernel(tmp_path: Path) -> Any:
    (tmp_path / "kernel").mkdir(exist_ok=True)
    return SimpleNamespace(
        initramfs=lambda: tmp_path / "kernel" / "initramfs",
        boot_image=lambda: tmp_path / "kernel" / "vmlinux",
        modules_dir=tmp_path / "kernel" / "modules",
    )


def _run(tmp_path: Path, attempts: int) -> runner.GuestResult:
    config = GuestConfig(timeout=60.0, boot_timeout=1.5, boot_attempts=attempts, scratch_size_gib=1)
    with (tmp_path / "output").open("wb") as sink:
        return run_guest(["true"], config, _kernel(tmp_path), tmp_path / "run", sink, sink)


def test_a_hung_boot_is_killed_and_booted_again(
    tmp_path: Path, fake_qemu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_HANG_BOOTS", "1")
    result = _run(tmp_path, attempts=2)
    assert (result.outcome, result.exit_code, result.boots) == (Outcome.COMPLETED, 7, 2)
    assert fake_qemu.read_text() == "2"
    assert result.elapsed < 30  # the hung boot cost its deadline, not the whole timeout
    assert (result.results_dir / "console-hung-1.log").exists()
    assert "booted 2 times" in result.describe()


@pytest.mark.parametrize(
    ("hung_boots", "outcome", "exit_code", "boots", "said"),
    [
        (5, Outcome.HUNG_BOOTING, runner.EXIT_TIMEOUT, 2, "guest hung while booting"),
        (0, Outcome.COMPLETED, 7, 1, "command exited 7"),  # reached the command: no retry
    ],
)
def test_boots_are_retried_only_while_they_hang(
    tmp_path: Path,
    fake_qemu: Path,
    monkeypatch: pytest.MonkeyPatch,
    hung_boots: int,
    outcome: Outcome,
    exit_code: int,
    boots: int,
    said: str,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_HANG_BOOTS", str(hung_boots))
    result = _run(tmp_path, attempts=2)
    assert (result.outcome, result.exit_code, result.boots) == (outcome, exit_code, boots)
    assert len(list(result.results_dir.glob("console-hung-*.log"))) == min(hung_boots, 1)
    assert said in result.describe()


def test_the_guest_kernel_skips_the_crypto_self_tests() -> None:
    assert "cryptomgr.notests=1" in runner._kernel_cmdline(runner.Mode.SYSTEMD).split()
