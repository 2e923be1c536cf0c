"""Where the test bed keeps its files on the host and what the guest sees."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "GUEST_OUT_DIR",
    "GUEST_SCRATCH_DIR",
    "GUEST_SHARE_DIR",
    "GUEST_SOURCES",
    "REPO_ROOT",
    "RUNS_DIR",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the guest's payload runs with this as its working directory."""

CACHE_DIR = REPO_ROOT / ".cache" / "vm"
"""Git-ignored cache: one folder per kernel version, plus the lock file."""

RUNS_DIR = CACHE_DIR / "runs"
"""Default home of the files each ``run`` returns (the newest few are kept)."""

GUEST_SOURCES = Path(__file__).resolve().parent / "guest"
"""Shell scripts copied into the initramfs or the guest's share."""

GUEST_SHARE_DIR = "/vmbed"
"""Mount point, in the guest, of the host's per-run writable 9p share."""

GUEST_OUT_DIR = f"{GUEST_SHARE_DIR}/out"
"""Folder, in the guest, whose files come back to the host (exported as THINWATCHD_VM_OUT)."""

GUEST_SCRATCH_DIR = "/scratch"
"""Mount point, in the guest, of the ext4 scratch disk (exported as THINWATCHD_SCRATCH)."""
