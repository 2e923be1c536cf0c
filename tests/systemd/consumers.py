"""What the tests of a thinwatchd pool's consumers (containerd, docker) share, in the systemd guest.

Each such test runs thinwatchd from its shipped unit (tests.kernel.harness.installed_unit) on the
pool its consumer's documented config names, small at first, with the consumer's drop-in
(systemd/<consumer>.service.d/thinwatchd.conf) installed as shipped: consumer_setup. It then
starts the consumer, which must pull thinwatchd in and start after thinwatchd's READY=1
(ConsumerSetup.start, from systemd's own records), and fills the pool past its first size through
the consumer, which must leave it grown and writable with no out-of-space episode in the kernel
log (ConsumerSetup.check_filled). The consumer's own config, state, thin volumes and checks stay
in its test (tests/systemd/test_containerd.py, test_docker.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from testbed.harness import REPO, KernelLog, installed_unit, pool_config, scratch_dir, teardown
from tests.kernel.harness import kernel_log, unit_journal
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.thin.status import DiscardMode, PoolMode, ThinPoolWorkingStatus, parse_pool_status

THINWATCHD = "thinwatchd.service"
OUT_OF_SPACE = "switching pool to out-of-data-space"
BLOCK = 64 * 1024  # the pool's data block: data_block_size 128 sectors, the default


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout)


def show(unit: str, prop: str) -> str:
    return run("systemctl", "show", "-P", prop, unit).stdout.strip()


def guest_with(consumer: str, package: str, *tools: str) -> None:
    """Fail unless each tool is here (a command, or a path to one: scripts/bootstrap installs the
    consumer's package); skip outside the throwaway guest (the test replaces the consumer's config
    and state)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `bash scripts/bootstrap` installs {package}")
    if os.environ.get("THINWATCHD_IN_VM") != "1":
        pytest.skip(f"replaces {consumer}'s config and state: only in the throwaway guest")


@dataclass
class ConsumerSetup:
    consumer: str  # its unit's name without .service: containerd, docker
    pool: str
    directory: Path
    dm: DeviceMapper
    klog: KernelLog
    since: str
    figures: dict[str, object] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return f"{self.consumer}.service"

    @property
    def data_file(self) -> Path:
        return self.directory / "data"

    def volumes(self) -> set[str]:
        """The consumer's thin volumes in the pool, removed after the test."""
        raise NotImplementedError

    def status(self) -> ThinPoolWorkingStatus:
        st = parse_pool_status(self.dm.status(self.pool)[0].params)
        assert isinstance(st, ThinPoolWorkingStatus), st
        return st

    def table_bytes(self) -> int:
        return sum(t.length for t in self.dm.table(self.pool)) * 512

    def allocated(self) -> int:
        return self.data_file.stat().st_blocks * 512

    def journal(self, *units: str) -> str:
        unit_args = [arg for unit in units for arg in ("-u", unit)]
        return run("journalctl", *unit_args, "--since", self.since, "--no-pager").stdout

    def logs(self) -> str:
        out = self.journal("thinwatchd", self.consumer)
        return f"{out[-20000:]}\nkernel:\n{self.klog.text()}"

    def grown(self) -> list[dict[str, str]]:
        return unit_journal(MessageId.DATA_GROWN, self.since)

    def start(self, timeout: float = 300) -> float:
        """Start the consumer: that starts thinwatchd first (the drop-in's Wants= and After=), and
        thinwatchd was active (READY=1: the pool exists) before the consumer's main process
        started, by systemd's own timestamps. Returns by how many seconds."""
        assert show(THINWATCHD, "ActiveState") == "inactive"
        done = run("systemctl", "start", self.unit, timeout=timeout)
        assert done.returncode == 0, done.stderr + self.logs()
        assert THINWATCHD in show(self.unit, "Wants").split()
        assert THINWATCHD in show(self.unit, "After").split()
        assert show(THINWATCHD, "ActiveState") == "active", self.logs()
        ready = int(show(THINWATCHD, "ActiveEnterTimestampMonotonic"))
        exec_main = int(show(self.unit, "ExecMainStartTimestampMonotonic"))
        assert 0 < ready <= exec_main, (ready, exec_main)
        return (exec_main - ready) / 1e6

    def first_size(self) -> int:
        """The pool's size as the consumer starts on it; its discards are passed down (they reach
        the loop device, so the data file)."""
        st = self.status()
        assert st.discard is DiscardMode.PASSDOWN, st
        return self.table_bytes()

    def check_filled(self, first: int, written: int) -> ThinPoolWorkingStatus:
        """After the consumer wrote written bytes on a pool first bytes large: the pool holds more
        than its first size and has grown, is still writable, and the kernel logged no
        out-of-space episode. Keeps the figures; returns the pool's status."""
        st = self.status()
        grown = self.table_bytes()
        assert written > first and st.data_used * BLOCK > first, (written, first, st)
        assert grown > first and self.grown(), self.logs()
        assert st.mode is PoolMode.WRITE, st
        episodes = [m for _, m in self.klog.read() if OUT_OF_SPACE in m]
        assert episodes == [], self.logs()
        self.figures.update(
            pool_grown_bytes=grown,
            written_bytes=written,
            growths=len(self.grown()),
            out_of_space_episodes=len(episodes),
        )
        return st


S = TypeVar("S", bound=ConsumerSetup)


@contextlib.contextmanager
def consumer_setup(
    kind: type[S], consumer: str, docs: Path, pool: str, keys: dict[str, object]
) -> Iterator[S]:
    """thinwatchd's shipped unit on pool, the one the consumer's documented config (docs) names
    (config.example.yaml must have it too), with files in a fresh scratch/<consumer> and these
    keys; not started. And the consumer's drop-in as shipped. Yields the setup, of kind. In the
    with block the caller installs the consumer's config, and stops the consumer before it
    leaves. Then the drop-in goes, the consumer's volumes and the pool are torn down, and the
    figures reported."""
    example = yaml.safe_load((REPO / "config.example.yaml").read_text())
    assert pool in example["pools"], f"{docs.name}: pool {pool!r} is not in the example"
    directory = scratch_dir() / consumer
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    files = [directory / "data", directory / "metadata"]
    dropin = Path(f"/etc/systemd/system/{consumer}.service.d/thinwatchd.conf")
    made_dropin_dir = not dropin.parent.exists()
    dm = DeviceMapper()
    setup: S | None = None
    try:
        with installed_unit(directory, pool_config(pool, directory, **keys)), kernel_log() as klog:
            dropin.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "systemd" / f"{consumer}.service.d" / "thinwatchd.conf", dropin)
            run("systemctl", "daemon-reload")
            setup = kind(consumer, pool, directory, dm, klog, time.strftime("%Y-%m-%d %H:%M:%S"))
            yield setup
    finally:
        dropin.unlink(missing_ok=True)
        if made_dropin_dir:
            shutil.rmtree(dropin.parent, ignore_errors=True)
        run("systemctl", "daemon-reload")
        volumes = sorted(setup.volumes()) if setup else []
        teardown(dm, [*volumes, pool], files)
        dm.close()
        shutil.rmtree(directory, ignore_errors=True)
        if setup and setup.figures:
            _report(consumer, setup.figures)


def _report(consumer: str, figures: dict[str, object]) -> None:
    print(f"{consumer} figures:", json.dumps(figures))
    out = os.environ.get("THINWATCHD_VM_OUT")
    if out:
        Path(out, f"{consumer}-figures.json").write_text(json.dumps(figures, indent=2))
