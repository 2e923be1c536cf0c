"""Docker's devicemapper storage driver on a thinwatchd pool, end to end, in the systemd guest.

Debian's docker.io 20.10 (scripts/bootstrap installs it) runs with docs/docker-daemon.json as its
/etc/docker/daemon.json, plus only the test-only keys below (the guest has no network), and with
systemd/docker.service.d/thinwatchd.conf as its drop-in; thinwatchd runs from its shipped unit
(tests.kernel.harness.installed_unit), with the pool the daemon.json names, small at first. The
test proves:

- ordering, from systemd's own records: starting docker pulls thinwatchd in, and thinwatchd was
  active (READY=1: the pool exists) before dockerd's main process started;
- ``docker info``: the devicemapper driver on that pool (no loop files of its own), udev sync,
  deferred removal and deletion, and docker's minimum free space;
- an image built here (busybox, ``docker import``: no registry), and containers on it that write
  past the pool's size at docker's start, all at once, with no out-of-space episode in the kernel
  log; what they wrote reads back intact (md5, from the pool: a stopped container's volume is
  unmounted);
- docker creates containers all through that fill (a ``docker create`` loop), and never refuses
  with dm.min_free_space's "less than minimum required" (a create that activates a volume while
  a growth has the pool suspended fails in the kernel, and is counted apart; README, "A create
  during a growth"): the kernel's event comes at thinwatchd's
  mark, a fifth of the pool free (the 80% threshold) or the adaptive mark if larger, and docker
  wants a tenth. The pool's free share is also sampled every 0.2 s and must never fall below
  docker's minimum, which the creates alone could miss (they take seconds each);
- with dm.blkdiscard, ``docker rm`` gives the containers' blocks back to the host filesystem
  (the data file's st_blocks).

It fails without the drop-in (dockerd: "devicemapper: Non existing device docker-pool"), with
dm.min_free_space=45% (a create refused), with thinwatchd's threshold at 95% and a fixed mark
(free down to 5%), and with dm.blkdiscard=false (nothing given back).

It replaces docker's config and state in /etc and /var/lib: it runs only in the guest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.harness import REPO, MiB
from tests.kernel.harness import dirty_bytes
from tests.systemd.consumers import BLOCK, ConsumerSetup, consumer_setup, guest_with, run
from tests.vm.initramfs import find_static_busybox
from thinwatchd.thin.table import parse_pool_table

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

DOCS_CONFIG = REPO / "docs" / "docker-daemon.json"
DAEMON_JSON = Path("/etc/docker/daemon.json")
DATA_ROOT = Path("/var/lib/docker")  # dockerd's default data-root, its devicemapper metadata
#: Debian's client, the one that matches its dockerd (another may come first on PATH).
DOCKER = "/usr/bin/docker"
IMAGE = "localhost/thinwatchd-test:1"
#: dm.min_free_space's refusal (daemon/graphdriver/devmapper/deviceset.go, poolHasFreeSpace).
REFUSED = "less than minimum required"
#: A growth reloads the pool, and while it is suspended (the growth's RELOAD_MS) dm-thin's
#: thin_ctr refuses to activate a thin volume: docker's create then fails with the first, the
#: kernel log says the second, and docker does not retry. Inherent to growing a live pool (LVM's
#: autoextend has the same window); counted and said, never any other failure.
ACTIVATION_FAILED = "Error activating devmapper device"
POOL_SUSPENDED = "Unable to activate thin device while pool is suspended"

# --- test-only settings: not what docs/docker-daemon.json or a user needs -----------------------
#: daemon.json keys the guest needs: it has no network, so no bridge, NAT or forwarding rules.
TEST_DAEMON_KEYS = {"bridge": "none", "iptables": False, "ip-forward": False, "ip-masq": False}
#: Container options: no network; and the guest's kernel has AppArmor on but the host image has no
#: apparmor_parser to load docker's profile (a real host has the apparmor package).
TEST_RUN_OPTS = ("--network", "none", "--security-opt", "apparmor=unconfined")
#: The page cache's dirty limit while thinwatchd starts and the containers write. The adaptive
#: mark holds the dirty limit (a 2 GiB guest's is about 360 MiB): thinwatchd would grow the pool
#: to 870 MiB before docker starts, and the containers would have to write over 1 GiB.
DIRTY_LIMIT = 16 * MiB
# ------------------------------------------------------------------------------------------------

#: The test pool: small, with steps of 256 MiB, and a configured mark of 16 MiB (256 blocks):
#: below docker's minimum (10%) from the start, so that only what the README relies on keeps
#: docker creating: the 80% threshold (the kernel's event at 20% free) and the adaptive mark.
TEST_POOL = {"data_size": "384MiB", "low_water_mark": 256, "data": {"step": "256MiB"}}
WRITERS = 2
#: Written by the containers beyond the pool's size at docker's start.
OVERFILL = 32 * MiB
#: Share of the containers' writes the data file must give back when they are removed.
GIVEN_BACK = 0.8

#: The image's /fill: write $2 MiB to /data/fill, each MiB a line naming it and /seed; when that
#: was done before (the container runs again), print the file's md5 instead.
FILL_SCRIPT = b"""#!/bin/sh
set -e
if [ -e /data/done ]; then md5sum /data/fill; exit 0; fi
i=0
while [ "$i" -lt "$2" ]; do i=$((i + 1)); echo "$1 $i"; cat /seed; done > /data/fill
sync
touch /data/done
"""
BUSYBOX_APPLETS = ("sh", "cat", "echo", "md5sum", "sync", "touch", "true")


def docker(*args: str, timeout: float = 300) -> str:
    done = run(DOCKER, *args, timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def docs_options() -> dict[str, str]:
    """docs/docker-daemon.json's storage-opts, by key."""
    doc = json.loads(DOCS_CONFIG.read_text())
    assert doc["storage-driver"] == "devicemapper", doc
    return dict(opt.split("=", 1) for opt in doc["storage-opts"])


