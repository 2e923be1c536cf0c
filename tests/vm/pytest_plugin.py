"""Run the ``kernel`` and ``systemd`` tests in a guest and report their results as ours.

Where this host cannot run them natively (no dm-thin, not root, or no systemd as PID 1), the
first such test boots one guest per mode (two for systemd: SECOND_SYSTEMD_GUEST), each of
which runs its selected tests with ``python -m pytest ... --junitxml``. The guests boot at
once: many of their tests wait on the clock (paced fills, stalls, restarts), so side by side
they take little more than the longest (``THINWATCHD_VM_PARALLEL=0`` boots them one after the
other; so does ``-s``, whose live output would interleave). Each outer test then reports its
inner result: passed, failed with the inner traceback (plus the guest's dmesg tail), skipped
with the inner reason. Tests the guest never ran fail with the guest's console tail. Inside a
guest (``THINWATCHD_IN_VM=1``) every test runs natively.

If qemu, busybox or the kernel is missing, the tests are skipped with a hint, but under CI
(``CI=true``) they fail: a test bed that silently skips proves nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest

from tests.vm import hostcheck
from tests.vm.junit import InnerCase, Phase, junit_key, read_junit
from tests.vm.kernel_cache import find_prepared
from tests.vm.paths import GUEST_OUT_DIR, REPO_ROOT
from tests.vm.progress import PROGRESS_FILE, read_progress
from tests.vm.results import new_results_dir
from tests.vm.runner import GuestConfig, GuestResult, Mode, run_guest
from tests.vm.streams import Sink, Tee

if TYPE_CHECKING:  # pytest's type for a failure's text, which InnerFailure duck-types
    from _pytest._code.code import TerminalRepr

__all__ = ["Guest", "InnerFailure", "VmTestBed", "guest_of", "mode_of"]

TIMEOUT_ENV = "THINWATCHD_VM_TIMEOUT"  # seconds per guest boot (default 2700)
MEM_ENV = "THINWATCHD_VM_MEM"  # MiB (default 2048)
PARALLEL_ENV = "THINWATCHD_VM_PARALLEL"  # "0": one guest at a time
_TAIL = 40
_Outcome = Literal["passed", "failed", "skipped"]


#: The systemd tests are the longest batch (27 min beside the plain guest's 23 on 8aa52c4): the
#: tests of these modules run in a second systemd guest, booted beside the other two, so that
#: the three batches end at about the same time. Modules stay whole (test_debian_package's
#: steps need each other).
SECOND_SYSTEMD_GUEST = frozenset(
    {"test_quickstart.py", "test_restart_under_fill.py", "test_docker.py"}
)


@dataclass(frozen=True, order=True)
class Guest:
    """One guest boot of a session: its mode, and which of that mode's guests."""

    mode: Mode
    shard: int = 0

    def __str__(self) -> str:
        return str(self.mode) if self.shard == 0 else f"{self.mode}-{self.shard + 1}"


def mode_of(item: pytest.Item) -> Mode | None:
    """Return the guest mode a test needs (``systemd`` wins over ``kernel``), or None."""
    if item.get_closest_marker("systemd") is not None:
        return Mode.SYSTEMD
    if item.get_closest_marker("kernel") is not None:
        return Mode.PLAIN
    return None


def guest_of(item: pytest.Item) -> Guest | None:
    """Return the guest a test runs in, or None if it needs none."""
    mode = mode_of(item)
    if mode is None:
        return None
    second = mode is Mode.SYSTEMD and item.path.name in SECOND_SYSTEMD_GUEST
    return Guest(mode, 1 if second else 0)


def inner_nodeid(item: pytest.Item) -> str:
    """Return the test's node id relative to the checkout, as the guest's pytest names it."""
    relative = item.path.resolve().relative_to(REPO_ROOT).as_posix()
    _, sep, rest = item.nodeid.partition("::")
    return f"{relative}::{rest}" if sep else relative


@dataclass
class Batch:
    """The inner results of one guest boot, or why there are none."""

    guest: Guest
    cases: Mapping[tuple[str, str], InnerCase] = field(default_factory=dict)
    unavailable: str = ""  # prerequisites missing: skip (or fail under CI)
    missing_reason: str = ""  # for tests with no inner result
    running: str | None = None  # the test the guest was running when it died
    dmesg_tail: str = ""


