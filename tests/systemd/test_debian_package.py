"""Issue 20, item 2: the Debian package as a user uses it, in the systemd guest.

The steps, in order, on one machine (each test is one step and needs the ones before it):

1. ``apt install ./thinwatchd_<release>_all.deb``: installed with Debian's dependencies, which
   the guest has (its root is the host's, where scripts/bootstrap installed them; there is no
   network). The unit is enabled and not started; ExecStart is /usr/bin/thinwatchd;
2. edit /etc/thinwatchd/config.yaml (the example's pool, made small), ``systemctl enable
   --now thinwatchd``, ``thinwatchd status``, ``journalctl -u thinwatchd``: the daemon is
   Debian's python3 running /usr/bin/thinwatchd; ``journalctl -xu thinwatchd`` explains its
   entries from the package's catalog; ``man thinwatchd`` and ``man thinwatchd.yaml`` render;
3. ``apt install`` of a newer package (the same tree, a higher version) during a paced
   O_DIRECT fill of the pool: the postinst's try-restart restarts the daemon, the pool stays
   up, and the kernel never switches it to out-of-data-space. The figures (where the restart's
   time went, reusing test_restart_under_fill's measures) go to the test's output and to
   $THINWATCHD_VM_OUT/debian-package-upgrade.txt;
4. ``apt remove thinwatchd``: the daemon is stopped, the pool stays up, the conffile stays;
5. ``apt purge thinwatchd``: the config and the unit are gone; the pool, its thin volume and
   its files are left, and purge says so.

The packages come from scripts/build-deb (tests/package/deb.py): when tests/package is
collected, its conftest built them on the host before the guests booted, so this only checks
they are current (3 s); run alone, it builds them here: about 7 min under TCG.

The guest's root is a container's: its /usr/sbin/policy-rc.d (exit 101, "start nothing") would
make deb-systemd-invoke skip the upgrade's restart and the removal's stop, so it is moved aside
for these steps, as a real Debian host has none; apt's caches, which the container turns off,
are turned on. man-db's index is not updated (its trigger would cost 20-36 s a step here).
Guest time for the five steps: 141 s on a quiet host (apt install 28 s, enable --now 5 s, the
upgrade's apt install 52 s under the fill, remove 13 s, purge 11 s), up to 6 min beside other
guests on its 2 cores; each run's figures are printed and written to
$THINWATCHD_VM_OUT/debian-package.txt. /var/lib/thinwatchd is a directory of the
scratch disk (ext4) mounted there, as /var/lib would be a disk on a real host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.harness import KernelLog, MiB, create_thin, kmsg_mark, scratch_dir, teardown
from tests.kernel.harness import dirty_bytes
from tests.package.deb import (
    build,
    build_upgrade,
    committed,
    release_version,
    upgrade_version,
)
from tests.systemd.test_restart_under_fill import (
    BACK_TO_WRITE,
    BLOCK,
    DIRTY_BYTES,
    GROWING,
    OUT_OF_SPACE,
    WRITER,
    Action,
    Progress,
    StartWatch,
    action_lines,
    journal,
    main_pid,
    process_started,
)
from tests.vm import hostcheck
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.loop import LoopControl
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
POOL = "docker-pool"  # config.example.yaml's pool, kept by the edit
THIN = f"{POOL}-thin"
STATE = Path("/var/lib/thinwatchd")
CONFIG = Path("/etc/thinwatchd/config.yaml")
#: Moved aside for the steps (see the module's docstring): the container's policy-rc.d, and
#: man-db's auto-update flag (debconf's man-db/auto-update false), without which dpkg's man-db
#: trigger re-indexes the host's 22,000 pages over 9p at each step (20-36 s under TCG); man
#: finds a page the index lacks in the directories.
ASIDE = (Path("/usr/sbin/policy-rc.d"), Path("/var/lib/man-db/auto-update"))
#: apt's caches, as Debian has them (the container's docker-clean turns them off, and each apt
#: call then parses every package list again: about 8 s under TCG).
APT_CACHES = Path("/etc/apt/apt.conf.d/zz-thinwatchd-test-caches")


def aside(path: Path) -> Path:
    return path.with_name(f"{path.name}.thinwatchd-test")


#: root's login PATH: what a user's `thinwatchd` resolves through.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The edit: the example's pool made small and quick to grow, as test_restart_under_fill's
#: (64 MiB of data, a 16 MiB mark, 128 MiB steps). Each line must be in the example once.
EDITS = (
    ("    data_size: 1GiB", "    data_size: 64MiB"),
    ("    metadata_size: 128MiB", "    metadata_size: 16MiB"),
    ("    low_water_mark: 4096", "    low_water_mark: 256"),
    ("    reserve: 1GiB", "    reserve: 256MiB"),
    ("      step: 1GiB", "      step: 128MiB"),
    ("      step_percent: 20%", "      step_percent: 0%"),
)
#: The fill: 1 MiB O_DIRECT writes at FILL_RATE_MIB, from FILL_LEAD seconds before the upgrade
#: to FILL_TAIL seconds after it, at most FILL_MAX_MIB. Paced: unpaced (26-128 MiB/s here),
#: the fill took the guest's CPU from apt, whose upgrade then ran 110-176 s instead of 52 s;
#: test_restart_under_fill restarts the daemon under the faster fill.
FILL_RATE_MIB = 16
FILL_LEAD = 5.0
FILL_TAIL = 5.0
FILL_MAX_MIB = 16384


def run(
    *args: str, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command as root at a shell would: root's PATH, no virtualenv, no terminal."""
    env = {
        "PATH": ROOT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    return subprocess.run(
        args, capture_output=True, text=True, check=False, env=env, cwd=cwd, timeout=timeout
    )


def ok(*args: str, timeout: float = 600, cwd: Path | None = None) -> str:
    done = run(*args, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, (
        f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    )
    return done.stdout + done.stderr


def unit_property(name: str) -> str:
    return run("systemctl", "show", "-P", name, UNIT).stdout.strip()


def package_state() -> str:
    """dpkg's idea of thinwatchd: its Status and Version, or "" if it never heard of it."""
    done = run("dpkg-query", "-W", "-f", "${Status} ${Version}", "thinwatchd")
    return done.stdout.strip() if done.returncode == 0 else ""


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def pool_mode(dm: DeviceMapper) -> str:
    status = parse_pool_status(dm.status(POOL, noflush=True)[0].params)
    assert isinstance(status, ThinPoolWorkingStatus), status
    return status.mode.value


@dataclass
class Machine:
    """The guest as the steps leave it."""

    debs: Path  # the directory the .deb files are in (apt install ./name)
    release: str
    upgrade: str
    dm: DeviceMapper
    since: str
    done: list[str] = field(default_factory=list)  # the steps that passed
    figures: dict[str, float] = field(default_factory=dict)

    def needs(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.fail(f"an earlier step failed: {', '.join(missing)}")

    def deb(self, version: str) -> str:
        return f"./thinwatchd_{version}_all.deb"

    def apt(self, step: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `apt ARGS -y` (in the .deb files' directory); keep its time as step's."""
        started = time.monotonic()
        done = run("apt", *args, "-y", cwd=self.debs)
        self.figures[step] = time.monotonic() - started
        print(f"apt {' '.join(args)}: {self.figures[step]:.1f} s\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, f"apt {' '.join(args)}: exit {done.returncode}\n" + (
                done.stdout + done.stderr
            )
        return done

    def log(self) -> str:
        out = run("journalctl", "-u", UNIT, "--since", self.since, "--no-pager", "-o", "cat")
        return out.stdout[-6000:]


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    if not hostcheck.in_vm():
        message = "installs a package and changes /etc, /usr and /var: only in the systemd guest"
        if hostcheck.in_ci():
            pytest.fail(f"CI=true: {message}, where CI must run it")
        pytest.skip(message)
    started = time.monotonic()
    release = build(lint=False)
    upgrade = build_upgrade()
    packages = time.monotonic() - started  # a check when the host built them; else builds
    # installed_unit (the other systemd tests) leaves its config behind when /etc/thinwatchd
    # existed; nothing else of thinwatchd may be here.
    if not package_state().startswith("install"):
        CONFIG.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            CONFIG.parent.rmdir()
    left = [
        str(p)
        for p in (
            Path("/usr/bin/thinwatchd"),
            # scripts/install's (tests/systemd/test_quickstart.py): they would come first
            Path("/usr/local/bin/thinwatchd"),
            Path("/usr/local/share/man/man8/thinwatchd.8"),
            Path("/usr/local/lib/systemd/catalog/thinwatchd.catalog"),
            Path(f"/etc/systemd/system/{UNIT}"),
            CONFIG.parent,
            STATE,
            Path(f"/dev/mapper/{POOL}"),
        )
        if p.exists()
    ]
    assert not left and not package_state(), f"not a fresh machine: {left} {package_state()}"
    work = scratch_dir() / "debian-package"
    shutil.rmtree(work, ignore_errors=True)
    (work / "var-lib-thinwatchd").mkdir(parents=True)
    debs = work / "debs"
    debs.mkdir()
    for deb in (release, upgrade):
        shutil.copy(deb, debs)
    for path in (work, debs, *debs.iterdir()):  # readable by apt's _apt user
        path.chmod(0o755 if path.is_dir() else 0o644)
    dm = DeviceMapper()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        for path in ASIDE:
            if path.exists():
                path.rename(aside(path))
        APT_CACHES.write_text(
            'Dir::Cache::pkgcache "pkgcache.bin";\nDir::Cache::srcpkgcache "srcpkgcache.bin";\n'
        )
        STATE.mkdir()
        subprocess.run(
            ["mount", "--bind", str(work / "var-lib-thinwatchd"), str(STATE)], check=True
        )
        with dirty_bytes(DIRTY_BYTES):  # (as test_restart_under_fill: the marks stay small)
            machine = Machine(debs, release_version(), upgrade_version(), dm, since)
            machine.figures["packages"] = packages
            yield machine
            steps = ", ".join(f"{k} {v:.1f} s" for k, v in machine.figures.items())
            text = f"steps passed: {', '.join(machine.done)}; times: {steps}\n"
            print(text)
            if os.environ.get("THINWATCHD_VM_OUT"):
                with contextlib.suppress(OSError):
                    Path(os.environ["THINWATCHD_VM_OUT"], "debian-package.txt").write_text(text)
    finally:
        pid = main_pid()
        if pid:  # never left frozen
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        run("systemctl", "stop", UNIT)
        if package_state():
            run("dpkg", "--purge", "thinwatchd")
        teardown(dm, [THIN, POOL], [STATE / POOL / "data", STATE / POOL / "metadata"])
        dm.close()
        run("systemctl", "daemon-reload")
        run("systemctl", "reset-failed", UNIT)
        run("umount", str(STATE))
        with contextlib.suppress(OSError):
            STATE.rmdir()
        CONFIG.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            CONFIG.parent.rmdir()
        for path in ASIDE:
            if aside(path).exists():
                aside(path).rename(path)
        APT_CACHES.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        run("fstrim", str(scratch_dir()))  # the fill's blocks back to the host's image


def test_install_enables_the_unit_without_starting_it(machine: Machine) -> None:
    done = machine.apt("install", "install", machine.deb(machine.release))
    out = done.stdout + done.stderr
    assert package_state() == f"install ok installed {machine.release}", out
    assert "thinwatchd: enabled, not started" in out, out
    assert run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert run("systemctl", "is-active", UNIT).stdout.strip() == "inactive"
    assert not Path(f"/dev/mapper/{POOL}").exists()
    # The packaged unit, and the command a user's shell finds: Debian's python3.
    assert unit_property("FragmentPath") in (
        f"/lib/systemd/system/{UNIT}",
        f"/usr/lib/systemd/system/{UNIT}",
    )
    exec_start = unit_property("ExecStart")
    assert "argv[]=/usr/bin/thinwatchd --config /etc/thinwatchd/config.yaml run " in exec_start
    assert shutil.which("thinwatchd", path=ROOT_PATH) == "/usr/bin/thinwatchd"
    assert Path("/usr/bin/thinwatchd").read_text().startswith("#!/usr/bin/python3\n")
    # The conffile is the example; containerd and docker start thinwatchd first.
    assert CONFIG.read_bytes() == committed("config.example.yaml")
    conffiles = run("dpkg-query", "-W", "-f", "${Conffiles}", "thinwatchd").stdout
    assert str(CONFIG) in conffiles, conffiles
    for consumer in ("containerd", "docker"):  # (both installed: scripts/bootstrap)
        dropins = run("systemctl", "show", "-P", "DropInPaths", f"{consumer}.service").stdout
        assert f"/{consumer}.service.d/thinwatchd.conf" in dropins, dropins
        wants = run("systemctl", "show", "-P", "Wants", f"{consumer}.service").stdout
        assert UNIT in wants.split(), wants
    machine.done.append("install")


def test_edit_the_config_then_enable_now_status_and_journal(machine: Machine) -> None:
    machine.needs("install")
    text = CONFIG.read_text()
    for old, new in EDITS:
        assert text.count(f"\n{old}\n") == 1, f"config.example.yaml: {old.strip()!r} not once"
        text = text.replace(f"\n{old}\n", f"\n{new}\n")
    CONFIG.write_text(text)
    ok("thinwatchd", "check-config")
    started = time.monotonic()
    done = run("systemctl", "enable", "--now", "thinwatchd")
    machine.figures["enable --now"] = time.monotonic() - started
    assert done.returncode == 0, done.stderr + machine.log()
    assert run("systemctl", "is-active", UNIT).stdout.strip() == "active", machine.log()
    assert unit_property("NRestarts") == "0", machine.log()
    assert Path(f"/dev/mapper/{POOL}").exists(), machine.log()
    pid = main_pid()
    assert cmdline(pid) == [
        "/usr/bin/python3",
        "/usr/bin/thinwatchd",
        "--config",
        str(CONFIG),
        "run",
    ], cmdline(pid)
    assert os.path.realpath(f"/proc/{pid}/exe").startswith("/usr/bin/python3")
    status = run("thinwatchd", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert POOL in status.stdout and "rw" in status.stdout.split(), status.stdout
    log = ok("journalctl", "-u", "thinwatchd", "--no-pager")
    assert "Started" in log, log
    created = run(
        "journalctl",
        "-u",
        UNIT,
        "-o",
        "json",
        "--no-pager",
        "--since",
        machine.since,
        f"MESSAGE_ID={MessageId.POOL_CREATED.value}",
    ).stdout.splitlines()
    assert [json.loads(e)["POOL"] for e in created] == [POOL], log
    # journalctl -x explains it from the package's catalog (systemd's trigger built the
    # database at install).
    explained = ok("journalctl", "-xu", "thinwatchd", "--no-pager", "--since", machine.since)
    for line in (
        f"Subject: Thin pool {POOL} created",
        f"thinwatchd created the device-mapper thin pool {POOL} on new files: its",
    ):
        assert f"\u2591\u2591 {line}\n" in explained, explained
    # The man pages render.
    for section, page in (("8", "thinwatchd"), ("5", "thinwatchd.yaml")):
        text = ok("man", section, page)
        assert text.startswith(f"{page.upper()}({section})"), text[:500]
        assert "NAME" in text and "DESCRIPTION" in text, text[:500]
    machine.done.append("enable")


@dataclass
class UpgradeFill:
    """The fill's writer and what was seen of it."""

    writer: subprocess.Popen[str]
    progress: Progress
    klog: KernelLog
    dev: str  # the pool's major:minor, as the kernel names it in its log


def kernel_clock_offset(klog: KernelLog, mark: str, at: float) -> float:
    found = [t for t, m in klog.read() if m == f"thinwatchd-test: {mark}"]
    assert found, f"the kernel log lost the mark {mark!r}"
    return found[-1] - at


def test_upgrade_during_a_fast_fill_keeps_the_pool_up(machine: Machine) -> None:
    machine.needs("enable")
    dm = machine.dm
    info = dm.info(POOL)
    assert info is not None
    dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
    klog = KernelLog()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    thin = create_thin(dm, POOL, THIN, 0, FILL_MAX_MIB * MiB)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, thin, str(FILL_MAX_MIB), str(FILL_RATE_MIB)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress = Progress(writer.pid)
    try:
        deadline = time.monotonic() + 60
        while progress.written() == 0 and writer.poll() is None:
            assert time.monotonic() < deadline, "the writer wrote nothing in 60 s"
            time.sleep(0.05)
        fill_start = time.monotonic()
        time.sleep(FILL_LEAD)
        old = main_pid()
        watch = StartWatch(old)
        at = kmsg_mark("restart 0 (upgrade)")
        action = Action(0, "apt install (upgrade)", at, old, written_mib=progress.written() // MiB)
        upgraded = machine.apt("upgrade", "install", machine.deb(machine.upgrade), check=False)
        action.done = time.monotonic()
        writing_through = writer.poll() is None
        action.new_pid = main_pid()
        action.forked = process_started(action.new_pid)
        action.control = watch.stop() if watch.pid == action.new_pid else None
        tail = time.monotonic() + FILL_TAIL
        while time.monotonic() < tail and writer.poll() is None:
            time.sleep(0.1)
        if writer.poll() is None:
            writer.terminate()
        code = writer.wait(120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(30)
        progress.stop()
    time.sleep(2)  # the journal's last lines
    # Figures, as test_restart_under_fill reports each restart.
    offset = kernel_clock_offset(klog, "restart 0 (upgrade)", at)
    ours = [(t - offset, m) for t, m in klog.read() if dev in m]
    klog.close()
    episodes = [(t, m) for t, m in ours if OUT_OF_SPACE in m]
    resizes = [(t, int(g[1]) * BLOCK) for t, m in ours if (g := GROWING.search(m))]

    def size(t: float) -> int:
        return max([b for s, b in resizes if s <= t], default=64 * MiB)

    entries = journal(since)
    t_end = progress.samples[-1][0] if progress.samples else fill_start
    written = progress.written() // MiB
    lines = [
        f"upgrade {machine.release} -> {machine.upgrade} (apt install, {action.done - at:.1f} s) "
        f"during a fill of {written} MiB (O_DIRECT, 1 MiB writes, paced at {FILL_RATE_MIB} "
        f"MiB/s) of a 64 MiB pool in "
        f"{t_end - fill_start:.1f} s ({written / max(t_end - fill_start, 1e-9):.1f} MiB/s); "
        f"{written - action.written_mib} MiB written during and after the upgrade",
        *action_lines(action, float("inf"), entries, progress, False, None, size),
        f"out-of-space episodes: {len(episodes)}",
        *(f"    {t - fill_start:+.2f} s into the fill: {m}" for t, m in episodes),
        f"back to write mode: {sum(1 for _, m in ours if BACK_TO_WRITE in m)}",
    ]
    stalls = progress.stalls(0.5)
    worst = max(stalls, key=lambda s: s[1]) if stalls else None
    lines.append(
        f"writer's longest stall: {worst[1]:.2f} s at +{worst[0] - fill_start:.2f} s"
        if worst
        else "writer's longest stall: none over 0.5 s"
    )
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("THINWATCHD_VM_OUT")
    if out:
        with contextlib.suppress(OSError):
            Path(out, "debian-package-upgrade.txt").write_text(
                f"{text}\n\n--- apt\n{upgraded.stdout}{upgraded.stderr}\n"
            )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert package_state() == f"install ok installed {machine.upgrade}"
    assert writing_through, f"the fill ended before the upgrade did\n{text}"
    assert code in (0, -signal.SIGTERM), f"the writer exited {code}: {writer.stderr}\n{text}"
    assert action.new_pid and action.new_pid != old, f"the daemon was not restarted\n{text}"
    assert cmdline(action.new_pid)[:2] == ["/usr/bin/python3", "/usr/bin/thinwatchd"]
    adopted = [
        e
        for e in entries
        if e.fields.get("MESSAGE_ID") == MessageId.POOL_ADOPTED.value and e.pid == action.new_pid
    ]
    assert [e.fields.get("POOL") for e in adopted] == [POOL], text
    assert not episodes, f"out of space during the upgrade\n{text}"
    assert pool_mode(dm) == "rw", text
    machine.done.append("upgrade")


def test_remove_stops_the_daemon_and_keeps_the_pool_and_the_conffile(machine: Machine) -> None:
    machine.needs("upgrade")
    edited = CONFIG.read_bytes()
    done = machine.apt("remove", "remove", "thinwatchd")
    out = done.stdout + done.stderr
    assert "thinwatchd: stopped; its pools stay up" in out, out
    assert package_state() == f"deinstall ok config-files {machine.upgrade}", out
    assert not main_pid()
    assert not Path("/usr/bin/thinwatchd").exists()
    assert CONFIG.read_bytes() == edited
    assert Path(f"/dev/mapper/{POOL}").exists() and Path(f"/dev/mapper/{THIN}").exists()
    assert pool_mode(machine.dm) == "rw"
    # The catalog left the database with the file (systemd's trigger).
    listed = run("journalctl", "--list-catalog", MessageId.POOL_CREATED.value)
    assert MessageId.POOL_CREATED.value not in listed.stdout, listed.stdout
    machine.done.append("remove")


def test_purge_removes_the_config_and_the_unit_and_says_the_pool_stays(machine: Machine) -> None:
    machine.needs("remove")
    files = {p: p.stat().st_size for p in (STATE / POOL / "data", STATE / POOL / "metadata")}
    done = machine.apt("purge", "purge", "thinwatchd")
    out = done.stdout + done.stderr
    assert not package_state(), package_state()
    assert not CONFIG.parent.exists()
    assert not Path(f"/lib/systemd/system/{UNIT}").exists()
    assert not list(Path("/etc/systemd/system").rglob(UNIT)), "an enable link is left"
    assert run("systemctl", "list-unit-files", UNIT).stdout.count(UNIT) == 0
    assert unit_property("LoadState") == "not-found"
    # The pool, its thin volume and its files are left, and purge says which.
    assert pool_mode(machine.dm) == "rw"
    assert Path(f"/dev/mapper/{THIN}").exists()
    assert {p: p.stat().st_size for p in files} == files
    assert "thinwatchd: purged; pools and their files are left alone:" in out, out
    said = re.search(
        rf"thinwatchd:   {POOL} is still active, on (/dev/loop\d+) (/dev/loop\d+)\n", out
    )
    assert said, out
    loops = LoopControl()
    found = {loops.find(str(p)) for p in files}
    assert {loop.path for loop in found if loop is not None} == {said[1], said[2]}, out
    for path in files:
        assert f"thinwatchd:   kept: {path}\n" in out, out
    machine.done.append("purge")
