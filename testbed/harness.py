"""The real daemon on the real kernel: its process, thin volumes, the kernel log, teardown.

What the kernel and systemd tests share with bench/ (the rest is tests/kernel/harness.py).
Everything here uses thinwatchd's own kernel modules (no dmsetup/losetup), so the tests exercise
the same code paths the daemon does.
"""

from __future__ import annotations

import contextlib
import errno
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

from thinwatchd.base.units import Bytes, Sectors, bytes_to_sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.kernel.nodes import UdevNodes

REPO = Path(__file__).resolve().parents[1]
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


def kmsg_mark(text: str) -> float:
    """Write ``thinwatchd-test: TEXT`` to the kernel log, to put a test's actions on the
    kernel's timeline (and set its clock against ours); return when (time.monotonic())."""
    fd = os.open("/dev/kmsg", os.O_WRONLY)
    try:
        at = time.monotonic()
        os.write(fd, f"thinwatchd-test: {text}\n".encode())
        return at
    finally:
        os.close(fd)


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

    def spawn(self) -> None:
        """Start `thinwatchd run` as the unit runs it (Nice=-10), without waiting for it."""
        env = dict(os.environ, NOTIFY_SOCKET=self._sock_path, PYTHONUNBUFFERED="1")
        self.spawned = time.monotonic()
        argv = [sys.executable, "-m", "thinwatchd", "--config", str(self.config), "run"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--log-target", "stderr"],
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
                preexec_fn=lambda: os.nice(UNIT_NICE),
            )

    def start(self, timeout: float = 120.0) -> None:
        """Start the daemon; return once it sent READY=1. Raise if it exits or times out."""
        self.spawn()
        assert self.proc is not None
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


class SpawnedDaemon(DaemonProcess):
    """A DaemonProcess started without waiting for READY=1 (to kill it at any moment)."""

    #: When READY=1 was first read (monotonic; as late as the last drain), and when the test
    #: signalled the daemon to end.
    ready_at: float | None = None
    ended_at: float | None = None

    def drain(self) -> None:
        """Read every queued notification, as systemd would (an unread socket fills up)."""
        self._sock.setblocking(False)
        try:
            while True:
                notification = self._sock.recv(4096).decode()
                self.notifications.append(notification)
                if self.ready_at is None and "READY=1" in notification.splitlines():
                    self.ready_at = time.monotonic()
        except BlockingIOError:
            pass
        finally:
            self._sock.setblocking(True)

    def ready(self) -> bool:
        """Whether READY=1 has arrived (never blocks)."""
        self.drain()
        return any("READY=1" in n.splitlines() for n in self.notifications)

    def opened_control(self) -> bool:
        """Whether the daemon has /dev/mapper/control open: imports done, kernel work begun."""
        assert self.proc is not None
        try:
            fds = os.listdir(f"/proc/{self.proc.pid}/fd")
        except OSError:
            return False
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}") == "/dev/mapper/control":
                    return True
        return False


def create_thin(dm: DeviceMapper, pool: str, thin: str, thin_id: int, size: int) -> str:
    """Create thin volume thin_id in pool and a device for it; return its /dev/mapper path."""
    dm.message(pool, f"create_thin {thin_id}")
    info = dm.info(pool)
    assert info is not None
    dm.create(thin)
    dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
    length = bytes_to_sectors(Bytes(size))
    dm.load_table(thin, [Target(Sectors(0), length, "thin", f"{dev} {thin_id}")])
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
            nodes.udev.remove_node(name)  # without udev, the node we made
    loops = LoopControl()
    for path in files:
        with contextlib.suppress(Exception):
            loop = loops.find(str(path))
            if loop is not None:
                loops.detach(loop)


def rescue_pool(dm: DeviceMapper, name: str, data_file: Path) -> list[str]:
    """Resume a pool left suspended (with the longest length its data loop allows); say what.

    For failure paths and teardown only: the daemon must already be stopped (killed), or it
    may fight the rescue. Never raises.
    """
    done: list[str] = []
    try:
        info = dm.info(name)
        if info is None or not (info.suspended or info.inactive_present):
            return done
        if info.inactive_present:
            dm.clear_table(name)
            done.append("cleared an inactive table")
        if not info.suspended:
            return done
        try:
            dm.resume(name)
            done.append("resumed it as it was")
            return done
        except Exception as exc:
            done.append(f"plain resume refused: {exc}")
        (active,) = dm.table(name)
        block = int(active.params.split()[2])
        loop = LoopControl().find(str(data_file))
        size = LoopControl().size(loop) if loop is not None else data_file.stat().st_size
        length = size // 512 // block * block
        dm.load_table(
            name,
            [Target(Sectors(0), Sectors(max(length, active.length)), "thin-pool", active.params)],
        )
        dm.resume(name)
        done.append(f"resumed with {max(length, active.length)} sectors")
    except Exception as exc:
        done.append(f"rescue failed: {exc!r}")
    return done


def dd_zero(device: str, mib: int) -> tuple[float, int, str]:
    """Run dd if=/dev/zero bs=1M count=mib oflag=direct; return (seconds, exit code, stderr)."""
    start = time.monotonic()
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={device}", "bs=1M", f"count={mib}", "oflag=direct"],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.monotonic() - start, done.returncode, done.stderr


def pool_config(pool: str, directory: Path, **keys: object) -> dict[str, object]:
    """A config of one pool, its data and metadata files in directory (installed_unit lets the
    unit write there), with these keys besides."""
    files = {"data_file": str(directory / "data"), "metadata_file": str(directory / "metadata")}
    return {"pools": {pool: {**files, **keys}}}


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
    # Left as found: a later test (the quick start) expects a fresh machine, and the unit's
    # StateDirectory= makes /var/lib/thinwatchd when it starts.
    created = [p for p in (config_path.parent, Path("/var/lib/thinwatchd")) if not p.exists()]
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
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
