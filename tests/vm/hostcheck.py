"""What this host offers: a native device-mapper, systemd, qemu and the guest kernel."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

from tests.vm import qemu
from tests.vm.initramfs import find_static_busybox
from tests.vm.kernel_cache import PrepareError, find_prepared, prepare

__all__ = [
    "HOW_TO_GET_PIECES",
    "host_has_dm_thin",
    "in_ci",
    "in_vm",
    "missing_pieces",
    "systemd_is_pid1",
]

HOW_TO_GET_PIECES = (
    "run 'bash scripts/bootstrap' as root: it installs qemu-system-x86 and busybox-static "
    "and caches Debian's kernel in .cache/vm"
)

_DM_IOCTL_HEADER = "=3IIIIiIIIQ128s129s7s"  # struct dm_ioctl, 312 bytes
_DM_VERSION = 0xC138FD00  # _IOWR(0xfd, 0, struct dm_ioctl)


def in_ci() -> bool:
    """Return True when running under CI (``CI=true``): missing pieces are then failures."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def in_vm() -> bool:
    """Return True inside a test-bed guest."""
    return os.environ.get("THINWATCHD_IN_VM") == "1"


def systemd_is_pid1() -> bool:
    """Return True when systemd manages this machine (sd_booted's test)."""
    return Path("/run/systemd/system").is_dir()


def host_has_dm_thin() -> bool:
    """Return True if we are root and this kernel answers DM_VERSION and has dm-thin-pool."""
    if os.geteuid() != 0:
        return False
    size = struct.calcsize(_DM_IOCTL_HEADER)
    # version 4.0.0, data_size, data_start, target_count, open_count, flags, event_nr,
    # padding, dev, name, uuid, data
    header = struct.pack(_DM_IOCTL_HEADER, 4, 0, 0, size, size, 0, 0, 0, 0, 0, 0, b"", b"", b"")
    try:
        fd = os.open("/dev/mapper/control", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, _DM_VERSION, header)
    except OSError:
        return False
    finally:
        os.close(fd)
    if Path("/sys/module/dm_thin_pool").exists():
        return True
    probe = subprocess.run(["modprobe", "-q", "dm-thin-pool"], check=False, capture_output=True)
    return probe.returncode == 0


def missing_pieces() -> list[str]:
    """Return what the VM test bed lacks on this host (empty when a guest can boot).

    Prepares the guest kernel when it is not cached yet and apt can fetch it.
    """
    missing = []
    if qemu.find_qemu() is None:
        missing.append(f"{qemu.QEMU_BINARY} (apt-get install qemu-system-x86)")
    if find_static_busybox() is None:
        missing.append("a static busybox (apt-get install busybox-static)")
    if not missing:
        try:
            kernel = find_prepared() or prepare(log=lambda _: None)
            kernel.initramfs()
            kernel.boot_image()
        except (PrepareError, OSError) as error:
            missing.append(f"the guest kernel ({error})")
    return missing
