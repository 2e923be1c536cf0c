"""Boot one guest, run one command in it, and collect what it returns."""

from __future__ import annotations

import compileall
import enum
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from threading import Lock

from tests.vm import qemu
from tests.vm.kernel_cache import KernelArtifacts
from tests.vm.paths import (
    GUEST_OUT_DIR,
    GUEST_SCRATCH_DIR,
    GUEST_SOURCES,
    REPO_ROOT,
)
from tests.vm.streams import Channel, Sink
from tests.vm.systemd_units import BOOT_TARGET, write_etc

__all__ = [
    "EXIT_GUEST_DIED",
    "EXIT_TIMEOUT",
    "GuestConfig",
    "GuestResult",
    "Mode",
    "Outcome",
    "run_guest",
]

EXIT_TIMEOUT = 124
"""Exit code of ``run`` when the guest was killed after its timeout."""
EXIT_GUEST_DIED = 125
"""Exit code of ``run`` when the guest stopped without the command's exit status (panic...)."""

STARTED_FILE = "started"
"""Written to the guest's out/ by run-payload.sh as it starts: the boot is over."""
_BOOT_POLL = 1.0
_STDOUT_PORT = "org.thinwatchd.stdout"
_STDERR_PORT = "org.thinwatchd.stderr"
_NINEP = "security_model=none,multidevs=remap"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_NOT_FORWARDED = frozenset(
    {
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "TMPDIR",
        "TEMP",
        "TMP",
        "XDG_RUNTIME_DIR",
        "DBUS_SESSION_BUS_ADDRESS",
        "NOTIFY_SOCKET",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "SSH_AUTH_SOCK",
        "PYTEST_CURRENT_TEST",
        "PYTEST_XDIST_WORKER",
        # The guest's root is a throwaway overlay: bytecode written there (pytest's rewritten
        # test modules, a child's imports) is reused by every later process of that guest.
        "PYTHONDONTWRITEBYTECODE",
    }
)


class Mode(enum.StrEnum):
    """What runs as the guest's PID 1."""

    PLAIN = "plain"  # busybox; no udev; fastest
    SYSTEMD = "systemd"  # systemd with systemd-udevd; the payload is a oneshot unit


class Outcome(enum.StrEnum):
    """How the guest ended."""

    COMPLETED = "completed"  # the command ran and its exit status came back
    TIMED_OUT = "timed out"  # killed after the timeout
    DIED = "died"  # powered off, panicked or crashed without an exit status
    HUNG_BOOTING = "hung while booting"  # every boot missed its deadline (see GuestConfig)


@dataclass(frozen=True)
class GuestConfig:
    """How to boot the guest."""

    mode: Mode = Mode.PLAIN
    timeout: float = 600.0
    mem_mib: int = 2048
    scratch: Path | None = None  # a persistent image; default: a temporary one
    keep_scratch: bool = False
    scratch_size_gib: int = 32
    echo_console: bool = False  # copy the serial console to our stderr as it comes
    # A boot must reach the command within boot_timeout, or qemu is killed and the guest
    # booted again, boot_attempts times in all. TCG has wedged a vCPU in early boot on a
    # loaded host (a soft lockup that never ends); without this, the batch lost its whole
    # timeout (45 min) to a guest that never ran a test. A normal boot takes 10-40 s.
    boot_timeout: float = 300.0
    boot_attempts: int = 2


@dataclass(frozen=True)
class GuestResult:
    """What one boot produced. ``results_dir`` holds console.log, qemu.log and out/."""

    outcome: Outcome
    exit_code: int
    elapsed: float
    results_dir: Path
    scratch: Path | None
    boots: int = 1

    @property
    def out_dir(self) -> Path:
        """The files the guest returned: dmesg.txt, exit-status and what the command wrote."""
        return self.results_dir / "out"

    @property
    def console_log(self) -> Path:
        return self.results_dir / "console.log"

    def console_tail(self, lines: int = 40) -> str:
        """Return the last lines of the serial console (kernel, init and systemd messages)."""
        return _tail(self.console_log, lines)

    def dmesg_tail(self, lines: int = 40) -> str:
        """Return the last lines of the guest's kernel log, or '' if it did not come back."""
        return _tail(self.out_dir / "dmesg.txt", lines)

    def describe(self) -> str:
        """Return a one-line summary for humans."""
        if self.outcome is Outcome.COMPLETED:
            what = f"command exited {self.exit_code}"
        else:
            what = f"guest {self.outcome} without the command's exit status"
        if self.boots > 1:
            what += f" (booted {self.boots} times: a boot hung, see console-hung-*.log)"
        return f"{what} after {self.elapsed:.1f} s; files in {self.results_dir}"


