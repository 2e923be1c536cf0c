"""Build the guest's initramfs: static busybox, the /init script and the modules it loads."""

from __future__ import annotations

import hashlib
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from tests.vm.cpio import CpioWriter
from tests.vm.modinfo import ModuleTree
from tests.vm.paths import GUEST_SOURCES

__all__ = ["WANTED_MODULES", "build_initramfs", "find_static_busybox", "initramfs_key"]

WANTED_MODULES: tuple[str, ...] = (
    # virtio transport, the disks, the stdout/stderr ports and an entropy source
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio-rng",
    # the host's root over 9p with a tmpfs overlay on top, the ext4 scratch disk
    "9pnet_virtio",
    "9p",
    "overlay",
    "ext4",
    # what thinwatchd drives, plus the targets for fault tests
    "loop",
    "dm-mod",
    "dm-bufio",
    "dm-bio-prison",
    "dm-persistent-data",
    "dm-thin-pool",
    "dm-flakey",
    "dm-delay",
)
"""Modules the guest loads at boot; their dependencies are added from modinfo."""

ALIAS_DIRS = ("kernel/crypto", "kernel/arch/x86/crypto")
"""Where the providers of softdep aliases (``crc32c``) live."""

INIT_SCRIPT = GUEST_SOURCES / "init.sh"
_PT_INTERP = 3


def find_static_busybox() -> Path | None:
    """Return a statically linked busybox (Debian's busybox-static), or None."""
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).is_file() and _is_static(Path(candidate)):
            return Path(candidate)
    return None


def _is_static(binary: Path) -> bool:
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = (struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum))
    return _PT_INTERP not in types


def initramfs_key(busybox: Path, modules: Sequence[str]) -> str:
    """Return a short digest of everything the initramfs is built from."""
    digest = hashlib.sha256()
    digest.update(INIT_SCRIPT.read_bytes())
    digest.update(hashlib.sha256(busybox.read_bytes()).digest())
    digest.update("\n".join(modules).encode())
    return digest.hexdigest()[:16]


def build_initramfs(modules_dir: Path, busybox: Path, out: Path) -> None:
    """Write the initramfs for the kernel whose modules are in ``modules_dir`` to ``out``."""
    tree = ModuleTree.scan(modules_dir, ALIAS_DIRS)
    order = tree.load_order(WANTED_MODULES)
    with out.open("wb") as stream:
        cpio = CpioWriter(stream)
        for directory in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "lower", "upper"):
            cpio.directory(directory)
        cpio.directory("newroot")
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, mode=0o666)
        cpio.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", INIT_SCRIPT.read_bytes(), mode=0o755)
        for module in order:
            cpio.file(f"lib/modules/{module}.ko", tree.files[module].read_bytes())
        cpio.file("lib/modules/load-order", ("\n".join(order) + "\n").encode())
        cpio.close()


def module_order(modules_dir: Path) -> list[str]:
    """Return the modules the initramfs loads, in load order."""
    return ModuleTree.scan(modules_dir, ALIAS_DIRS).load_order(WANTED_MODULES)
