"""Start qemu so that it can never outlive us, and stop it."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["QEMU_BINARY", "find_qemu", "kill_all", "start", "stop"]

QEMU_BINARY = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def find_qemu() -> str | None:
    """Return the path of qemu-system-x86_64, or None."""
    from shutil import which

    return which(QEMU_BINARY)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start(
    argv: Sequence[str], pass_fds: Sequence[int], stderr_file: Path
) -> subprocess.Popen[bytes]:
    """Start qemu in its own process group, killed by the kernel if this thread dies.

    It is also killed by ``kill_all`` (registered with atexit) and by ``stop``.
    """
    with stderr_file.open("wb") as stderr:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only calls prctl
        )
    with _live_lock:
        _live.add(process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill qemu's process group (no-op if it has exited) and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with _live_lock:
        _live.discard(process)


def kill_all() -> None:
    """Kill every qemu this process started and that still runs."""
    with _live_lock:
        processes = list(_live)
    for process in processes:
        stop(process)


def _on_signal(signum: int, _frame: object) -> None:
    kill_all()
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP kill the guests and exit (the CLI calls this; pytest need not)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)


atexit.register(kill_all)
