"""thinwatchd as a real systemd service, in the systemd guest: notify, journal, reload, watchdog.

The unit under test is systemd/thinwatchd.service as shipped, plus a drop-in that only points it
at this checkout's virtualenv and the scratch disk (what an admin's drop-in would do for pool
files outside /var/lib/thinwatchd).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbed.harness import REPO, MiB, create_thin, dd_zero, installed_unit, scratch_dir, teardown
from tests.kernel.harness import unit_journal
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
CONFIG = Path("/etc/thinwatchd/config.yaml")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def sample(metrics: str, series: str) -> float:
    """Return the value of one series in a metrics file's text."""
    found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
    assert found is not None, f"{series} is not in:\n{metrics}"
    return float(found[1])


def show(prop: str) -> str:
    return run("systemctl", "show", "-P", prop, UNIT).stdout.strip()


@dataclass
class Service:
    pool: str
    directory: Path
    dm: DeviceMapper
    since: str

    def write_config(self, **pool: object) -> None:
        CONFIG.write_text(yaml.safe_dump(self.config(**pool)))

    def config(self, **pool: object) -> dict[str, object]:
        keys: dict[str, object] = {
            "data_file": str(self.directory / "data"),
            "metadata_file": str(self.directory / "metadata"),
            "data_size": "64MiB",
            "metadata_size": "16MiB",
        }
        keys.update(pool)
        return {
            "daemon": {"check_interval": "2s", "metrics_file": str(self.directory / "m.prom")},
            "pools": {self.pool: keys},
        }

    def status(self) -> ThinPoolWorkingStatus:
        st = parse_pool_status(self.dm.status(self.pool)[0].params)
        assert isinstance(st, ThinPoolWorkingStatus)
        return st

    def logs(self) -> str:
        return run(
            "journalctl", "-u", UNIT, "--since", self.since, "--no-pager", "-o", "json", check=False
        ).stdout


@pytest.fixture
def service() -> Iterator[Service]:
    pool = f"twsvc-{uuid.uuid4().hex[:6]}"
    directory = scratch_dir() / pool
    directory.mkdir()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    dm = DeviceMapper()
    svc = Service(pool, directory, dm, since)
    try:
        with installed_unit(directory, svc.config()):
            dropin = Path(f"/etc/systemd/system/{UNIT}.d/watchdog.conf")
            dropin.write_text("[Service]\nWatchdogSec=6s\nRestartSec=1s\n")  # quick to test
            run("systemctl", "daemon-reload")
            yield svc
    finally:
        teardown(dm, [f"{pool}-thin", pool], [directory / "data", directory / "metadata"])
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_start_returns_after_ready_with_the_node(service: Service) -> None:
    service.write_config()
    done = run("systemctl", "start", UNIT, check=False)
    assert done.returncode == 0, done.stderr + service.logs()
    # systemctl start of a Type=notify unit returns only after READY=1
    assert os.path.exists(f"/dev/mapper/{service.pool}"), service.logs()
    assert show("ActiveState") == "active"
    assert "1 pool" in show("StatusText")
    created = unit_journal(MessageId.POOL_CREATED, service.since)
    assert created and created[0]["POOL"] == service.pool, service.logs()


