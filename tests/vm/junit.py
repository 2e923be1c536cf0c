"""Read the inner pytest's JUnit XML back into per-test results."""

from __future__ import annotations

import enum
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from _pytest.junitxml import mangle_test_address

__all__ = ["InnerCase", "Phase", "junit_key", "read_junit", "split_captured"]

_SKIP_DETAILS = re.compile(r"^(?P<path>.*?):(?P<line>\d+): (?P<reason>.*)$", re.DOTALL)
_CAPTURE_HEADER = re.compile(r"^-+ Captured (Log|Out|Err) -+$", re.MULTILINE)
_CAPTURE_NAMES = {"Log": "log", "Out": "stdout", "Err": "stderr"}
_XPASS_STRICT = "xfail-marked test passes unexpectedly"


class Phase(enum.StrEnum):
    """What happened to one inner test."""

    PASSED = "passed"
    FAILED = "failed"  # the test body failed
    SETUP_ERROR = "setup error"  # a fixture failed before the test
    TEARDOWN_ERROR = "teardown error"  # the test passed, its teardown failed
    SKIPPED = "skipped"
    XFAILED = "xfailed"


@dataclass(frozen=True)
class InnerCase:
    """One ``<testcase>``: its outcome, the failure text and the captured output."""

    phase: Phase
    message: str = ""  # failure text (traceback), or the skip/xfail reason
    summary: str = ""  # one-line failure message (the exception)
    skip_location: tuple[str, int] | None = None
    captured: tuple[tuple[str, str], ...] = ()  # ("log" | "stdout" | "stderr", text)
    seconds: float = 0.0


def junit_key(nodeid: str) -> tuple[str, str]:
    """Return the (classname, name) pair pytest's junitxml writes for ``nodeid``."""
    names = mangle_test_address(nodeid)
    return ".".join(names[:-1]), names[-1]


def read_junit(path: Path) -> Mapping[tuple[str, str], InnerCase]:
    """Return the test cases of a JUnit XML file by (classname, name).

    Raise OSError or ET.ParseError if the file is missing or truncated.
    """
    cases: dict[tuple[str, str], InnerCase] = {}
    for element in ET.parse(path).getroot().iter("testcase"):
        key = (element.get("classname", ""), element.get("name", ""))
        cases[key] = _case(element)
    return cases


def split_captured(text: str) -> list[tuple[str, str]]:
    """Split junitxml's "--- Captured Out ---" blocks into (what, text) pairs; drop empty ones."""
    parts = _CAPTURE_HEADER.split(text)
    pairs = [(_CAPTURE_NAMES[parts[i]], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]
    if parts[0].strip():
        pairs.insert(0, ("output", parts[0].strip("\n")))
    return [(what, body) for what, body in pairs if body.strip()]


def _case(element: ET.Element) -> InnerCase:
    captured = "".join(e.text or "" for e in element if e.tag in ("system-out", "system-err"))
    seconds = float(element.get("time", "0") or 0)
    phase, message, summary, where = Phase.PASSED, "", "", None
    for child in element:
        text = child.text or ""
        label = child.get("message", "")
        if child.tag == "failure":
            phase, message, summary = Phase.FAILED, text or label, label
        elif child.tag == "error":
            teardown = label.startswith("failed on teardown")
            if phase is Phase.PASSED or not teardown:
                phase = Phase.TEARDOWN_ERROR if teardown else Phase.SETUP_ERROR
                message, summary = text or label, label
        elif child.tag == "skipped" and child.get("type") == "pytest.xfail":
            phase, message = Phase.XFAILED, label
        elif child.tag == "skipped" and label == _XPASS_STRICT:
            phase, message = Phase.FAILED, f"[XPASS(strict)] {label}"
            summary = message
        elif child.tag == "skipped":
            phase, message = Phase.SKIPPED, label
            match = _SKIP_DETAILS.match(text)
            if match:
                where = (match["path"], int(match["line"]))
    return InnerCase(phase, message, summary, where, tuple(split_captured(captured)), seconds)
