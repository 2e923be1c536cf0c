"""A Python script in a child process, its output read line by line in a thread, never waited on."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from testbed.harness import REPO


class ChildScript:
    """A Python script run in a child (cwd REPO), each line of its output handed to heard() in
    a reader thread. It may sit in D state on a pool: the test only watches it (progress,
    poll) and can never hang itself. Subclasses set what heard() fills before calling this."""

    def __init__(self, script: str, *args: str) -> None:
        self.started = time.monotonic()
        self.last_progress = self.started
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.heard(line)

    def heard(self, line: str) -> None:
        """Take one line of the child's output (with its newline), in the reader thread."""
        raise NotImplementedError

    def stalled_for(self) -> float:
        """Seconds since the last progress (0 once finished)."""
        return 0.0 if self.proc.poll() is not None else time.monotonic() - self.last_progress

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def sigkill(self, timeout: float) -> int | None:
        """SIGKILL it; return its exit status, or None if it stays (D state) for timeout s."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
