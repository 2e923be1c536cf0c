"""Helpers for tests and benchmarks that run the real daemon against the real kernel.

Everything here uses thinwatchd's own kernel modules (no dmsetup/losetup), so the tests exercise
the same code paths the daemon does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.nodes import UdevNodes

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2
GiB = 1024**3
#: systemd/thinwatchd.service runs the daemon with Nice=-10; the harness does the same.
UNIT_NICE = -10


def scratch_dir() -> Path:
    """Return a directory on real disk for big sparse files (the VM's scratch disk)."""
    base = os.environ.get("THINWATCHD_SCRATCH")
    path = Path(base) if base else Path(tempfile.gettempdir())
    path.mkdir(parents=True, exist_ok=True)
    return path


class KernelLog:
    """Reads /dev/kmsg records written after construction (with their timestamps)."""

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.records: list[tuple[float, str]] = []

    def read(self) -> list[tuple[float, str]]:
        """Return every record so far as (seconds since boot, message)."""
        while True:
            try:
                raw = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten records: keep reading
                    continue
                raise
            head, _, message = raw.decode(errors="replace").partition(";")
            fields = head.split(",")
            self.records.append((int(fields[2]) / 1e6, message.splitlines()[0] if message else ""))
        return self.records

    def text(self) -> str:
        return "\n".join(f"[{t:12.6f}] {m}" for t, m in self.read())

    def close(self) -> None:
        os.close(self._fd)


def write_config(path: Path, pools: dict[str, dict[str, object]], **daemon: object) -> Path:
    """Write a config file for the given pools (keys as in config.example.yaml)."""
    doc: dict[str, object] = {"pools": pools}
    if daemon:
        doc["daemon"] = daemon
    path.write_text(yaml.safe_dump(doc))
    return path


class DaemonProcess:
    """The real `thinwatchd run` in a child process, with our own NOTIFY_SOCKET to see READY=1."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.notifications: list[str] = []
        self._sock_dir = tempfile.mkdtemp(prefix="twd-notify-")
        self._sock_path = os.path.join(self._sock_dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self._sock_path)

    def start(self, timeout: float = 120.0) -> None:
        """Start the daemon; return once it sent READY=1. Raise if it exits or times out."""
        env = dict(os.environ, NOTIFY_SOCKET=self._sock_path, PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        # Niceness as in systemd/thinwatchd.service (Nice=-10): run it as it ships.
        self.proc = subprocess.Popen(

            [sys.executable, "-m", "thinwatchd", "--config", str(self.config), "run",
             "--log-target", "stderr"],
            stdout=log, stderr=log, env=env, cwd=REPO, preexec_fn=lambda: os.nice(UNIT_NICE),
        )  # fmt: skip
        log.close()
        if not self.wait_for("READY=1", timeout):
            code = self.proc.poll()
            raise AssertionError(f"daemon not ready (exit {code}); log:\n{self.log()}")

    def wait_for(self, state: str, timeout: float) -> bool:
        """Wait for a notification line equal to state; return False on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(state in n.splitlines() for n in self.notifications):
                return True
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            self._sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                self.notifications.append(self._sock.recv(4096).decode())
        return False

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the daemon and return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self._sock_path)
            os.rmdir(self._sock_dir)


def create_thin(dm: DeviceMapper, pool: str, thin: str, thin_id: int, size: int) -> str:
    """Create thin volume thin_id in pool and a device for it; return its /dev/mapper path."""
    dm.message(pool, f"create_thin {thin_id}")
    info = dm.info(pool)
    assert info is not None
    dm.create(thin)
    dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
    dm.load_table(thin, [Target(0, size // 512, "thin", f"{dev} {thin_id}")])
    UdevNodes().resume_synced(dm, thin)
    return f"/dev/mapper/{thin}"


def teardown(dm: DeviceMapper, names: list[str], files: list[Path]) -> None:
    """Remove dm devices (thin volumes first) and detach loops over files; ignore what is gone."""
    nodes = UdevNodes()
    for name in names:
        for _ in range(50):
            try:
                if dm.info(name) is None:
                    break
                dm.remove(name)
                break
            except OSError:
                time.sleep(0.1)
            except Exception as exc:  # EBUSY while udev still has it open
                if getattr(exc, "errno", None) != errno.EBUSY:
                    raise
                time.sleep(0.1)
        with contextlib.suppress(Exception):
            nodes.removed(name)
    loops = LoopControl()
    for path in files:
        with contextlib.suppress(Exception):
            loop = loops.find(str(path))
            if loop is not None:
                loops.detach(loop)


def dd_zero(device: str, mib: int) -> tuple[float, int, str]:
    """Run dd if=/dev/zero bs=1M count=mib oflag=direct; return (seconds, exit code, stderr)."""
    start = time.monotonic()
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={mib}", "oflag=direct"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return time.monotonic() - start, done.returncode, done.stderr


def write_pattern(device: str, size: int, seed: bytes) -> str:
    """Write a deterministic pattern of size bytes (O_DIRECT); return its sha256."""
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, MiB)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        for offset in range(0, size, MiB):
            block = hashlib.shake_256(seed + offset.to_bytes(8, "little")).digest(MiB)
            buf[:] = block
            os.pwrite(fd, buf, offset)
            digest.update(block)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest()


def read_checksum(device: str, size: int) -> str:
    """Return the sha256 of the first size bytes of device, read with O_DIRECT."""
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, MiB)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for offset in range(0, size, MiB):
            n = os.preadv(fd, [buf], offset)
            digest.update(buf[:n])
    finally:
        os.close(fd)
        buf.close()
    return digest.hexdigest()


@contextlib.contextmanager
def kernel_log() -> Iterator[KernelLog]:
    log = KernelLog()
    try:
        yield log
    finally:
        log.close()


@dataclass
class InstalledUnit:
    name: str
    config_path: Path


@contextlib.contextmanager
def installed_unit(directory: Path, config: dict[str, object]) -> Iterator[InstalledUnit]:
    """Install systemd/thinwatchd.service (as shipped) plus a drop-in for this checkout.

    The drop-in only does what an admin's would: run this checkout's virtualenv (its
    interpreter lives under /root, the checkout may be in /tmp) and allow pool files in
    directory. Stops and removes everything afterwards (pool devices are the caller's).
    """
    unit = "thinwatchd.service"
    config_path = Path("/etc/thinwatchd/config.yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    shutil.copy(REPO / "systemd" / unit, f"/etc/systemd/system/{unit}")
    dropin = Path(f"/etc/systemd/system/{unit}.d")
    dropin.mkdir(exist_ok=True)
    (dropin / "checkout.conf").write_text(
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={REPO}/.venv/bin/thinwatchd --config {config_path} run\n"
        "ProtectHome=read-only\nPrivateTmp=no\n"
        f"ReadWritePaths={directory}\n"
    )
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    try:
        yield InstalledUnit(unit, config_path)
    finally:
        subprocess.run(["systemctl", "stop", unit], check=False)
        shutil.rmtree(dropin, ignore_errors=True)
        Path(f"/etc/systemd/system/{unit}").unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], check=False)