class VmTestBed:
    """The pytest plugin object; ``tests/conftest.py`` registers one per session."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._native: dict[Mode, bool] = {}
        self._batches: dict[Guest, Batch] = {}
        self._booting: dict[Guest, Future[Batch]] = {}

    def runs_natively(self, mode: Mode) -> bool:
        """Return True if this host runs ``mode``'s tests itself."""
        if mode not in self._native:
            if hostcheck.in_vm():
                self._native[mode] = True  # never nest guests; see pytest_runtest_setup
            elif mode is Mode.SYSTEMD:
                self._native[mode] = hostcheck.systemd_is_pid1() and hostcheck.host_has_dm_thin()
            else:
                self._native[mode] = hostcheck.host_has_dm_thin()
        return self._native[mode]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if mode_of(item) is Mode.SYSTEMD and hostcheck.in_vm() and not hostcheck.systemd_is_pid1():
            pytest.skip("needs systemd as PID 1: run it in the systemd guest (--mode systemd)")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        guest = guest_of(item)
        if guest is None or self.runs_natively(guest.mode):
            return None
        batch = self._batches.get(guest)
        if batch is None:
            if guest not in self._booting:
                self._boot(item.session, guest)
            batch = self._batches[guest] = self._booting.pop(guest).result()
        reports = _reports(item, batch)
        reports[-1] = _teardown(item, nextitem, reports[-1])
        _emit(item, reports)
        return True

    def _boot(self, session: pytest.Session, first: Guest) -> None:
        """Start guest first and, unless told otherwise, every other guest that the session
        needs, each in a thread of its own (its batch is read when its test comes)."""
        guests = [first]
        if os.environ.get(PARALLEL_ENV, "1") != "0" and not self._live():
            needed = {g for i in session.items if (g := guest_of(i)) is not None}
            guests += [
                g
                for g in sorted(needed)
                if g != first and g not in self._batches and not self.runs_natively(g.mode)
            ]
        missing = hostcheck.missing_pieces()  # once, here: it may prepare the test bed
        pool = ThreadPoolExecutor(max_workers=len(guests), thread_name_prefix="guest")
        for guest in guests:
            self._booting[guest] = pool.submit(self._run_batch, session, guest, missing)
        pool.shutdown(wait=False)

    def _run_batch(self, session: pytest.Session, guest: Guest, missing: Sequence[str]) -> Batch:
        items = [i for i in session.items if guest_of(i) == guest]
        if missing:
            return Batch(guest, unavailable="the VM test bed lacks " + "; ".join(missing))
        kernel = find_prepared()
        assert kernel is not None  # missing_pieces prepared it
        results_dir = new_results_dir(f"pytest-{guest}")
        results_dir.mkdir(parents=True)
        self._say(f"booting a {guest} guest for {len(items)} test(s); files in {results_dir}")
        config = GuestConfig(
            mode=guest.mode,
            timeout=float(os.environ.get(TIMEOUT_ENV, "2700")),
            mem_mib=int(os.environ.get(MEM_ENV, "2048")),
        )
        output = results_dir / "pytest-output.txt"
        with output.open("wb") as log:
            sink: Sink = Tee(log, sys.stdout.buffer) if self._live() else log
            command = self._inner_command([inner_nodeid(i) for i in items])
            result = run_guest(command, config, kernel, results_dir, sink, sink)
        self._say(f"{guest} guest: {result.describe()}")
        return _batch_from(guest, result, output)

    def _inner_command(self, nodeids: Sequence[str]) -> list[str]:
        option = self._config.option
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--rootdir={REPO_ROOT}",
            "-c",
            str(REPO_ROOT / "pyproject.toml"),
            f"--junitxml={GUEST_OUT_DIR}/junit.xml",
            "-o",
            "junit_logging=all",
            "-o",
            "junit_log_passing_tests=false",
            "-v",
            # hypothesis' plugin alone costs ~10 s of imports under TCG; no kernel test uses it
            "-p",
            "no:hypothesispytest",
            "-p",
            "tests.vm.progress",
        ]
        if getattr(option, "maxfail", 0):
            command.append(f"--maxfail={option.maxfail}")
        if getattr(option, "tbstyle", "auto") != "auto":
            command.append(f"--tb={option.tbstyle}")
        return [*command, *nodeids]

    def _live(self) -> bool:
        option = self._config.option
        return bool(getattr(option, "capture", "") == "no" or option.verbose >= 2)

    def _say(self, message: str) -> None:
        reporter: Any = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        reporter.ensure_newline()
        reporter.write_line(f"[vm] {message}")
        if hasattr(reporter, "currentfspath"):
            reporter.currentfspath = None  # the next result starts a fresh line


def _batch_from(guest: Guest, result: GuestResult, output: Path) -> Batch:
    junit = result.out_dir / "junit.xml"
    progress = read_progress(result.out_dir / PROGRESS_FILE)
    try:
        cases = read_junit(junit)
    except (OSError, SyntaxError) as error:  # ET.ParseError is a SyntaxError
        cases, why = progress.finished, f"no usable {junit.name} ({error})"
    else:
        why = "the guest's pytest did not run it"
    details = [
        f"{why}; {result.describe()}",
        f"--- guest console (last {_TAIL} lines) ---\n{result.console_tail(_TAIL)}",
        f"--- inner pytest output (last {_TAIL} lines) ---\n{_tail(output, _TAIL)}",
    ]
    return Batch(
        guest,
        cases,
        missing_reason="\n\n".join(details),
        running=progress.running,
        dmesg_tail=result.dmesg_tail(_TAIL),
    )


