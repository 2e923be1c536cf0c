"""The command line: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinwatchd.base.errors import EX_CONFIG, EX_NOPERM, KernelError
from thinwatchd.cli import main
from thinwatchd.daemon.instance_lock import InstanceLockedError, hold_instance_lock

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
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert done.returncode == EX_CONFIG, done.stderr
        assert fragment in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_config_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml"), "check-config"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "No such file" in err
    assert err.count("nope.yaml") == 1


# --- --config before or after the command -------------------------------------------------------


def _config(tmp_path: Path, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        f"pools:\n  p:\n    data_file: {tmp_path}/data\n    metadata_file: {tmp_path}/meta\n"
    )
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{good}", "check-config"],
        ["check-config", "--config", "{good}"],
        ["--config", "{bad}", "check-config", "--config", "{good}"],  # the command's wins
    ],
)
def test_config_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    good, bad = _config(tmp_path), tmp_path / "absent.yaml"
    assert main([a.format(good=good, bad=bad) for a in argv]) == 0
    assert capsys.readouterr().out == f"{good}: OK (1 pool: p)\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--config", "{bad}"],
        ["run", "--log-target", "stderr", "--config", "{bad}"],
        ["status", "--config", "{bad}", "--json"],
        ["status", "--json", "--config", "{bad}"],
        ["--config", "/nonexistent/default.yaml", "status", "--config", "{bad}"],
    ],
)
def test_each_command_takes_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("pools: {}\n")
    assert main([a.format(bad=bad) for a in argv]) == EX_CONFIG
    assert (
        capsys.readouterr().err == f"thinwatchd: {bad}: pools: is empty; define at least one pool\n"
    )


# --- Kernel access: not root is not "no device-mapper" -------------------------------------------


def _refuse_dm(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise KernelError("open", "/dev/mapper/control", code)

    monkeypatch.setattr("thinwatchd.kernel.dm.DeviceMapper", refuse)
    monkeypatch.setattr("thinwatchd.kernel.runtime.open_kernel", refuse)


@pytest.mark.parametrize(
    ("code", "exit_code", "says", "not_said"),
    [
        (errno.EACCES, EX_NOPERM, "needs root (CAP_SYS_ADMIN)", "modprobe"),
        (errno.EPERM, EX_NOPERM, "needs root (CAP_SYS_ADMIN)", "modprobe"),
        (errno.ENOENT, 69, "modprobe dm-thin-pool", "needs root"),
        (errno.ENODEV, 69, "modprobe dm-thin-pool", "needs root"),
        (errno.ENXIO, 69, "modprobe dm-thin-pool", "needs root"),
        (errno.EIO, 69, "Input/output error", "modprobe"),
    ],
)
@pytest.mark.parametrize("command", ["status", "run"])
def test_kernel_refusal_is_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    code: int,
    exit_code: int,
    says: str,
    not_said: str,
) -> None:
    _refuse_dm(monkeypatch, code)
    argv = ["--config", str(_config(tmp_path)), command]
    if command == "run":
        argv += ["--log-target", "stderr", "--lock-file", str(tmp_path / "lock")]
    assert main(argv) == exit_code
    err = capsys.readouterr().err
    assert says in err and not_said not in err, err
    assert f"thinwatchd {command} needs root" in err or exit_code != EX_NOPERM
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_run_locks_before_opening_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / "lock"
    seen: list[int | None] = []

    def open_kernel() -> None:
        try:
            with hold_instance_lock(lock):
                seen.append(None)
        except InstanceLockedError as exc:
            seen.append(exc.pid)
        raise KernelError("open", "/dev/mapper/control", errno.ENOENT)

    monkeypatch.setattr("thinwatchd.kernel.runtime.open_kernel", open_kernel)
    argv = ["--config", str(_config(tmp_path)), "run", "--log-target", "stderr", "--lock-file"]
    assert main([*argv, str(lock)]) == 69
    assert seen == [os.getpid()]
    with hold_instance_lock(lock):  # released when run returns
        pass


@pytest.mark.parametrize("command", ["check-config", "status"])
def test_only_run_takes_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError(f"{command} took the instance lock")

    monkeypatch.setattr("thinwatchd.cli.hold_instance_lock", forbidden)
    _refuse_dm(monkeypatch, errno.ENOENT)
    assert main(["--config", str(_config(tmp_path)), command]) in (0, 69)


# --- status and a tampered estimates file (issue 19, item 7) ------------------------------------


class _NoPools:
    """A device-mapper with no devices: every configured pool shows as absent."""

    def __enter__(self) -> _NoPools:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def info(self, name: str) -> None:
        return None


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"version": 1, "written_at": 1' + "0" * 400 + ', "pools": {}}', "401 digits"),
        ("[" * 100_000 + "]" * 100_000, "nested more than"),
        ('{"version": 1, "written_at": NaN, "pools": {}}', "NaN"),
    ],
)
def test_status_ignores_tampered_estimates_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    why: str,
    as_json: bool,
) -> None:
    monkeypatch.setattr("thinwatchd.kernel.dm.DeviceMapper", _NoPools)
    argv = ["--config", str(_config(tmp_path)), "status", "--lock-file", str(tmp_path / "lock")]
    argv += ["--json"] if as_json else []
    absent = main(argv)  # no estimates file
    clean = capsys.readouterr()
    assert clean.err == ""
    (tmp_path / "estimates.json").write_text(text)
    assert main(argv) == absent == 1  # the pool is not active; the estimates change nothing
    tampered = capsys.readouterr()
    assert tampered.out == clean.out  # as if there were no file
    assert tampered.err.startswith(f"thinwatchd: ignoring {tmp_path}/estimates.json: ")
    assert why in tampered.err and tampered.err.count("\n") == 1, tampered.err
