"""Fetch Debian 12's generic kernel once and cache it, with its initramfs, per kernel version.

Layout of ``.cache/vm/<version>/`` (made in a temporary folder, then renamed into place, so a
folder that exists is complete):

- ``vmlinuz``, ``config``, ``manifest.json``
- ``lib/modules/<version>/``: every module plus depmod's index (bound to /lib/modules in the guest)
- ``initramfs-<key>.cpio``: built on demand, keyed by its inputs (init script, busybox, modules)

All writers hold ``.cache/vm/.lock``, so two concurrent runs neither race nor fetch twice.
"""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.vm.initramfs import build_initramfs, find_static_busybox, initramfs_key, module_order
from tests.vm.paths import CACHE_DIR

__all__ = ["KernelArtifacts", "PrepareError", "find_prepared", "prepare", "resolve_version"]

META_PACKAGE = "linux-image-amd64"
VERSION_ENV = "THINWATCHD_VM_KERNEL"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+-\d+-amd64$")
_DEPENDS_RE = re.compile(r"Depends:\s+linux-image-(\d+\.\d+\.\d+-\d+-amd64)\s*$", re.MULTILINE)

Log = Callable[[str], None]


class PrepareError(RuntimeError):
    """The kernel or initramfs could not be prepared; the message says what to install or run."""


@dataclass(frozen=True)
class KernelArtifacts:
    """A prepared kernel version in the cache."""

    version: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    def boot_image(self) -> Path:
        """Return the image to pass to ``qemu -kernel``.

        That is the uncompressed ELF ``vmlinux`` (booted through its PVH entry point, which saves
        several seconds of xz decompression under TCG) when the kernel supports PVH, extracting
        it on first use; otherwise the ``vmlinuz`` bzImage.
        """
        vmlinux = self.root / "vmlinux"
        if vmlinux.exists():
            return vmlinux
        if "CONFIG_PVH=y" not in (self.root / "config").read_text().splitlines():
            return self.vmlinuz
        with _cache_lock():
            if not vmlinux.exists():
                elf = extract_vmlinux(self.vmlinuz.read_bytes())
                if elf is None:
                    return self.vmlinuz
                partial = vmlinux.with_suffix(".partial")
                partial.write_bytes(elf)
                partial.rename(vmlinux)
        return vmlinux

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    def initramfs(self, log: Log = lambda _: None) -> Path:
        """Return the initramfs for the current init script and busybox, building it if needed."""
        busybox = find_static_busybox()
        if busybox is None:
            raise PrepareError("no statically linked busybox: apt-get install busybox-static")
        key = initramfs_key(busybox, module_order(self.modules_dir))
        target = self.root / f"initramfs-{key}.cpio"
        if target.exists():
            return target
        with _cache_lock():
            if not target.exists():
                log(f"building {target.name}")
                partial = target.with_suffix(".partial")
                build_initramfs(self.modules_dir, busybox, partial)
                partial.rename(target)
                _prune_initramfs(self.root, keep=3)
        return target


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """Return the ELF kernel inside an xz-compressed bzImage, or None if there is none."""
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def _prune_initramfs(root: Path, keep: int) -> None:
    # a guest that is booting may still be reading an older one: keep a few
    images = sorted(root.glob("initramfs-*.cpio"), key=lambda p: p.stat().st_mtime)
    for stale in images[:-keep]:
        stale.unlink(missing_ok=True)


def find_prepared(cache_dir: Path = CACHE_DIR) -> KernelArtifacts | None:
    """Return the cached kernel to use (``$THINWATCHD_VM_KERNEL`` or the newest), or None."""
    wanted = os.environ.get(VERSION_ENV)
    candidates = [wanted] if wanted else sorted(_cached_versions(cache_dir), key=_version_key)
    for version in reversed(candidates):
        root = cache_dir / version
        if (root / "manifest.json").is_file():
            return KernelArtifacts(version, root)
    return None


def prepare(version: str | None = None, log: Log = print) -> KernelArtifacts:
    """Make sure the kernel ``version`` (default: Debian's current one) and its initramfs exist.

    Idempotent; raise PrepareError when apt cannot name or fetch the kernel.
    """
    version = version or os.environ.get(VERSION_ENV) or resolve_version()
    root = CACHE_DIR / version
    if not (root / "manifest.json").is_file():
        with _cache_lock():
            if not (root / "manifest.json").is_file():
                _fetch(version, root, log)
    artifacts = KernelArtifacts(version, root)
    if not (artifacts.modules_dir / "modules.dep").exists():
        with _cache_lock():
            _depmod(root, version)
    artifacts.initramfs(log)
    artifacts.boot_image()
    return artifacts


def resolve_version() -> str:
    """Return the kernel version Debian's ``linux-image-amd64`` currently depends on."""
    try:
        answer = subprocess.run(
            ["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise PrepareError(f"apt-cache depends {META_PACKAGE} failed ({error})") from error
    match = _DEPENDS_RE.search(answer)
    if match is None:
        raise PrepareError(
            f"apt-cache does not know {META_PACKAGE}'s kernel: run 'apt-get update' first"
        )
    return match.group(1)


def _fetch(version: str, root: Path, log: Log) -> None:
    if not _VERSION_RE.match(version):
        raise PrepareError(f"unexpected kernel version {version!r}")
    package = f"linux-image-{version}"
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".build-") as build:
        work = Path(build)
        work.chmod(0o755)  # apt-get download drops to the _apt user when it can
        log(f"downloading {package}")
        _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], cwd=work)
        (deb,) = work.glob(f"{package}_*.deb")
        log(f"unpacking {deb.name}")
        unpacked = work / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        staged = work / "staged"
        _stage(unpacked, staged, version)
        manifest = {"version": version, "package": deb.name}
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staged.rename(root)
    log(f"kernel {version} cached in {root}")


def _stage(unpacked: Path, staged: Path, version: str) -> None:
    modules = next(
        (
            p
            for p in (unpacked / "lib/modules" / version, unpacked / "usr/lib/modules" / version)
            if p.is_dir()
        ),
        None,
    )
    if modules is None:
        raise PrepareError(f"the kernel package has no lib/modules/{version}")
    (staged / "lib" / "modules").mkdir(parents=True)
    modules.rename(staged / "lib" / "modules" / version)
    (unpacked / "boot" / f"vmlinuz-{version}").rename(staged / "vmlinuz")
    (unpacked / "boot" / f"config-{version}").rename(staged / "config")
    _depmod(staged, version)


def _depmod(root: Path, version: str) -> None:
    """Index the modules so that modprobe works inside the guest (the initramfs uses insmod)."""
    depmod = shutil.which("depmod") or next(
        (p for p in ("/sbin/depmod", "/usr/sbin/depmod") if Path(p).exists()), None
    )
    if depmod:
        _run([depmod, "-b", str(root), version])


def _run(argv: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(argv, cwd=cwd, check=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as error:
        raise PrepareError(f"{' '.join(argv)} failed: {error}") from error


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_versions(cache_dir: Path) -> list[str]:
    if not cache_dir.is_dir():
        return []
    return [p.name for p in cache_dir.iterdir() if _VERSION_RE.match(p.name)]


def _version_key(version: str) -> list[int]:
    return [int(part) for part in re.findall(r"\d+", version)]
