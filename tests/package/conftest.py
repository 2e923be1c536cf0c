"""Build the Debian packages on the host before the guests boot, when the systemd guest's
tests/systemd/test_debian_package.py is selected.

The guests boot at the session's first guest test, side by side (tests/vm/pytest_plugin.py),
long before tests/package's own tests run; a package the guest finds missing or stale it
builds itself, under TCG: about 7 min for the two, against 30 s here. This hook runs once
collection is done, before any test, wherever tests/package is collected (a full run, or `-m`
of any kind); `pytest tests/systemd/...` alone does not collect it, and then the guest builds.
"""

from __future__ import annotations

import time

import pytest

from tests.package.deb import build, build_upgrade
from tests.vm import hostcheck


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    if hostcheck.in_vm() or session.config.option.collectonly:
        return
    if not any(item.path.name == "test_debian_package.py" for item in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    failed = []
    # The release linted, as tests/package wants it (a package lintian faults is still built,
    # and the guest takes it); the upgrade is not linted (tests/package/deb.py says why).
    for make in (build, build_upgrade):
        try:
            make()
        except AssertionError as error:  # tests/package and the guest's test report it
            failed.append(str(error).splitlines()[0])
    took = f"{time.monotonic() - started:.0f} s"
    message = f"failed ({'; '.join(failed)}) in {took}" if failed else f"built or current in {took}"
    if reporter is not None:
        reporter.write_line(f"[deb] the Debian packages for the systemd guest: {message}")
