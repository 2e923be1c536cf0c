"""Run thin_check (thin-provisioning-tools) on a pool's metadata before activating it.

The only program thinwatchd ever starts, and only at activation over existing metadata —
never on the growth path.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess

from thinwatchd.errors import KernelError

__all__ = ["thin_check"]

log = logging.getLogger("thinwatchd")

#: A check of a large metadata device can take a while; a hung one must not block start-up.
TIMEOUT_SECONDS = 300


def thin_check(metadata_path: str) -> str | None:
    """Return None if thin_check passes (or is not installed), else its report (one line)."""
    program = shutil.which("thin_check")
    if program is None:
        log.warning(
            "thin_check not found (install thin-provisioning-tools); activating %s "
            "without checking its metadata",
            metadata_path,
        )
        return None
    try:
        done = subprocess.run(
            [program, "-q", metadata_path],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"thin_check did not finish in {TIMEOUT_SECONDS} s"
    except OSError as exc:  # could not start it (ENOMEM, EAGAIN): a later try may succeed
        raise KernelError("run thin_check", metadata_path, exc.errno or errno.EIO) from exc
    if done.returncode == 0:
        return None
    report = " ".join((done.stderr or done.stdout).split())
    return f"thin_check exited {done.returncode}: {report[:500]}"
