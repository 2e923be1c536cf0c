"""One `thinwatchd run` per host: an flock on a lock file that names its holder's pid."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from thinwatchd.base.errors import EX_CANTCREAT, EX_TEMPFAIL
from thinwatchd.daemon.instance_lock import (
    DEFAULT_LOCK_PATH,
    InstanceLockedError,
    LockFileError,
    hold_instance_lock,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"pools:\n  p:\n    data_file: {tmp_path}/data\n    metadata_file: {tmp_path}/meta\n"
    )
    return path


def _run_second(config: Path, lock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "thinwatchd.cli",
            "--config",
            str(config),
            "run",
            "--lock-file",
            str(lock),
            "--log-target",
            "stderr",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_default_path() -> None:
    assert Path("/run/thinwatchd/thinwatchd.lock") == DEFAULT_LOCK_PATH


def test_holder_writes_its_pid_and_creates_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "thinwatchd" / "thinwatchd.lock"
    with hold_instance_lock(path):
        assert path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        assert stat.S_IMODE(path.stat().st_mode) & 0o644 == 0o644 & ~_umask()
    with hold_instance_lock(path):  # released on close, and a stale longer pid is replaced
        pass
    path.write_text("123456789\n")
    with hold_instance_lock(path):
        assert path.read_text() == f"{os.getpid()}\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_second_process_exits_75_naming_the_holder(tmp_path: Path, config: Path) -> None:
    lock = tmp_path / "thinwatchd.lock"
    with hold_instance_lock(lock):
        done = _run_second(config, lock)
    assert done.returncode == EX_TEMPFAIL == 75, done.stderr
    assert done.stderr == (
        f"thinwatchd: another thinwatchd (pid {os.getpid()}) already manages the pools "
        f"(lock {lock} held); stop it first (systemctl stop thinwatchd)\n"
    )
    assert not done.stdout
    assert not (tmp_path / "data").exists(), "the second instance touched a pool file"


def test_unknown_holder(tmp_path: Path) -> None:
    lock = tmp_path / "thinwatchd.lock"
    lock.write_text("not a pid\n")
    with lock.open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InstanceLockedError) as caught:
            hold_instance_lock(lock)
    assert "another thinwatchd (pid unknown) already manages the pools" in str(caught.value)
    assert caught.value.pid is None


def test_lock_dies_with_a_sigkilled_holder(tmp_path: Path) -> None:
    lock = tmp_path / "thinwatchd.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from thinwatchd.daemon.instance_lock import hold_instance_lock; "
            "lock = hold_instance_lock(Path(sys.argv[1])); "
            "print('held', flush=True); time.sleep(600)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(InstanceLockedError) as caught:
            hold_instance_lock(lock)
        assert caught.value.pid == holder.pid
        assert f"(pid {holder.pid})" in str(caught.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with hold_instance_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"


def test_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    """thin_check and the like must not keep the lock alive after the daemon has gone."""
    lock = tmp_path / "thinwatchd.lock"
    with hold_instance_lock(lock) as held:
        assert os.get_inheritable(held.fd) is False
        assert fcntl.fcntl(held.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    lock = tmp_path / "thinwatchd.lock"
    lock.symlink_to(target)
    with pytest.raises(LockFileError) as caught:
        hold_instance_lock(lock)
    assert str(caught.value).startswith(f"cannot open the lock file {lock}: ")
    assert not target.exists()


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "thinwatchd.lock"
    os.mkfifo(lock)
    with pytest.raises(LockFileError, match="is a fifo, not a regular file"):
        hold_instance_lock(lock)
    with pytest.raises(LockFileError, match="Is a directory"):
        hold_instance_lock(tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_uncreatable_lock_file_exits_73_with_one_line(
    tmp_path: Path,
    config: Path,
    code: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from thinwatchd.cli import main

    lock = tmp_path / "ro" / "thinwatchd.lock"
    real_makedirs = os.makedirs

    def refuse(name: Any, *args: Any, **kwargs: Any) -> None:
        if str(name) == str(lock.parent):  # root ignores modes, and tests cannot mount
            raise OSError(code, os.strerror(code), str(name))
        real_makedirs(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    assert main(["--config", str(config), "run", "--lock-file", str(lock)]) == EX_CANTCREAT == 73
    err = capsys.readouterr().err
    assert err.startswith(f"thinwatchd: cannot create {lock.parent} for the lock file: ")
    assert os.strerror(code) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