def docs_pool_name() -> str:
    """The pool docs/docker-daemon.json names (consumer_setup: config.example.yaml has it too)."""
    return docs_options()["dm.thinpooldev"].removeprefix("/dev/mapper/")


def rootfs_tar(seed: bytes) -> bytes:
    """A root filesystem for ``docker import``: the host's static busybox, /fill and /seed."""
    busybox = find_static_busybox()
    assert busybox is not None, "no static busybox: `bash scripts/bootstrap` installs it"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("bin", "data", "dev", "etc", "proc", "sys", "tmp"):
            entry = tarfile.TarInfo(name)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        tar.add(busybox, "bin/busybox")
        for applet in BUSYBOX_APPLETS:
            entry = tarfile.TarInfo(f"bin/{applet}")
            entry.type, entry.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(entry)
        for name, data, mode in (("fill", FILL_SCRIPT, 0o755), ("seed", seed, 0o644)):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode = len(data), mode
            tar.addfile(entry, io.BytesIO(data))
    return out.getvalue()


def expected_md5(name: str, mib: int, seed: bytes) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for i in range(1, mib + 1):
        digest.update(f"{name} {i}\n".encode())
        digest.update(seed)
    return digest.hexdigest()


class Setup(ConsumerSetup):
    def mark_bytes(self) -> int:
        """The low-water mark in the pool's table (thinwatchd's, adaptive), in bytes."""
        return parse_pool_table(self.dm.table(self.pool)[0].params).low_water_mark * BLOCK

    def lap(self, phase: str, since: float) -> float:
        """Keep a phase's seconds in the figures; return now."""
        now = time.monotonic()
        self.figures[f"{phase}_s"] = round(now - since, 1)
        return now

    def volumes(self) -> set[str]:
        """Docker's thin volumes: docker-<major>:<minor>-<inode>-<id> (base, images, containers)."""
        names = (d.name for d in self.dm.list_devices())
        return {n for n in names if re.match(r"docker-\d+:\d+-\d+-", n)}