def _reports(item: pytest.Item, batch: Batch) -> list[pytest.TestReport]:
    if batch.unavailable:
        message = f"{batch.unavailable}. {hostcheck.HOW_TO_GET_PIECES}"
        if hostcheck.in_ci():
            failure = InnerFailure(f"CI=true, so this is a failure: {message}", batch.unavailable)
            return _with_teardown(
                item, [_report(item, "setup", "passed"), _failed_call(item, failure)]
            )
        return _with_teardown(item, [_report(item, "setup", "skipped", _skip(item, message))])
    case = batch.cases.get(junit_key(inner_nodeid(item)))
    if case is None:
        if batch.running == inner_nodeid(item):
            what = f"the {batch.guest} guest stopped while this test ran"
        else:
            what = f"this test did not run in the {batch.guest} guest"
        failure = InnerFailure(f"{what}: {batch.missing_reason}", what)
        return _with_teardown(item, [_report(item, "setup", "passed"), _failed_call(item, failure)])
    return _with_teardown(item, _case_reports(item, case, batch))


def _case_reports(item: pytest.Item, case: InnerCase, batch: Batch) -> list[pytest.TestReport]:
    sections = _sections(case, batch)
    seconds = case.seconds
    if case.phase is Phase.SKIPPED:
        where = case.skip_location or (str(item.path), (item.location[1] or 0) + 1)
        return [_report(item, "setup", "skipped", (*where, case.message))]
    failure = InnerFailure(case.message, case.summary)
    if case.phase is Phase.SETUP_ERROR:
        return [_report(item, "setup", "failed", failure, sections, seconds)]
    calls = [_report(item, "setup", "passed")]
    if case.phase is Phase.FAILED:
        return [*calls, _report(item, "call", "failed", failure, sections, seconds)]
    if case.phase is Phase.XFAILED:
        return [*calls, _report(item, "call", "skipped", None, (), seconds, wasxfail=case.message)]
    calls.append(_report(item, "call", "passed", None, (), seconds))
    if case.phase is Phase.TEARDOWN_ERROR:
        calls.append(_report(item, "teardown", "failed", failure, sections))
    return calls


def _sections(case: InnerCase, batch: Batch) -> list[tuple[str, str]]:
    sections = [(f"Captured {what} (in the guest)", text) for what, text in case.captured]
    if batch.dmesg_tail:
        sections.append((f"{batch.guest} guest's dmesg (last {_TAIL} lines)", batch.dmesg_tail))
    return sections


@dataclass(frozen=True)
class _Crash:
    message: str
    path: str = ""
    lineno: int = 0


class InnerFailure:
    """A failure's text as the guest's pytest rendered it; duck-types pytest's TerminalRepr."""

    def __init__(self, text: str, summary: str) -> None:
        self.text = text
        first = (summary or text).strip().splitlines()
        self.reprcrash = _Crash(first[0] if first else "failed in the guest")

    def toterminal(self, tw: Any) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text


def _teardown(
    item: pytest.Item, nextitem: pytest.Item | None, inner: pytest.TestReport
) -> pytest.TestReport:
    """Tear down what earlier, native tests set up and ``nextitem`` does not share.

    pytest's own protocol does this after every test; skipping it for a delegated test would
    leave the previous test's module on the setup stack. A failure there is this item's
    teardown error, as it would be natively; otherwise the inner teardown report stands.
    """
    setupstate = item.session._setupstate  # no public API for this step
    call = pytest.CallInfo.from_call(lambda: setupstate.teardown_exact(nextitem), "teardown")
    if call.excinfo is None:
        return inner
    return pytest.TestReport.from_item_and_call(item, call)


def _failed_call(item: pytest.Item, failure: InnerFailure) -> pytest.TestReport:
    return _report(item, "call", "failed", failure)


def _with_teardown(item: pytest.Item, reports: list[pytest.TestReport]) -> list[pytest.TestReport]:
    if reports[-1].when != "teardown":
        reports.append(_report(item, "teardown", "passed"))
    return reports


def _skip(item: pytest.Item, reason: str) -> tuple[str, int, str]:
    return str(item.path), (item.location[1] or 0) + 1, f"Skipped: {reason}"


def _report(
    item: pytest.Item,
    when: Literal["setup", "call", "teardown"],
    outcome: _Outcome,
    longrepr: InnerFailure | tuple[str, int, str] | None = None,
    sections: Iterable[tuple[str, str]] = (),
    seconds: float = 0.0,
    **extra: object,
) -> pytest.TestReport:
    now = time.time()
    return pytest.TestReport(
        item.nodeid,
        item.location,
        dict.fromkeys(item.keywords, 1),
        outcome,
        cast("TerminalRepr | tuple[str, int, str] | None", longrepr),  # InnerFailure duck-types it
        when,
        sections,
        seconds,
        now - seconds,
        now,
        item.user_properties,
        **extra,
    )


def _emit(item: pytest.Item, reports: Iterable[pytest.TestReport]) -> None:
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
