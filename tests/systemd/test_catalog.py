"""`journalctl -x` explains thinwatchd's entries from its catalog, in the systemd guest.

The catalog goes where the Debian package puts it (/usr/lib/systemd/catalog/), systemd builds
its database (`journalctl --update-catalog`, as its dpkg trigger does), and the real unit logs
two entries: a pool created at start, and a reload. `journalctl -xu thinwatchd` must show each
under its entry, with the entry's own fields in place of @POOL@. (tests/unit/test_catalog.py
checks every entry on the host; this shows the whole path once, on a live journal.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.harness import REPO, installed_unit, pool_config, scratch_dir, teardown
from tests.kernel.harness import unit_journal
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
SOURCE = REPO / "systemd" / "thinwatchd.catalog"
INSTALLED = Path("/usr/lib/systemd/catalog/thinwatchd.catalog")


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


@pytest.fixture
def catalog() -> Iterator[None]:
    """Install the catalog and build systemd's database; afterwards leave both as found."""
    before = INSTALLED.read_bytes() if INSTALLED.exists() else None
    shutil.copy(SOURCE, INSTALLED)
    try:
        run("journalctl", "--update-catalog")
        yield
    finally:
        if before is None:
            INSTALLED.unlink(missing_ok=True)
        else:
            INSTALLED.write_bytes(before)
        subprocess.run(["journalctl", "--update-catalog"], check=False)


def explanation(message_id: MessageId, entry: dict[str, str]) -> list[str]:
    """The catalog's text for message_id as -x shows it under entry: @FIELD@ replaced."""
    text = SOURCE.read_text(encoding="utf-8")
    block = text.split(f"\n-- {message_id.value}\n", 1)[1].split("\n-- ", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    return [re.sub(r"@([A-Z0-9_]+)@", lambda m: entry[m[1]], line) for line in lines]


def test_journalctl_x_explains_the_daemons_entries(catalog: None) -> None:
    listed = run("journalctl", "--list-catalog")
    for m in MessageId:
        assert f"{m.value} thinwatchd: " in listed, m.name
    pool = f"twcat-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    dm = DeviceMapper()
    config = pool_config(pool, directory, data_size="64MiB", metadata_size="16MiB")
    try:
        with installed_unit(directory, config):
            run("systemctl", "start", UNIT)  # returns after READY=1: the pool is created
            run("systemctl", "reload", UNIT)
            deadline = time.monotonic() + 20
            while (
                not unit_journal(MessageId.CONFIG_RELOADED, since) and time.monotonic() < deadline
            ):
                time.sleep(0.2)
            for message_id in (MessageId.POOL_CREATED, MessageId.CONFIG_RELOADED):
                logged = unit_journal(message_id, since)
                assert logged, f"no {message_id.name} entry"
                shown = run(
                    "journalctl",
                    "-xu",
                    UNIT,
                    "--since",
                    since,
                    "--no-pager",
                    f"MESSAGE_ID={message_id.value}",
                ).splitlines()
                for line in explanation(message_id, logged[0]):
                    # Each catalog line comes out behind journalctl's own prefix ("░░ ").
                    assert any(s.endswith(" " + line) for s in shown), (line, shown)
    finally:
        teardown(dm, [pool], [directory / "data", directory / "metadata"])
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)
