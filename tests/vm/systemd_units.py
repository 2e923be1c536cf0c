"""The systemd units a systemd-mode guest boots into, and the host units it must not start."""

from __future__ import annotations

import os
from pathlib import Path

from tests.vm.paths import GUEST_SHARE_DIR

__all__ = ["BOOT_TARGET", "MASKED_UNITS", "write_etc"]

BOOT_TARGET = "thinwatchd-vm.target"
PAYLOAD_SERVICE = "thinwatchd-vm-payload.service"

MASKED_UNITS: tuple[str, ...] = (
    # no logins or consoles: nobody types into this guest
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "getty.target",
    "systemd-logind.service",
    # the host image's own services and timers
    "postgresql.service",
    "postgresql@.service",
    "cron.service",
    "ssh.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
    # would empty /tmp, reach for the network or the host's disks, or only cost boot time
    "systemd-tmpfiles-setup.service",
    "systemd-timesyncd.service",
    "systemd-remount-fs.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-pstore.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-update-utmp.service",
    "systemd-journal-flush.service",
    "systemd-random-seed.service",
    "systemd-sysusers.service",
    "systemd-modules-load.service",
    "modprobe@configfs.service",
    "modprobe@fuse.service",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    # lvm2's monitoring: tests start dmeventd themselves when they want to compare with it
    "lvm2-monitor.service",
    "lvm2-lvmpolld.socket",
    "dm-event.socket",
    "dm-event.service",
    "blk-availability.service",
)
"""Units masked in the guest (a symlink to /dev/null in its /etc/systemd/system)."""

_TARGET = f"""\
[Unit]
Description=thinwatchd VM test payload
Requires=basic.target {PAYLOAD_SERVICE}
After=basic.target {PAYLOAD_SERVICE}
AllowIsolate=yes
"""

_SERVICE = f"""\
[Unit]
Description=thinwatchd VM test payload (powers the guest off when done)
Wants=systemd-udevd.service systemd-udev-trigger.service
After=basic.target systemd-udevd.service systemd-udev-trigger.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh {GUEST_SHARE_DIR}/run-payload.sh
StandardInput=null
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
"""


GENERATOR_DIRS = (
    Path("/usr/lib/systemd/system-generators"),
    Path("/lib/systemd/system-generators"),
)
"""Generators are masked, all of them: the guest has no fstab, gettys, SysV scripts or GPT
partitions to turn into units, and under TCG running them costs seconds."""

NO_DRIVER_AUTOLOAD = "80-drivers.rules"
"""udev rules file replaced by an empty one: udev would modprobe a driver for every emulated
device (floppy, ata, pcspkr, cpufreq...), seconds under TCG. Tests load what they need."""


def write_etc(etc: Path) -> None:
    """Write the guest's additions to /etc into ``etc`` (init copies them over the overlay).

    That is the target the kernel command line names (``BOOT_TARGET``), the payload service,
    the masked units and generators, and the udev rules override.
    """
    units = etc / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    (units / BOOT_TARGET).write_text(_TARGET)
    (units / PAYLOAD_SERVICE).write_text(_SERVICE)
    for unit in MASKED_UNITS:
        os.symlink("/dev/null", units / unit)
    generators = etc / "systemd" / "system-generators"
    generators.mkdir(parents=True, exist_ok=True)
    for name in sorted({p.name for d in GENERATOR_DIRS if d.is_dir() for p in d.iterdir()}):
        os.symlink("/dev/null", generators / name)
    rules = etc / "udev" / "rules.d"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / NO_DRIVER_AUTOLOAD).write_text("# thinwatchd test guest: no driver autoloading\n")