@pytest.fixture
def setup() -> Iterator[Setup]:
    guest_with("docker", "docker.io", "/usr/sbin/dockerd", DOCKER, "dmsetup", "mkfs.xfs")
    pool = docs_pool_name()
    saved = DAEMON_JSON.read_bytes() if DAEMON_JSON.exists() else None
    made = not DAEMON_JSON.parent.exists()
    try:
        with (
            dirty_bytes(DIRTY_LIMIT),
            consumer_setup(Setup, "docker", DOCS_CONFIG, pool, TEST_POOL) as setup,
        ):
            daemon = json.loads(DOCS_CONFIG.read_text())  # as the docs give it...
            daemon.update(TEST_DAEMON_KEYS)  # ...with the test-only keys
            DAEMON_JSON.parent.mkdir(parents=True, exist_ok=True)
            DAEMON_JSON.write_text(json.dumps(daemon, indent=2))
            shutil.rmtree(DATA_ROOT, ignore_errors=True)  # no state from an earlier run
            try:
                yield setup
            finally:
                # dockerd first (it pulled containerd in), with no client left to reactivate it.
                run("systemctl", "stop", "docker.socket", "docker.service", "containerd.service")
    finally:
        DAEMON_JSON.unlink(missing_ok=True)
        if saved is not None:
            DAEMON_JSON.write_bytes(saved)
        if made:
            shutil.rmtree(DAEMON_JSON.parent, ignore_errors=True)
        run("systemctl", "reset-failed", "docker.service", "containerd.service")
        run("umount", "-R", "-l", str(DATA_ROOT))
        shutil.rmtree(DATA_ROOT, ignore_errors=True)


@dataclass
class Create:
    """One ``docker create`` during the fill: when (s since the fill began), the pool's free share
    as it began, and docker's answer."""

    began: float
    took: float
    free_share: float
    done: subprocess.CompletedProcess[str]


class Creator(threading.Thread):
    """``docker create`` in a loop until stopped; each outcome kept. A sampler of the pool's
    free share rides along (every 0.2 s): docker refuses below its dm.min_free_space."""

    def __init__(self, setup: Setup) -> None:
        super().__init__(daemon=True)
        self.setup = setup
        self.stop = threading.Event()
        self.creates: list[Create] = []
        self.lowest_free_share = 1.0
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.t0 = time.monotonic()

    def run(self) -> None:
        self.sampler.start()
        while not self.stop.is_set():
            began = time.monotonic()
            share = self.free_share()
            done = run(DOCKER, "create", *TEST_RUN_OPTS, IMAGE, "true")
            took = time.monotonic() - began
            self.creates.append(Create(round(began - self.t0, 1), round(took, 1), share, done))

    def free_share(self) -> float:
        st = self.setup.status()
        return round(st.data_free / st.data_total, 3)

    def _sample(self) -> None:
        while not self.stop.wait(0.2):
            self.lowest_free_share = min(self.lowest_free_share, self.free_share())

    def finish(self) -> None:
        self.stop.set()
        self.join(120)
        self.sampler.join(5)

    def created(self) -> list[str]:
        return [c.done.stdout.strip() for c in self.creates if c.done.returncode == 0]