def run_guest(
    command: Sequence[str],
    config: GuestConfig,
    kernel: KernelArtifacts,
    results_dir: Path,
    stdout: Sink,
    stderr: Sink,
) -> GuestResult:
    """Boot a guest, run ``command`` in it as root in the checkout, and wait for it.

    The command's stdout and stderr are copied to ``stdout`` and ``stderr`` as they come.
    ``results_dir`` must be absent or empty. qemu is always gone when this returns or raises.
    A boot that does not reach the command within ``config.boot_timeout`` is killed and
    retried (its console is kept as console-hung-N.log). Raise FileNotFoundError if qemu is
    not installed.
    """
    binary = qemu.find_qemu()
    if binary is None:
        raise FileNotFoundError(f"{qemu.QEMU_BINARY} is not installed")
    compile_checkout()
    initramfs = kernel.initramfs()
    share = results_dir / "share"
    results_dir.mkdir(parents=True, exist_ok=True)
    (share / "out").mkdir(parents=True)
    _write_share(share, command, config.mode, kernel)
    scratch = config.scratch or results_dir / "scratch.img"
    _ensure_sparse(scratch, config.scratch_size_gib)

    argv_of = partial(_qemu_argv, binary, config, kernel, initramfs, share, scratch)
    started = time.monotonic()
    boots = 0
    while True:
        boots += 1
        ended = _boot(argv_of, config, results_dir, share / "out", stdout, stderr)
        if ended is not Outcome.HUNG_BOOTING or boots >= config.boot_attempts:
            break
        (results_dir / "console.log").rename(results_dir / f"console-hung-{boots}.log")
        shutil.rmtree(share / "out")
        (share / "out").mkdir()
    elapsed = time.monotonic() - started

    (share / "out").rename(results_dir / "out")
    shutil.rmtree(share, ignore_errors=True)
    kept_scratch: Path | None = scratch
    if config.scratch is None and not config.keep_scratch:
        scratch.unlink(missing_ok=True)
        kept_scratch = None
    outcome, exit_code = _outcome(results_dir / "out" / "exit-status", ended)
    return GuestResult(outcome, exit_code, elapsed, results_dir, kept_scratch, boots)


def _boot(
    argv_of: Callable[[Sequence[Channel]], list[str]],
    config: GuestConfig,
    results_dir: Path,
    out: Path,
    stdout: Sink,
    stderr: Sink,
) -> Outcome | None:
    """Boot qemu once and wait for it (see _wait); qemu is gone when this returns or raises."""
    with (results_dir / "console.log").open("wb") as console_log:
        console_sinks: list[Sink] = [console_log]
        if config.echo_console:
            console_sinks.append(stderr)
        channels = [
            Channel("console", console_sinks),
            Channel("stdout", [stdout]),
            Channel("stderr", [stderr]),
        ]
        try:
            process = qemu.start(
                argv_of(channels), [c.guest_fd for c in channels], results_dir / "qemu.log"
            )
        except BaseException:
            for channel in channels:
                channel.close()
            raise
        for channel in channels:
            channel.start()
        try:
            return _wait(process, config, out / STARTED_FILE)
        finally:
            qemu.stop(process)
            for channel in channels:
                channel.join(timeout=5.0)


def _wait(
    process: subprocess.Popen[bytes], config: GuestConfig, started_mark: Path
) -> Outcome | None:
    """Wait for qemu to exit (None), at most boot_timeout for the command to start (the
    guest's run-payload.sh writes ``started_mark`` first: else HUNG_BOOTING), and timeout in
    all (else TIMED_OUT)."""
    begun = time.monotonic()
    boot_deadline = begun + config.boot_timeout
    deadline = begun + config.timeout
    while not started_mark.exists():
        now = time.monotonic()
        if now >= min(boot_deadline, deadline):
            return Outcome.HUNG_BOOTING if now >= boot_deadline else Outcome.TIMED_OUT
        try:
            process.wait(timeout=min(_BOOT_POLL, boot_deadline - now, deadline - now))
            return None
        except subprocess.TimeoutExpired:
            pass
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
        return None
    except subprocess.TimeoutExpired:
        return Outcome.TIMED_OUT


#: The checkout's Python, compiled on the host before a guest boots (see compile_checkout).
_COMPILED = ("thinwatchd", "testbed", "tests", "bench", "demo", "tools")
_compile_lock = Lock()