def test_fill_logs_growth_with_fields_and_metrics_agree(service: Service) -> None:
    service.write_config(data={"max_size": "16GiB"})  # a cap far away, for its metric
    run("systemctl", "start", UNIT)
    thin = create_thin(service.dm, service.pool, f"{service.pool}-thin", 0, 2048 * MiB)
    _seconds, code, err = dd_zero(thin, 600)
    assert code == 0, err
    grown = unit_journal(MessageId.DATA_GROWN, service.since)
    assert grown, service.logs()
    entry = grown[0]
    for key in (
        "POOL",
        "OLD_SIZE_BYTES",
        "NEW_SIZE_BYTES",
        "GROWTH_MS",
        "DATA_USED_BYTES",
        "DATA_TOTAL_BYTES",
        "METADATA_USED_BYTES",
        "METADATA_TOTAL_BYTES",
        "POOL_MODE",
    ):
        assert key in entry, entry
    assert entry["PRIORITY"] == "6" and entry["SYSLOG_IDENTIFIER"] == "thinwatchd"
    assert int(entry["NEW_SIZE_BYTES"]) > int(entry["OLD_SIZE_BYTES"])
    time.sleep(3)  # one safety check after the writer: metrics and status are fresh
    st = service.status()
    metrics = (service.directory / "m.prom").read_text()
    label = f'{{pool="{service.pool}"}}'
    assert f"thinwatchd_data_total_bytes{label} {st.data_total * 65536}" in metrics
    assert f"thinwatchd_data_used_bytes{label} {st.data_used * 65536}" in metrics
    report = json.loads(
        run(f"{REPO}/.venv/bin/thinwatchd", "--config", str(CONFIG), "status", "--json").stdout
    )
    (pool,) = report["pools"]
    assert pool["data_total"] == st.data_total * 65536 and pool["data_used"] == st.data_used * 65536
    assert pool["mode"] == "rw"
    # What the data file takes on disk, beside the data in use (discards give the rest back).
    allocated = (service.directory / "data").stat().st_blocks * 512
    assert pool["data_file_allocated"] == allocated >= pool["data_used"]
    # Preallocated (the default): the file is allocated whole on purpose, nothing to give back.
    assert pool["reclaimable"] is None
    assert f"thinwatchd_data_file_allocated_bytes{label} {allocated}" in metrics
    assert "DATA_FILE_ALLOCATED_BYTES" in grown[-1], grown[-1]
    assert f"thinwatchd_data_max_bytes{label} {16 * 1024**3}" in metrics
    assert f'thinwatchd_growth_refused{{pool="{service.pool}",target="data"}} 0' in metrics
    # Time to full, at the fill rate measured during the fill (the last minute's steepest).
    rate = sample(metrics, f"thinwatchd_fill_rate_bytes_per_second{label}")
    to_cap = sample(metrics, f"thinwatchd_seconds_to_cap{label}")
    assert rate > 0 and to_cap == pytest.approx((16 * 1024**3 - st.data_used * 65536) / rate)
    assert f"thinwatchd_seconds_to_backing_fs_reserve{label} " in metrics
    assert "at its" in show("StatusText"), show("StatusText")  # the soonest, within a day
    # `status` runs apart from the daemon: the estimates come from the file it writes beside
    # its lock, in the unit's RuntimeDirectory.
    assert pool["estimated"] is True and pool["fill_rate_bytes_per_second"] > 0, pool
    # (Later than the metrics above, by a pass or more: the rate has eased since the writer ended.)
    assert pool["seconds_to_cap"] > 0 and pool["seconds_to_backing_fs_reserve"] > 0
    table = run(f"{REPO}/.venv/bin/thinwatchd", "--config", str(CONFIG), "status").stdout
    header, row = table.splitlines()[:2]
    assert "?" not in row[header.index("CAP IN") :] and " min" in row, table
    soon = unit_journal(MessageId.FULL_SOON, service.since)  # the cap: minutes away, within 1 h
    assert [e["LIMIT"] for e in soon if e["LIMIT"] == "cap"] == ["cap"], service.logs()
    out = os.environ.get("THINWATCHD_VM_OUT")
    if out:  # a real daemon's file: monitoring/sample.prom was recorded so
        Path(out, "metrics-sample.prom").write_text(metrics)


def test_reload_changes_policy_and_survives_a_broken_edit(service: Service) -> None:
    # A fixed mark (no writeback headroom, which would grow the pool at start-up): the first
    # growth comes during the write, after the reload.
    fixed = {"adaptive_low_water": False}
    service.write_config(low_water_mark=64, data=fixed)
    run("systemctl", "start", UNIT)
    service.write_config(low_water_mark=64, data={"step": "3GiB", "step_percent": "0%", **fixed})
    run("systemctl", "reload", UNIT)
    reloaded = unit_journal(MessageId.CONFIG_RELOADED, service.since)
    assert reloaded, service.logs()
    thin = create_thin(service.dm, service.pool, f"{service.pool}-thin", 0, 4096 * MiB)
    assert dd_zero(thin, 600)[1] == 0
    sizes = [
        int(e["NEW_SIZE_BYTES"]) - int(e["OLD_SIZE_BYTES"])
        for e in unit_journal(MessageId.DATA_GROWN, service.since)
    ]
    assert sizes and max(sizes) >= 3 * 1024**3, service.logs()
    CONFIG.write_text(CONFIG.read_text().replace("3GiB", "3 gigs"))
    run("systemctl", "reload", UNIT)
    time.sleep(1)
    assert show("ActiveState") == "active"
    rejected = unit_journal(MessageId.CONFIG_REJECTED, service.since)
    assert rejected and "data.step" in rejected[-1]["MESSAGE"], service.logs()
    assert rejected[-1]["PRIORITY"] == "3"
    assert "config rejected" in show("StatusText")


def test_watchdog_restarts_a_frozen_daemon_which_adopts_the_pool(service: Service) -> None:
    service.write_config()
    run("systemctl", "start", UNIT)
    pid = int(show("MainPID"))
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = show("MainPID")
        if new not in ("0", str(pid)) and show("ActiveState") == "active":
            break
        time.sleep(0.5)
    else:
        raise AssertionError("not restarted by the watchdog:\n" + service.logs())
    assert "Watchdog timeout" in service.logs() or "watchdog" in service.logs().lower()
    adopted = unit_journal(MessageId.POOL_ADOPTED, service.since)
    assert adopted and adopted[-1]["ACTIVATION"] == "adopted", service.logs()
    assert len(unit_journal(MessageId.POOL_CREATED, service.since)) == 1
