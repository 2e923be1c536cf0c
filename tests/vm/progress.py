"""A progress log the guest's pytest writes test by test, for when the guest dies mid-run.

JUnit XML is written only at the end of a session; if the guest panics or times out, this log
(``-p tests.vm.progress``, one JSON object a line in ``$THINWATCHD_VM_OUT/progress.jsonl``)
still tells which tests finished, how, and which one was running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from tests.vm.junit import InnerCase, Phase, junit_key

__all__ = ["PROGRESS_FILE", "Progress", "read_progress"]

PROGRESS_FILE = "progress.jsonl"

_log: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _log
    out = os.environ.get("THINWATCHD_VM_OUT")
    if out and _log is None:
        _log = open(Path(out) / PROGRESS_FILE, "a", encoding="utf-8")  # noqa: SIM115


def pytest_runtest_logstart(nodeid: str) -> None:
    _write({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry: dict[str, Any] = {
        "event": "report",
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "text": report.longreprtext,
    }
    crash = getattr(report.longrepr, "reprcrash", None)
    entry["summary"] = getattr(crash, "message", "")
    if hasattr(report, "wasxfail"):
        entry["xfail"] = str(report.wasxfail)
    if report.skipped and isinstance(report.longrepr, tuple):
        entry["skip"] = list(report.longrepr)
    _write(entry)


def pytest_runtest_logfinish(nodeid: str) -> None:
    _write({"event": "finish", "nodeid": nodeid})


def _write(entry: dict[str, Any]) -> None:
    if _log is not None:
        _log.write(json.dumps(entry) + "\n")
        _log.flush()


@dataclass(frozen=True)
class Progress:
    """What the log says: finished tests by junit key, and the test that was running."""

    finished: dict[tuple[str, str], InnerCase]
    running: str | None


def read_progress(path: Path) -> Progress:
    """Read a progress log; a missing file means no test started."""
    finished: dict[tuple[str, str], InnerCase] = {}
    reports: dict[str, list[dict[str, Any]]] = {}
    running = None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line may be cut short
        nodeid = entry["nodeid"]
        if entry["event"] == "start":
            running, reports[nodeid] = nodeid, []
        elif entry["event"] == "report":
            reports.setdefault(nodeid, []).append(entry)
        elif entry["event"] == "finish":
            running = None
            finished[junit_key(nodeid)] = _case(reports.get(nodeid, []))
    return Progress(finished, running)


def _case(entries: list[dict[str, Any]]) -> InnerCase:
    for entry in entries:
        when, outcome = entry["when"], entry["outcome"]
        if outcome == "failed":
            phase = {"setup": Phase.SETUP_ERROR, "call": Phase.FAILED}.get(
                when, Phase.TEARDOWN_ERROR
            )
            return InnerCase(phase, entry["text"], entry.get("summary", ""))
        if "xfail" in entry:
            return InnerCase(Phase.XFAILED, entry["xfail"])
        if outcome == "skipped":
            path, line, reason = entry.get("skip") or ("", 0, entry["text"])
            reason = str(reason).removeprefix("Skipped: ")
            where = (str(path), int(line)) if path else None
            return InnerCase(Phase.SKIPPED, reason, skip_location=where)
    return InnerCase(Phase.PASSED)
