"""Run thin_check (thin-provisioning-tools) on a pool's metadata before activating it.

The only program thinwatchd ever starts, and only at activation over existing metadata —
never on the growth path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import threading

from thinwatchd.base.errors import KernelError

__all__ = ["end_all", "thin_check"]

log = logging.getLogger("thinwatchd")

#: A check of a large metadata device can take a while; a hung one must not block start-up.
TIMEOUT_SECONDS = 300


#: After SIGTERM, a thin_check this long alive gets SIGKILL.
END_GRACE_SECONDS = 2.0

_running: set[subprocess.Popen[str]] = set()  # the checks under way, in their own groups
_lock = threading.Lock()


def thin_check(metadata_path: str) -> str | None:
    """Return None if thin_check passes (or is not installed), else its report (one line).

    thin_check runs in a process group of its own, so that end_all() can end it and whatever
    it started when the daemon stops: under KillMode=process systemd ends only the daemon, and
    a check left running holds the metadata device, so the next instance's check met a busy
    device and reported damage.
    """
    program = shutil.which("thin_check")
    if program is None:
        log.warning(
            "thin_check not found (install thin-provisioning-tools); activating %s "
            "without checking its metadata",
            metadata_path,
        )
        return None
    try:
        check = subprocess.Popen(
            [program, "-q", metadata_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0,
        )
    except OSError as exc:  # could not start it (ENOMEM, EAGAIN): a later try may succeed
        raise KernelError("run thin_check", metadata_path, exc.errno or errno.EIO) from exc
    with _lock:
        _running.add(check)
    try:
        stdout, stderr = check.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        _end(check)
        return f"thin_check did not finish in {TIMEOUT_SECONDS} s"
    finally:
        with _lock:
            _running.discard(check)
    if check.returncode == 0:
        return None
    report = " ".join((stderr or stdout).split())
    return f"thin_check exited {check.returncode}: {report[:500]}"


def end_all() -> int:
    """End every thin_check under way (SIGTERM to its group, SIGKILL after a grace period);
    return how many there were. For a daemon that stops: nothing of it may outlive it."""
    with _lock:
        checks = list(_running)
    for check in checks:
        _end(check)
    return len(checks)


def _end(check: subprocess.Popen[str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(check.pid, sig)
        try:
            check.wait(timeout=END_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue
