"""containerd's devmapper snapshotter on a thinwatchd pool, end to end, in the systemd guest.

Debian's containerd (scripts/bootstrap installs it) runs with docs/containerd-config.toml as its
/etc/containerd/config.toml, unchanged, and systemd/containerd.service.d/thinwatchd.conf as its
drop-in; thinwatchd runs from its shipped unit (tests.kernel.harness.installed_unit), with a
pool named as in that config, small at first. The test proves:

- ordering, from systemd's own records: starting containerd pulls thinwatchd in, and thinwatchd
  was active (READY=1: the pool exists) before containerd's main process started;
- an image built here (an OCI layout tar, no registry) imports with ``ctr image import
  --snapshotter devmapper`` and unpacks into devmapper snapshots: thin volumes of the pool;
- two containers' snapshots on that image are prepared, mounted and filled past the pool's
  size at containerd's start, with no out-of-space episode in the kernel log;
- with ``discard_blocks = true``, removing the containers' snapshots gives the data file's
  blocks back to the host filesystem (st_blocks).

It replaces containerd's config and state in /etc and /var/lib: it runs only in the guest.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.harness import REPO, MiB
from tests.systemd.consumers import BLOCK, ConsumerSetup, consumer_setup, guest_with, run
from tests.systemd.oci_image import Image

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

DOCS_CONFIG = REPO / "docs" / "containerd-config.toml"
CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
NAMESPACE = "thinwatchd-test"
SNAPSHOTTER = "devmapper"
#: The test pool: small, with a small mark and steps, so a few hundred MiB fill it past its first
#: size (the example's 2 GiB mark would have it grown to 4 GiB before containerd starts).
TEST_POOL = {"data_size": "256MiB", "low_water_mark": 1024, "data": {"step": "256MiB"}}
#: Written into the containers beyond the pool's size at containerd's start.
OVERFILL = 128 * MiB
FILE_SIZE = 64 * MiB
#: Share of the containers' writes the data file must give back when they are removed.
GIVEN_BACK = 0.8
TOOLS = ("containerd", "ctr", "dmsetup", "blkdiscard", "mkfs.ext4")


def ctr(*args: str, timeout: float = 300) -> str:
    done = run("ctr", "--namespace", NAMESPACE, *args, timeout=timeout)
    assert done.returncode == 0, f"ctr {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def snapshots(*args: str) -> str:
    return ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args)


def docs_plugin_config() -> dict[str, str]:
    """The devmapper section of docs/containerd-config.toml."""
    plugins = tomllib.loads(DOCS_CONFIG.read_text())["plugins"]
    section: dict[str, str] = plugins["io.containerd.snapshotter.v1.devmapper"]
    return section


def docs_pool_name() -> str:
    """The pool docs/containerd-config.toml names (consumer_setup: the example has it too)."""
    return docs_plugin_config()["pool_name"]


def built_image() -> Image:
    """Two layers: a few files, then one more file and a change (a few MiB, so unpacking writes)."""
    blob = bytes(range(256)) * (4 * MiB // 256)
    base = {
        "etc/os-release": b"ID=thinwatchd-test\n",
        "usr/share/blob": blob,
        "app/hello.txt": b"hello from layer 1\n",
    }
    top = {"app/hello.txt": b"hello from layer 2\n", "app/config.json": b'{"pool": true}\n'}
    return Image("localhost/thinwatchd-test:1", [base, top])


@dataclass
class Container:
    """A container's writable snapshot on the image, mounted where the test can fill it."""

    key: str
    target: Path
    source: str = ""
    written: int = 0

    def prepare(self, parent: str) -> None:
        snapshots("prepare", self.key, parent)
        line = snapshots("mounts", str(self.target), self.key).strip()
        found = re.fullmatch(r"mount -t (\S+) (\S+) \S+ -o ?(\S*)", line)
        assert found, f"unexpected mounts: {line!r}"
        fstype, self.source, options = found.groups()
        self.target.mkdir(parents=True, exist_ok=True)
        mount = ["mount", "-t", fstype, *(["-o", options] if options else []), self.source]
        done = run(*mount, str(self.target))
        assert done.returncode == 0, done.stderr

    def fill(self, size: int) -> None:
        """Write size bytes in fsynced files, as a container writing its data would."""
        chunk = b"thinwatchd" * (MiB // 10) + b"\n" * (MiB % 10)
        for n in range(size // FILE_SIZE):
            with open(self.target / f"fill-{n}", "wb") as out:
                for _ in range(FILE_SIZE // MiB):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            self.written += FILE_SIZE

    def unmount(self) -> None:
        if os.path.ismount(self.target):
            done = run("umount", str(self.target))
            assert done.returncode == 0, done.stderr


class Setup(ConsumerSetup):
    def volumes(self) -> set[str]:
        """containerd's thin volumes: its devmapper snapshots, <pool>-snap-<id>."""
        return {d.name for d in self.dm.list_devices() if d.name.startswith(f"{self.pool}-snap-")}


@pytest.fixture
def setup() -> Iterator[Setup]:
    guest_with("containerd", "containerd", *TOOLS)
    pool = docs_pool_name()
    root_path = Path(docs_plugin_config()["root_path"])
    saved = CONTAINERD_CONFIG.read_bytes() if CONTAINERD_CONFIG.exists() else None
    try:
        with consumer_setup(Setup, "containerd", DOCS_CONFIG, pool, TEST_POOL) as setup:
            CONTAINERD_CONFIG.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DOCS_CONFIG, CONTAINERD_CONFIG)  # as the docs give it
            shutil.rmtree(root_path, ignore_errors=True)  # no state from an earlier run
            try:
                yield setup
            finally:
                _stop_containerd(setup)
    finally:
        if saved is not None:
            CONTAINERD_CONFIG.write_bytes(saved)
        run("systemctl", "reset-failed", "containerd.service")
        shutil.rmtree(root_path, ignore_errors=True)


def _stop_containerd(setup: Setup) -> None:
    for mounted in setup.directory.glob("rootfs-*"):
        if os.path.ismount(mounted):
            run("umount", "-l", str(mounted))
    run("systemctl", "stop", "containerd.service")


def collect_garbage() -> None:
    """Have containerd collect its garbage now, and wait for it: create a lease and remove it with
    ``--sync``. Removed snapshots are deleted from the snapshotter only by the collector, which
    after its first run is scheduled every 49 times its average run time (pause_threshold 0.02);
    in a slow guest that was longer than the test waited (CI, d1229bf)."""
    lease = ctr("leases", "create").split()[0]
    ctr("leases", "rm", "--sync", lease)


def _wait_gone(setup: Setup, devices: set[str], timeout: float = 120) -> None:
    """Wait for containerd's garbage collector to delete these thin volumes."""
    collect_garbage()
    deadline = time.monotonic() + timeout
    while left := setup.volumes() & devices:
        if time.monotonic() > deadline:
            pytest.fail(f"not removed: {sorted(left)}\n{_removal_diagnosis(setup, left)}")
        time.sleep(0.5)


def _removal_diagnosis(setup: Setup, left: set[str]) -> str:
    """What containerd said above info level, what it still lists, and who holds the volumes."""
    said = [
        line
        for line in setup.journal("containerd").splitlines()
        if "level=info" not in line and "level=debug" not in line
    ]
    held = [f"{name}: {setup.dm.info(name)}" for name in sorted(left)]
    listed = snapshots("ls")
    return "\n".join(["containerd:", *said[-60:], "snapshots:", listed, "volumes:", *held])


def test_containerd_on_a_thinwatchd_pool(setup: Setup) -> None:
    started = time.monotonic()
    # 1. Starting containerd starts thinwatchd first (the drop-in's Wants= and After=).
    ready_before = setup.start()
    plugins = ctr("plugins", "ls")
    assert re.search(rf"io\.containerd\.snapshotter\.v1\s+{SNAPSHOTTER}\s+\S+\s+ok", plugins), (
        plugins + setup.logs()
    )
    first = setup.first_size()
    setup.figures.update(pool_first_bytes=first, ready_after_s=ready_before)

    # 2. An image built here, imported and unpacked into devmapper snapshots.
    image = built_image()
    archive = setup.directory / "image.tar"
    image.write_layout_tar(archive)
    ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(archive))
    assert image.name in ctr("images", "ls", "-q").split()
    listed = snapshots("ls")
    layers = [image.diff_ids[0], image.top_chain_id]  # the chain IDs of layers 1 and 1+2
    for chain in layers:
        assert re.search(rf"^{chain}\s.*Committed", listed, re.M), listed
    assert setup.volumes() == set(), "committed layers stay deactivated"

    # 3. Two containers' snapshots on it, mounted, filled past the pool's first size.
    containers = [Container(f"ctr-{n}", setup.directory / f"rootfs-{n}") for n in (1, 2)]
    for c in containers:
        c.prepare(image.top_chain_id)
        assert c.source.startswith(f"/dev/mapper/{setup.pool}-snap-"), c.source
        assert (c.target / "app" / "hello.txt").read_bytes() == b"hello from layer 2\n"
        assert (c.target / "usr" / "share" / "blob").stat().st_size == 4 * MiB
    per_container = -(-(first + OVERFILL) // len(containers) // FILE_SIZE) * FILE_SIZE
    for c in containers:
        c.fill(per_container)
    for c in containers:
        c.unmount()
    written = sum(c.written for c in containers)
    setup.check_filled(first, written)

    # 4. Removing the containers (discard_blocks) gives their blocks back to the filesystem.
    filled = setup.allocated()
    devices = {Path(c.source).name for c in containers}
    assert devices <= setup.volumes()
    snapshots("rm", *(c.key for c in containers))
    removing = time.monotonic()
    _wait_gone(setup, devices)
    setup.figures.update(volumes_removed_after_s=round(time.monotonic() - removing, 1))
    after_containers = setup.allocated()
    ctr("images", "rm", "--sync", image.name)
    assert snapshots("ls").strip().splitlines()[1:] == [], "the image's layers are removed"
    after_image = setup.allocated()
    used_after = setup.status().data_used
    setup.figures.update(
        allocated_filled=filled,
        allocated_after_containers_rm=after_containers,
        allocated_after_image_rm=after_image,
        pool_used_after_bytes=used_after * BLOCK,
        test_seconds=round(time.monotonic() - started, 1),
    )
    assert filled - after_containers >= GIVEN_BACK * written, setup.figures
    assert used_after == 0, setup.figures  # the pool is empty again
