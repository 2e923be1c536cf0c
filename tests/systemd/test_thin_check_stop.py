"""Issue 19, item 9, under real systemd: a thin_check under way when the service stops ends
with it.

The unit says KillMode=process (the pools stay up when the daemon stops), so systemd signals only
the daemon; before a7b1950 a thin_check started at activation outlived `systemctl stop` and held
the metadata, and the next instance's check could meet it. The test reboots a pool in place (the
unit builds it, stops; the pool's devices are removed, its files kept: what a reboot leaves),
puts a slow thin_check first on the unit's PATH (it holds the metadata file open, as thin_check
does, then runs the real one), starts the unit and stops it while the check runs. Once `systemctl
stop` returns, nothing of the check may be left. The next start, with the real thin_check,
activates the pool over its metadata.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.harness import installed_unit, scratch_dir, teardown
from thinwatchd.kernel.dm import DeviceMapper

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
#: First on systemd's default PATH for services (shutil.which finds it before /usr/sbin's).
SLOW_CHECK = Path("/usr/local/sbin/thin_check")
MARK = "slow-thin-check-for-item-9"
SLOW_CHECK_SCRIPT = f"""#!/bin/sh
# {MARK}: holds the metadata file open, as thin_check does, then runs the real one.
exec 3< "$2"
sleep 120 &
wait $!
exec /usr/sbin/thin_check "$@"
"""


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)


def checks_alive() -> list[str]:
    """The processes left of the slow check: the script itself, or its sleep."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(SLOW_CHECK) in cmdline or cmdline.strip() == "sleep 120":
            alive.append(f"{proc.name}: {cmdline.strip()}")
    return alive


def show(prop: str) -> str:
    return run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


@pytest.fixture
def rebooted_pool() -> Iterator[tuple[str, Path]]:
    """A pool the unit built, then stopped and taken down as a reboot would: files kept."""
    pool = f"twtc-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    files = [directory / "data", directory / "metadata"]
    config: dict[str, object] = {
        "pools": {
            pool: {
                "data_file": str(files[0]),
                "metadata_file": str(files[1]),
                "data_size": "64MiB",
                "metadata_size": "16MiB",
            }
        }
    }
    dm = DeviceMapper()
    try:
        with installed_unit(directory, config):
            start = run("systemctl", "start", UNIT)
            assert start.returncode == 0, start.stderr + run("journalctl", "-u", UNIT).stdout
            assert dm.info(pool) is not None
            run("systemctl", "stop", UNIT)
            teardown(dm, [pool], files)  # the reboot: devices gone, files kept
            assert dm.info(pool) is None
            yield pool, directory
    finally:
        SLOW_CHECK.unlink(missing_ok=True)
        for line in checks_alive():  # never leave one to a later test
            os.kill(int(line.split(":")[0]), 9)
        teardown(dm, [pool], files)
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_stop_during_thin_check_leaves_no_check_behind(
    rebooted_pool: tuple[str, Path],
) -> None:
    pool, _ = rebooted_pool
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    SLOW_CHECK.write_text(SLOW_CHECK_SCRIPT)
    SLOW_CHECK.chmod(0o755)

    run("systemctl", "start", "--no-block", UNIT)
    deadline = time.monotonic() + 120
    while not checks_alive():
        assert time.monotonic() < deadline, run("journalctl", "-u", UNIT, "--since", since).stdout
        time.sleep(0.2)
    assert show("ActiveState") == "activating", show("ActiveState")
    print(f"thin_check under way: {checks_alive()}")

    began = time.monotonic()
    stop = run("systemctl", "stop", UNIT)
    took = time.monotonic() - began
    assert stop.returncode == 0, stop.stderr
    left = checks_alive()
    log = run("journalctl", "-u", UNIT, "--since", since, "--no-pager").stdout
    assert not left, f"the check outlived `systemctl stop`: {left}\n{log}"
    print(f"systemctl stop took {took:.1f} s; no check left")
    assert "Traceback" not in log, log

    SLOW_CHECK.unlink()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    start = run("systemctl", "start", UNIT)
    log = run("journalctl", "-u", UNIT, "--since", since, "--no-pager").stdout
    assert start.returncode == 0, f"{start.stderr}\n{log}"
    assert DeviceMapper().info(pool) is not None, log
    assert "thin_check exited" not in log, log