def test_docker_on_a_thinwatchd_pool(setup: Setup) -> None:
    started = time.monotonic()
    # 1. Starting docker starts thinwatchd first (the drop-in's Wants= and After=).
    ready_before = setup.start(timeout=600)

    # 2. docker info: the devicemapper driver on thinwatchd's pool, as docs/docker-daemon.json says.
    info = json.loads(docker("info", "--format", "{{json .}}"))
    assert info["Driver"] == "devicemapper", info["Driver"]
    driver = dict(info["DriverStatus"])
    assert driver["Pool Name"] == setup.pool, driver
    assert not any("loop" in key.lower() for key in driver), driver  # no pool of its own
    assert driver["Udev Sync Supported"] == "true", driver
    assert driver["Deferred Removal Enabled"] == "true", driver
    assert driver["Deferred Deletion Enabled"] == "true", driver
    min_free = int(docs_options()["dm.min_free_space"].removesuffix("%"))
    first = setup.first_size()
    setup.figures.update(
        pool_first_bytes=first,
        ready_before_dockerd_s=ready_before,
        docker_min_free_space=driver["Thin Pool Minimum Free Space"],
        base_device_used_bytes=setup.status().data_used * BLOCK,
    )
    lap = setup.lap("start", started)

    # 3. An image built here; containers on it fill the pool past its first size, all at once,
    #    while docker keeps creating containers.
    seed = os.urandom(MiB)
    archive = setup.directory / "rootfs.tar"
    archive.write_bytes(rootfs_tar(seed))
    docker("import", str(archive), IMAGE)
    mib = -(-(first + OVERFILL) // WRITERS // MiB)
    writers = [f"writer-{n}" for n in range(1, WRITERS + 1)]
    for name in writers:
        docker("create", "--name", name, *TEST_RUN_OPTS, IMAGE, "/fill", name, str(mib))
    lap = setup.lap("image", lap)
    creator = Creator(setup)
    try:
        creator.start()
        docker("start", *writers)
        codes = docker("wait", *writers, timeout=900).split()
    finally:
        creator.finish()
    lap = setup.lap("fill", lap)
    assert codes == ["0"] * WRITERS, (codes, [docker("logs", w) for w in writers])
    written = WRITERS * mib * MiB
    st = setup.check_filled(first, written)
    failed = [c.done.stderr for c in creator.creates if c.done.returncode != 0]
    in_a_growth = [f for f in failed if ACTIVATION_FAILED in f]
    refused = [f for f in failed if f not in in_a_growth]
    setup.figures.update(
        creates=len(creator.creates),
        creates_refused=len(refused),
        creates_failed_in_a_growth=len(in_a_growth),
        lowest_free_share=creator.lowest_free_share,
        creates_at=[(c.began, c.took, c.free_share) for c in creator.creates],
        mark_bytes_at_end=setup.mark_bytes(),
        docker_min_bytes_at_end=st.data_total * min_free // 100 * BLOCK,
    )
    assert refused == [], refused
    if in_a_growth:  # only while a growth had the pool suspended
        assert POOL_SUSPENDED in setup.klog.text() and setup.grown(), (in_a_growth, setup.logs())
    assert len(creator.creates) >= 3, setup.figures  # the loop ran through the fill, not once
    assert creator.lowest_free_share * 100 >= min_free, setup.figures
    assert REFUSED not in setup.journal("docker")  # nor anything else docker created

    # 4. What they wrote reads back intact: each writer runs again and prints its file's md5
    #    (the expected ones are computed meanwhile).
    expected: dict[str, str] = {}
    summer = threading.Thread(
        target=lambda: expected.update({n: expected_md5(n, mib, seed) for n in writers})
    )
    summer.start()
    docker("start", *writers)
    codes = docker("wait", *writers, timeout=600).split()
    summer.join()
    assert codes == ["0"] * WRITERS, codes
    for name in writers:
        printed = docker("logs", name).split()
        assert printed == [expected[name], "/data/fill"], printed
    lap = setup.lap("verify", lap)

    # 5. docker rm (dm.blkdiscard) gives the writers' blocks back to the host filesystem. A volume
    #    still open when removed (udev probing it after its unmount) is discarded and deleted by
    #    docker's deferred deletion worker, every 30 s: wait for it (up to 75 s).
    filled = setup.allocated()
    docker("rm", *writers)
    deadline = time.monotonic() + 75
    while (given := filled - setup.allocated()) < GIVEN_BACK * written:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    lap = setup.lap("rm", lap)
    setup.figures.update(
        allocated_filled=filled,
        allocated_after_rm=filled - given,
        pool_used_after_rm_bytes=setup.status().data_used * BLOCK,
        test_s=round(time.monotonic() - started, 1),
    )
    assert given >= GIVEN_BACK * written, setup.figures