def compile_checkout() -> None:
    """Write the checkout's bytecode on the host, once per run: it costs the host about a
    second, and saves every Python process in a guest 2-4 s of compiling under TCG (the
    checkout is read-only there, and so is the systemd unit's view of it, so nothing in a
    guest could keep what it compiled). Both guests share what it writes. Sources that have
    not changed since the last run are skipped by their mtime."""
    with _compile_lock:
        for name in _COMPILED:
            if (REPO_ROOT / name).is_dir():
                compileall.compile_dir(REPO_ROOT / name, quiet=2, workers=1)


def guest_environment(mode: Mode, host: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Return the environment the command sees: the host's, less session-bound variables."""
    env = {k: v for k, v in host.items() if _ENV_NAME.match(k) and k not in _ENV_NOT_FORWARDED}
    env.update(
        THINWATCHD_IN_VM="1",
        THINWATCHD_VM_MODE=str(mode),
        THINWATCHD_SCRATCH=GUEST_SCRATCH_DIR,
        THINWATCHD_VM_OUT=GUEST_OUT_DIR,
    )
    return env


def _write_share(share: Path, command: Sequence[str], mode: Mode, kernel: KernelArtifacts) -> None:
    (share / "boot.env").write_text(
        f"VMBED_MODE={shlex.quote(str(mode))}\n"
        f"VMBED_MODULES_DIR={shlex.quote(str(kernel.modules_dir))}\n"
    )
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(guest_environment(mode).items())]
    lines.append(f"cd {shlex.quote(str(REPO_ROOT))} || exit 127")
    lines.append("set -- " + shlex.join(command))
    (share / "payload.env").write_text("\n".join(lines) + "\n")
    shutil.copy(GUEST_SOURCES / "run-payload.sh", share / "run-payload.sh")
    if mode is Mode.SYSTEMD:
        write_etc(share / "etc")


def _ensure_sparse(image: Path, size_gib: int) -> None:
    if not image.exists():
        image.parent.mkdir(parents=True, exist_ok=True)
        with image.open("wb") as handle:
            handle.truncate(size_gib << 30)


def _kernel_cmdline(mode: Mode) -> str:
    words = ["console=ttyS0", "panic=-1", "loglevel=4", "mitigations=off", "8250.nr_uarts=1"]
    # The crypto self-tests run at every boot under TCG for nothing we test; CI's systemd
    # guest once wedged for good in one (a soft lockup in cryptomgr_test).
    words.append("cryptomgr.notests=1")
    if mode is Mode.SYSTEMD:
        words += [f"systemd.unit={BOOT_TARGET}", "systemd.show_status=error"]
    return " ".join(words)


def _qemu_argv(
    binary: str,
    config: GuestConfig,
    kernel: KernelArtifacts,
    initramfs: Path,
    share: Path,
    scratch: Path,
    channels: Sequence[Channel],
) -> list[str]:
    console, out, err = channels
    return [
        binary,
        "-accel",
        "tcg",
        "-smp",
        "2",
        "-m",
        str(config.mem_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel.boot_image()),
        "-initrd",
        str(initramfs),
        "-append",
        _kernel_cmdline(config.mode),
        "-chardev",
        console.chardev(),
        "-serial",
        f"chardev:{console.name}",
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        out.chardev(),
        "-device",
        f"virtserialport,bus=vser.0,chardev={out.name},name={_STDOUT_PORT}",
        "-chardev",
        err.chardev(),
        "-device",
        f"virtserialport,bus=vser.0,chardev={err.name},name={_STDERR_PORT}",
        "-virtfs",
        f"local,path=/,mount_tag=hostroot,{_NINEP},readonly=on",
        "-virtfs",
        f"local,path={_escape(share)},mount_tag=vmbed,{_NINEP}",
        "-drive",
        f"file={_escape(scratch)},format=raw,if=virtio,cache=unsafe,discard=unmap",
        "-device",
        "virtio-rng-pci",
    ]


def _escape(path: Path) -> str:
    return str(path.resolve()).replace(",", ",,")


def _outcome(status_file: Path, ended: Outcome | None) -> tuple[Outcome, int]:
    """The command's exit status if it came back; else why qemu was stopped, or DIED."""
    try:
        return Outcome.COMPLETED, int(status_file.read_text().strip())
    except (OSError, ValueError):
        pass
    if ended is not None:
        return ended, EXIT_TIMEOUT
    return Outcome.DIED, EXIT_GUEST_DIED


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(text.splitlines()[-lines:])
