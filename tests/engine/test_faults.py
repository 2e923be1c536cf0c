"""The fault matrix of issue 7: every kernel call of a creation, an adoption, a recreation, a growth
and a reload, failed with each errno that call can return.

Each scenario is first run once without faults, recording every dm/loop ioctl and file syscall it
makes together with the daemon's stack at that call (its *call site*). Then, for each distinct
(call, target, call site) and each errno that call can return, the scenario runs again from
scratch with that one call failing (``FakeKernel.fail(op, errno, after=<earlier calls of op>)``),
and the test checks what issue 7 asks of the daemon:

- no exception escapes but the documented ones (at start-up only ThinwatchError, which the CLI
  turns into one line and an exit code; nothing from a running daemon), and no traceback in the
  log; a transient error at start-up does not become an exit code that stops systemd restarting;
- no pool is left suspended or with a stale inactive table;
- no file shrank, no used metadata header was zeroed, no pool lost its recorded data;
- a growth: the failure is said once (one GROWTH_FAILED entry) however often it repeats, retried
  with backoff (not before it ends, and when it ends), and counts as "no room" for when_full;
- once the fault is lifted the daemon converges: restart, retry or reload succeeds, the pool ends
  resumed and grown where a growth was due, back on queue_if_no_space.

Every check of a case is evaluated and all violations are reported together, so one failing case
says everything that went wrong in it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import thinwatchd
from testbed.fake_kernel import FakeKernel, FakeNodes, Fault, FaultySyscalls
from testbed.workers import InlineWorkers
from thinwatchd.base.errors import ConfigError, PoolMismatchError, PoolSetupError, ThinwatchError
from thinwatchd.base.event_loop import EventLoop
from thinwatchd.base.logs import MessageId
from thinwatchd.base.notify import Notifier
from thinwatchd.base.units import Bytes
from thinwatchd.daemon.daemon import Daemon, Threads
from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.fs import Files

MiB = 1024**2
HEADER = 4096
ERROR_AFTER = 2.0  # when_full.error_after of every pool here
CHECK_INTERVAL = 10.0
_PACKAGE = os.path.dirname(os.path.abspath(thinwatchd.__file__))
_SYSCALLS = os.path.join(_PACKAGE, "kernel", "syscalls.py")

E = errno
#: The errnos each call can return (its man page or the kernel's ioctl handler), from the set of
#: issue 7 (EIO, ENOSPC, EROFS, EACCES, ENOMEM, EINTR, EAGAIN) plus the few that call is known for
#: (EBUSY of a dm device in use, EINVAL of a refused table, EEXIST of a name taken meanwhile).
_DM = (E.EACCES, E.ENOMEM, E.EINTR, E.EIO)  # dm ctl_ioctl: no CAP_SYS_ADMIN, allocation, ...
ERRNOS: dict[str, tuple[int, ...]] = {
    "lstat": (E.EACCES, E.EIO, E.ENOMEM),
    "stat": (E.EACCES, E.EIO, E.ENOMEM),
    "fstat": (E.EIO, E.ENOMEM),
    "statvfs": (E.EACCES, E.EIO, E.ENOMEM, E.EINTR),
    "open": (E.EACCES, E.EROFS, E.ENOSPC, E.EIO, E.ENOMEM, E.EINTR),
    "mkdir": (E.EACCES, E.EROFS, E.ENOSPC, E.EIO, E.ENOMEM),
    "ftruncate": (E.EIO, E.EINTR, E.ENOSPC, E.EROFS),
    "fallocate": (E.EIO, E.ENOSPC, E.EINTR),
    "fsync": (E.EIO, E.ENOSPC, E.EROFS),
    "pread": (E.EIO, E.EINTR, E.EAGAIN),
    "lseek": (E.EIO, E.ENOMEM),
    "fadvise64": (E.EIO, E.EINVAL),
    "link": (E.EACCES, E.EROFS, E.ENOSPC, E.EIO, E.ENOMEM, E.EEXIST),
    "unlink": (E.EACCES, E.EROFS, E.EIO, E.ENOMEM),
    "getdents": (E.EIO, E.ENOMEM, E.EACCES),
    "DM_DEV_STATUS": _DM,
    "DM_DEV_CREATE": (*_DM, E.EBUSY),
    "DM_DEV_REMOVE": (*_DM, E.EBUSY),
    "DM_TABLE_LOAD": (*_DM, E.EINVAL, E.EBUSY),
    "DM_TABLE_CLEAR": _DM,
    "DM_TABLE_STATUS": _DM,
    "DM_DEV_RESUME": (*_DM, E.EINVAL),
    "DM_DEV_SUSPEND": _DM,
    "DM_LIST_DEVICES": (E.ENOMEM, E.EINTR),
    "DM_DEV_ARM_POLL": (E.ENOMEM, E.EINTR),
    "DM_TARGET_MSG": _DM,
    "DM_DEV_WAIT": _DM,
    "LOOP_GET_STATUS64": (E.EACCES, E.ENOMEM, E.EIO),
    "LOOP_CONFIGURE": (E.EACCES, E.EBUSY, E.ENOMEM, E.EROFS, E.EIO, E.EAGAIN),
    "LOOP_SET_CAPACITY": (E.EIO, E.ENOMEM, E.EINTR),
    "BLKGETSIZE64": (E.EIO, E.ENOMEM),
}
#: Errors a retry can outlive without an operator (the rest are a path or permission to fix).
TRANSIENT = frozenset({E.EIO, E.ENOMEM, E.EINTR, E.EAGAIN, E.ENOSPC, E.EBUSY, E.ENOBUFS})
#: The calls a switch to error_if_no_space itself needs (status read, live table, loop size,
#: load, resume): while one of them fails, when_full cannot act, only keep its clock running.
SWITCH_NEEDS = frozenset({"DM_TABLE_STATUS", "BLKGETSIZE64", "DM_TABLE_LOAD", "DM_DEV_RESUME"})
#: The dm event read: failing it is no failed growth; test_event_read_failure_* cover it.
EVENT_READ = frozenset({"DM_DEV_ARM_POLL", "DM_LIST_DEVICES"})


# -- the test bed --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Call:
    """One recorded kernel call: op, target with the test's paths and fds normalised, site."""

    op: str
    target: str
    site: tuple[tuple[str, int], ...]  # the daemon's frames (file, line), innermost first
    failed: bool  # failed by a fault of the scenario itself (not the one a case injects)

    @property
    def key(self) -> tuple[str, str, tuple[tuple[str, int], ...]]:
        return (self.op, self.target, self.site)


def _site() -> tuple[tuple[str, int], ...]:
    frames: list[tuple[str, int]] = []
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and name != _SYSCALLS:
            frames.append((name[len(_PACKAGE) + 1 :], frame.f_lineno))
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(frames)


class RecordingKernel(FakeKernel):
    """FakeKernel that can also record each call's site and whether a fault failed it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = str(root)
        self.recording: list[Call] | None = None

    def _inject(self, op: str, target: str, kind: type[Exception]) -> None:
        if self.recording is None:
            super()._inject(op, target, kind)
            return
        call = Call(op, self._normalise(target), _site(), False)
        self.recording.append(call)
        try:
            super()._inject(op, target, kind)
        except BaseException:
            call.failed = True
            raise

    def _normalise(self, target: str) -> str:
        if target.isdigit():
            return "<fd>"
        return re.sub(r"thinwatchd-[0-9a-f]{8}$", "thinwatchd-<random>", target).replace(
            self.root, "<tmp>"
        )


class FsyncFreeSyscalls(FaultySyscalls):
    """The fake kernel's syscalls with fsync recorded and failable but not made: nothing here
    survives a crash, and a real fsync costs milliseconds on a disk (thousands of cases)."""

    def fsync(self, fd: int) -> None:
        self._enter("fsync", str(fd))
        os.fstat(fd)  # still an error on a bad fd


class NoTmpfileSyscalls(FsyncFreeSyscalls):
    """A filesystem without O_TMPFILE (creation falls back to a named temporary file)."""

    def open(self, path: str, flags: int, mode: int = 0o600, dir_fd: int | None = None) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            self._enter("open", path)
            raise OSError(E.EOPNOTSUPP, os.strerror(E.EOPNOTSUPP))
        return super().open(path, flags, mode, dir_fd)


class CountingFiles(Files):
    """Files that counts growth attempts (every growth starts with Files.grow)."""

    grows = 0

    def grow(self, path: str, new_size: Bytes, **kwargs: Any) -> Bytes:
        self.grows += 1
        return super().grow(path, new_size, **kwargs)


class SyncWorkers:
    """The daemon's Workers interface, each job run at submit and its result delivered on the
    loop's next turn, as the real one does from its threads. The calls of a build and of the
    loop then interleave the same way in every run, so a call's index means the same call in
    the recording and in each case (and the fake kernel is not thread-safe anyway)."""

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._running: dict[str, tuple[Any, BaseException | None, Callable[..., None]]] = {}

    def busy(self, key: str) -> bool:
        return key in self._running

    def keys(self) -> list[str]:
        return list(self._running)

    def submit(
        self, key: str, job: Callable[[], Any], done: Callable[..., None], background: bool = False
    ) -> bool:
        if key in self._running:
            return False
        try:
            self._running[key] = (job(), None, done)
        except BaseException as exc:  # delivered to the loop, which decides (as Workers does)
            self._running[key] = (None, exc, done)
        self._loop.call_later(0, functools.partial(self._deliver, key))
        return True

    def hurry(self, key: str) -> bool:
        return False  # each job ran at submit: nothing waits for a thread

    def _deliver(self, key: str) -> None:
        result, error, done = self._running.pop(key)
        done(result, error)  # an exception here is the loop's to log (a traceback: a failure)

    def run_until_idle(self, timeout: float | None = None) -> None:
        for _ in range(100):
            if not self._running:
                return
            self._loop.run_once(max_wait=0)
        raise AssertionError(f"worker results never delivered: {list(self._running)}")

    def close(self) -> None:
        pass


#: Builds and file jobs in SyncWorkers, reconciles inline: recordings are made outside the
#: tests' fixtures, which run the latter inline too.
SYNC = Threads(builds=SyncWorkers, files=SyncWorkers, reconciles=InlineWorkers)


def pool_config(root: Path, directory: str, **overrides: object) -> dict[str, object]:
    pool: dict[str, object] = {
        "data_file": f"{root}/{directory}/data",
        "metadata_file": f"{root}/{directory}/metadata",
        "data_size": "64MiB",
        "metadata_size": "8MiB",
        "low_water_mark": 16,
        "reserve": 0,
        "when_full": {"error_after": f"{ERROR_AFTER:g}s"},
    }
    pool.update(overrides)
    return pool


@dataclass
class Env:
    """One run of a scenario: a fake kernel, real files under root, a clock, daemons."""

    root: Path
    scenario: Scenario
    no_tmpfile: bool = False
    clock: Clock = field(default_factory=Clock)
    daemons: list[Daemon] = field(default_factory=list)
    target: Daemon | None = None  # the daemon the action works on

    def __post_init__(self) -> None:
        self.fake = RecordingKernel(self.root)
        syscalls = (NoTmpfileSyscalls if self.no_tmpfile else FsyncFreeSyscalls)(self.fake)
        self.files = CountingFiles(syscalls)
        self.kernel = Kernel(self.fake, self.fake, FakeNodes(), self.files)
        self.config = self.root / "config.yaml"
        self.write_config(pool=pool_config(self.root, "pools", **self.scenario.pool))

    def write_config(self, **pools: dict[str, object]) -> None:
        document = {"daemon": {"check_interval": f"{CHECK_INTERVAL:g}s"}, "pools": pools}
        self.config.write_text(json.dumps(document))  # JSON is YAML, and much faster to write

    def new_daemon(self) -> Daemon:
        d = Daemon(
            self.config,
            self.kernel,
            notifier=Notifier(),
            loop=EventLoop(self.clock),
            check_metadata=lambda path: None,
            threads=SYNC,
        )
        self.daemons.append(d)
        return d

    def close(self) -> None:
        for d in reversed(self.daemons):  # each loop restores the signal wakeup fd it found
            with contextlib.suppress(Exception):
                d.loop.close()
        self.fake.close()

    # -- looking without calling (a check must neither record a call nor trip a fault) -----

    def device_problems(self, *, as_found: bool = False) -> list[str]:
        """as_found: a failed start may leave the pool as the setup left it (suspended, with an
        inactive table); systemd's restart comes back to it."""
        out = []
        for name, dev in self.fake.devices.items():
            if dev.suspended and not as_found:
                out.append(f"pool {name} left SUSPENDED (its writers hang)")
            if dev.inactive is not None and not as_found:
                out.append(f"pool {name} left with a stale inactive table {dev.inactive}")
        return out

    def files_state(self) -> dict[str, tuple[int, bool]]:
        """Every pool file: (size, header holds something)."""
        out = {}
        for path in sorted(self.root.glob("pools*/*")):
            if path.is_file() and not path.name.startswith("."):
                with open(path, "rb") as f:
                    out[str(path)] = (os.fstat(f.fileno()).st_size, any(f.read(HEADER)))
        return out

    def file_sizes(self) -> dict[str, int]:
        return {
            os.path.relpath(path, self.root): size for path, (size, _) in self.files_state().items()
        }

    def metadata_state(self) -> dict[tuple[int, int], tuple[int, int, int]]:
        """What each pool's metadata records: (data used, data total, metadata used)."""
        return {
            key: (md.data_used, md.data_total, md.meta_used)
            for key, md in self.fake.metadata.items()
        }


def settle(d: Daemon | None) -> None:
    """Deliver finished worker jobs (a build, a rebuild) to the daemon, as its loop would."""
    if d is None:
        return
    for _ in range(10):  # a reload's file check, then the builds it starts
        d.file_workers.run_until_idle()
        d.workers.run_until_idle()
        if not d.file_workers.keys() and not d.workers.keys():
            return


def run_due(env: Env, d: Daemon) -> None:
    """One turn of the daemon's loop at the clock's time: due timers (no waiting)."""
    d.loop.run_once(max_wait=0)
    settle(d)


def pool_md(env: Env, name: str = "pool") -> Any:
    dev = env.fake.devices.get(name)
    return None if dev is None or dev.pool is None else dev.pool


# -- scenarios -----------------------------------------------------------------------------


def _started(env: Env) -> Daemon:
    d = env.new_daemon()
    d.start()
    settle(d)
    return d


def _setup_leftover(env: Env) -> None:
    """A crash during an earlier creation without O_TMPFILE left a temporary file behind."""
    os.makedirs(env.root / "pools", mode=0o700)
    (env.root / "pools" / ".metadata.thinwatchd-0badf00d").write_bytes(b"")


def _setup_create_interrupted(env: Env) -> None:
    """A crash between DM_DEV_CREATE and the first resume: both files made (the metadata still
    all zero), both loops attached, a device with no table."""
    os.makedirs(env.root / "pools", mode=0o700)
    for name, size in (("metadata", 8 * MiB), ("data", 64 * MiB)):
        fd = os.open(env.root / "pools" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        os.close(fd)
        env.fake.attach(str(env.root / "pools" / name))
    env.fake.create("pool")


def _used(env: Env) -> None:
    _started(env)
    env.fake.write_blocks("pool", 100)


def _setup_adopt_unfinished(env: Env) -> None:
    """A crash mid-growth: data file grown, its loop not yet; metadata loop grown, table not."""
    d = _started(env)
    env.fake.write_blocks("pool", 100)
    pool = d.pools["pool"].pool
    os.truncate(pool.settings.data_file, 96 * MiB)
    os.truncate(pool.settings.metadata_file, 12 * MiB)
    env.fake.set_capacity(pool.meta_loop)


def _setup_adopt_suspended(env: Env) -> None:
    """A crash between load and resume: suspended, a table in the inactive slot."""
    d = _started(env)
    env.fake.write_blocks("pool", 100)
    pool = d.pools["pool"].pool
    env.fake.load_table("pool", [pool.target(pool.length)])
    env.fake.suspend("pool")


def _setup_reboot(env: Env) -> None:
    _used(env)
    env.fake.devices.clear()
    env.fake.loops.clear()


def _setup_grow_data(env: Env) -> None:
    d = _started(env)
    pool = d.pools["pool"].pool
    md = pool_md(env)
    env.clock.now += 100  # a steady writer: its fill rate is measured over the minutes it ran
    env.fake.write_blocks("pool", md.metadata.data_total - pool.table.low_water_mark + 2)
    assert env.fake.events_pending()
    env.target = d


def _setup_grow_meta(env: Env) -> None:
    d = _started(env)
    env.clock.now += 100
    env.fake.write_blocks("pool", 10)
    md = pool_md(env).metadata
    md.meta_used = md.meta_total * 4 // 5  # past the 75 % threshold; data far from its mark
    env.fake._event(env.fake.devices["pool"])
    env.target = d


def _setup_reload_add(env: Env) -> None:
    d = _started(env)
    env.fake.write_blocks("pool", 10)
    env.write_config(
        pool=pool_config(env.root, "pools", **env.scenario.pool),
        pool2=pool_config(env.root, "pools2"),
    )
    env.target = d


def _act_start(env: Env) -> None:
    env.target = env.new_daemon()
    env.target.start()
    settle(env.target)


def _act_events(env: Env) -> None:
    assert env.target is not None
    env.target.dm_events.check()
    settle(env.target)


def _act_reload(env: Env) -> None:
    assert env.target is not None
    env.target.reload()
    settle(env.target)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "start" (a new daemon starts), "grow" (a running one grows), "reload"
    setup: Callable[[Env], None]
    action: Callable[[Env], None]
    pool: dict[str, object] = field(default_factory=dict)  # config overrides of "pool"
    no_tmpfile: bool = False  # the pools' filesystem lacks O_TMPFILE
    #: Faults that are part of the scenario (installed before the action): (op, errno).
    base_faults: tuple[tuple[str, int], ...] = ()
    growth: str = ""  # "data" or "metadata": what the action must grow
    found_suspended: bool = False  # the setup leaves the pool suspended, an inactive table in
    #: A variant of this scenario: only the calls the parent does not make are cases here.
    parent: str = ""


#: Preallocated pools are small, and grow by little: their blocks are really allocated on disk
#: (and pytest keeps the last runs' tmp_path). With so small a step, the adaptive mark (its
#: 32 MiB margin once a fill rate is measured) would decide the size: off, for comparable sizes.
PREALLOCATED = {
    "preallocate": True,
    "data_size": "8MiB",
    "data": {"step": "16MiB", "step_percent": "0%", "adaptive_low_water": False},
}

SCENARIOS = {
    s.name: s
    for s in (
        Scenario("create", "start", lambda env: None, _act_start),
        Scenario(
            "create_prealloc",
            "start",
            lambda env: None,
            _act_start,
            pool=PREALLOCATED,
            parent="create",
        ),
        Scenario(
            "create_no_tmpfile",
            "start",
            lambda env: None,
            _act_start,
            no_tmpfile=True,
            parent="create",
        ),
        Scenario(
            "create_no_tmpfile_leftover",
            "start",
            _setup_leftover,
            _act_start,
            no_tmpfile=True,
            parent="create_no_tmpfile",
        ),
        Scenario(
            "create_interrupted", "start", _setup_create_interrupted, _act_start, parent="create"
        ),
        Scenario("adopt", "start", _used, _act_start),
        Scenario("adopt_unfinished", "start", _setup_adopt_unfinished, _act_start, parent="adopt"),
        Scenario(
            "adopt_suspended",
            "start",
            _setup_adopt_suspended,
            _act_start,
            found_suspended=True,
            parent="adopt",
        ),
        Scenario("recreate", "start", _setup_reboot, _act_start),
        Scenario("grow_data", "grow", _setup_grow_data, _act_events, growth="data"),
        Scenario(
            "grow_data_prealloc",
            "grow",
            _setup_grow_data,
            _act_events,
            pool=PREALLOCATED,
            growth="data",
            parent="grow_data",
        ),
        Scenario(
            "grow_data_resume_failed",
            "grow",
            _setup_grow_data,
            _act_events,
            base_faults=(("DM_DEV_RESUME", E.EINVAL),),
            growth="data",
            parent="grow_data",
        ),
        Scenario(
            "grow_meta",
            "grow",
            _setup_grow_meta,
            _act_events,
            pool={"metadata_size": "2MiB"},
            growth="metadata",
        ),
        Scenario("reload_add", "reload", _setup_reload_add, _act_reload),
    )
}


# -- enumeration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    scenario: str
    index: int  # of the call in the action's calls
    op: str
    after: int  # calls of op before it that the injected fault sees
    err: int
    site: str  # for the report

    @property
    def id(self) -> str:
        return f"{self.scenario}-{self.index:03d}-{self.op}-{E.errorcode[self.err]}"


def prepare(env: Env) -> list[Fault]:
    """Set the scenario up (no faults, nothing recorded) and install its own faults."""
    env.scenario.setup(env)
    return [env.fake.fail(op, err) for op, err in env.scenario.base_faults]


@dataclass
class Recording:
    calls: list[Call]
    sizes: dict[str, int]  # each pool file's size after the action (path relative to the root)


def record(scenario: Scenario, root: Path) -> Recording:
    """Run the scenario's action without an injected fault; return its calls and outcome."""
    env = Env(root, scenario, scenario.no_tmpfile)
    try:
        prepare(env)
        env.fake.recording = []
        scenario.action(env)
        calls, env.fake.recording = env.fake.recording, None
        return Recording(calls, env.file_sizes())
    finally:
        env.close()


def enumerate_cases(
    scenario: Scenario, calls: list[Call], parent: list[Call] | None = None
) -> list[Case]:
    """One case per distinct (op, target, site) and errno; repeats of one are sampled once, and
    a variant leaves out the calls its parent scenario covers already."""
    cases: list[Case] = []
    seen: set[object] = {c.key for c in parent or ()}
    for index, call in enumerate(calls):
        if call.key in seen or (scenario.kind == "grow" and call.op in EVENT_READ):
            continue
        seen.add(call.key)
        if call.op not in ERRNOS:
            raise AssertionError(f"no errno set for {call.op}: add it to ERRNOS")
        after = sum(1 for c in calls[:index] if c.op == call.op and not c.failed)
        inner = call.site[0] if call.site else ("?", 0)
        site = f"{call.target} at {inner[0]}:{inner[1]}"
        for err in ERRNOS[call.op]:
            cases.append(Case(scenario.name, index, call.op, after, err, site))
    return cases


@functools.cache
def recordings() -> dict[str, Recording | str]:
    """Each scenario's calls, or the traceback of its fault-free run."""

    out: dict[str, Recording | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, scenario in SCENARIOS.items():
            root = Path(tmp) / name
            root.mkdir()
            logging.disable(logging.CRITICAL)
            try:
                out[name] = record(scenario, root)
            except Exception:
                out[name] = traceback.format_exc()
            finally:
                logging.disable(logging.NOTSET)
    return out


def all_cases() -> list[Any]:
    params: list[Any] = []
    for name, recorded in recordings().items():
        if isinstance(recorded, str):
            params.append(pytest.param(name, None, id=f"{name}-fault-free-run"))
            continue
        scenario = SCENARIOS[name]
        parent = recordings().get(scenario.parent) if scenario.parent else None
        parent_calls = parent.calls if isinstance(parent, Recording) else None
        for case in enumerate_cases(scenario, recorded.calls, parent_calls):
            params.append(pytest.param(name, case, id=case.id))
    return params


# -- the checks ----------------------------------------------------------------------------


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


class Checks:
    """Collects every violation of a case, with the stage it was seen at."""

    def __init__(self, env: Env, caplog: pytest.LogCaptureFixture) -> None:
        self.env = env
        self.caplog = caplog
        self.problems: list[str] = []
        self._seen_records = 0
        self.files = env.files_state()
        self.metadata = env.metadata_state()
        self.due_before = _due_size(env, env.scenario) if env.scenario.growth else 0

    def add(self, stage: str, text: str) -> None:
        self.problems.append(f"[{stage}] {text}")

    def records(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.name.startswith("thinwatchd")]

    def message_ids(self, since: int = 0) -> list[str]:
        return [
            getattr(r, "journal_fields", {}).get("MESSAGE_ID", "") for r in self.records()[since:]
        ]

    def no_traceback(self, stage: str) -> None:
        records = self.records()
        for r in records[self._seen_records :]:
            if r.exc_info or r.levelno >= logging.CRITICAL:
                text = f"log record at {r.levelname} with a traceback: {r.getMessage()}"
                if r.exc_info and r.exc_info[1] is not None:
                    text += "\n" + _format_exc(r.exc_info[1])
                self.add(stage, text)
        self._seen_records = len(records)

    def state(self, stage: str, *, as_found: bool = False) -> None:
        """Devices resumed without a stale table; files never shrunk or zeroed; data kept."""
        for text in self.env.device_problems(as_found=as_found):
            self.add(stage, text)
        now = self.env.files_state()
        for path, (size, header) in self.files.items():
            if path not in now:
                self.add(stage, f"{path} disappeared")
                continue
            if now[path][0] < size:
                self.add(stage, f"{path} SHRANK from {size} to {now[path][0]} bytes")
            if header and not now[path][1]:
                self.add(stage, f"the used header of {path} was ZEROED")
        for key, (used, total, meta_used) in self.env.metadata_state().items():
            old = self.metadata.get(key)
            if old is not None and (used < old[0] or total < old[1] or meta_used < old[2]):
                self.add(
                    stage,
                    f"pool metadata {key} went from {old} to {(used, total, meta_used)}"
                    " (formatted or rolled back: data lost)",
                )
        self.no_traceback(stage)

    def no_larger_than(self, sizes: dict[str, int]) -> None:
        """In the end, each file is the size the fault-free run gave it: a failed growth is
        finished by its retry, not followed by another growth on top."""
        for path, size in self.env.file_sizes().items():
            if path in sizes and size > sizes[path]:
                self.add(
                    "the end",
                    f"{path} is {size} bytes, more than the {sizes[path]} of the "
                    f"fault-free run: failed attempts grew it again and again",
                )

    def report(self, case: Case) -> str:
        head = f"{case.id}: {case.op} ({case.site}) failing with {E.errorcode[case.err]}"
        return head + "\n" + "\n".join(self.problems)


def _op_count(env: Env, op: str) -> int:
    prefix = op + " "
    return sum(1 for c in env.fake.calls if c.startswith(prefix))


def _check_replay(env: Env, start: int, case: Case, recorded: Recording, fault: Fault) -> None:
    """The run must have made the recorded calls up to the failed one: else the index means
    another call than the recorded one (a bug of this test, or a daemon that is not
    deterministic)."""
    ops = [c.split(" ", 1)[0] for c in env.fake.calls[start : start + case.index + 1]]
    expected = [c.op for c in recorded.calls[: case.index + 1]]
    if ops != expected or fault.after != 0:
        pytest.fail(
            f"the run diverged from the recorded one before call {case.index} ({case.op}):\n"
            f"recorded {expected}\nran      {ops}"
        )


def _lift(env: Env) -> None:
    for fault in env.fake.faults:
        fault.times = 0


def _run_start(env: Env, case: Case, checks: Checks, raised: BaseException | None) -> None:
    scenario = env.scenario
    stage = "start with the fault"
    if raised is not None:
        if not isinstance(raised, ThinwatchError):
            checks.add(stage, f"Daemon.start() raised a non-ThinwatchError:\n{_format_exc(raised)}")
        elif case.err in TRANSIENT and isinstance(
            raised, PoolSetupError | PoolMismatchError | ConfigError
        ):
            checks.add(
                stage,
                f"a transient {E.errorcode[case.err]} became "
                f"{type(raised).__name__} (exit 65/78: systemd does not restart "
                f"thinwatchd, an operator must): {raised}",
            )
    checks.state(stage, as_found=scenario.found_suspended and raised is not None)
    _lift(env)
    started = env.target
    if raised is None and started is not None:
        stage = "the same daemon after the fault is lifted"
        if "pool" not in started.pools:
            checks.add(stage, "start() succeeded but the daemon does not watch the pool")
        env.clock.now += 60
        run_due(env, started)
        for managed in list(started.pools.values()):
            started.scheduler.run_pass([managed])
        settle(started)
        checks.state(stage)
    stage = "restart after the fault is lifted"
    again = env.new_daemon()
    try:
        again.start()
        settle(again)
    except Exception as exc:
        checks.add(stage, f"start() failed:\n{_format_exc(exc)}")
        return
    checks.state(stage)
    dev = env.fake.devices.get("pool")
    if dev is None or not dev.active:
        checks.add(stage, "no active pool device after the restart")
        return
    data_size = os.stat(env.root / "pools" / "data").st_size
    if dev.active[0].length * 512 != data_size:
        checks.add(
            stage,
            f"the table ({dev.active[0].length} sectors) does not cover the data "
            f"file ({data_size} bytes): an interrupted growth was not finished",
        )


def _due_size(env: Env, scenario: Scenario) -> int:
    pool = pool_md(env)
    if scenario.growth == "data":
        return int(pool.metadata.data_total)
    return int(pool.metadata.meta_total)


#: Retries watched while a growth keeps failing: 0.25+0.5+1+2+4 s, past when_full's 2 s.
ROUNDS = 5


def _run_grow(env: Env, case: Case, checks: Checks, raised: BaseException | None) -> None:
    scenario, clock, d = env.scenario, env.clock, env.target
    assert d is not None
    stage = "growth with the fault"
    if raised is not None:
        checks.add(stage, f"an exception escaped the running daemon:\n{_format_exc(raised)}")
    checks.state(stage)
    managed = d.pools.get("pool")
    if managed is None:
        checks.add(stage, "the daemon no longer watches the pool")
        return
    state, t0, size_before = managed.state, clock.now, checks.due_before
    delays: list[float] = []
    for rnd in range(1, ROUNDS + 1):
        stage = f"retry {rnd} with the fault"
        if _due_size(env, scenario) != size_before:
            break  # grown in spite of the fault (it hit a step after the growth, or a rollback)
        retry_at = state.retry_at
        if retry_at is None or retry_at <= clock.now:
            checks.add(
                stage,
                f"no retry scheduled (retry_at={retry_at}, now {clock.now}): the failure waits "
                f"for the next dm event or the safety check",
            )
            break
        delays.append(retry_at - clock.now)  # the last attempt failed now
        if delays[-1] < 0.1 or delays[-1] < max(delays):
            checks.add(stage, f"no backoff: retry delays {[round(x, 2) for x in delays]} s")
        if retry_at > clock.now + 0.02:  # an event or the safety check during the backoff
            clock.now = retry_at - 0.01
            attempts = env.files.grows
            d.scheduler.run_pass([managed])
            settle(d)
            if env.files.grows != attempts:
                checks.add(stage, "a reconcile 0.01 s before the backoff ended tried to grow")
        before, attempts = _op_count(env, case.op), env.files.grows
        clock.now = max(clock.now, retry_at)
        run_due(env, d)
        retried = _op_count(env, case.op) != before or env.files.grows != attempts
        # A growth whose file already grew is finished without growing the file again.
        if not retried and _due_size(env, scenario) == size_before:
            checks.add(
                stage, f"nothing retried when the backoff ended (neither a growth nor {case.op})"
            )
            break
        checks.state(stage)
    stage = f"{clock.now - t0:.2f} s of failing growth"
    failed = checks.message_ids().count(MessageId.GROWTH_FAILED)
    still_due = _due_size(env, scenario) == size_before
    # Each distinct failure is said once: the scenario's own (a refused resume) and the
    # injected one, when that is another call (a status read the rollback makes).
    faults = {op for op, _ in scenario.base_faults} | {case.op}
    if not 1 <= failed <= len(faults) if still_due else failed > len(faults):
        lines = [r.getMessage() for r in checks.records() if r.levelno >= logging.ERROR]
        checks.add(
            stage,
            f"{failed} GROWTH_FAILED journal entries for {len(faults)} distinct failures; "
            f"errors logged: {lines}",
        )
    policy_error = bool(pool_md(env).error_if_no_space)
    if still_due:
        since = state.refused_since
        if since is None or since > t0:
            checks.add(
                stage,
                f"the when_full clock is not running (refused_since={since}, "
                f"first failure at {t0})",
            )
        if case.op not in SWITCH_NEEDS and not policy_error:
            checks.add(
                stage,
                f"still queue_if_no_space after {clock.now - t0:.2f} s without room "
                f"(when_full.error_after is {ERROR_AFTER:g} s)",
            )
    _lift(env)
    stage = "the next retry after the fault is lifted"
    retry_at = state.retry_at
    if retry_at is not None and retry_at > clock.now:
        clock.now = retry_at
        run_due(env, d)
        if _due_size(env, scenario) == size_before:
            checks.add(stage, f"the {scenario.growth} did not grow")
    elif _due_size(env, scenario) == size_before:
        checks.add(
            stage,
            f"no retry pending (retry_at={retry_at}, now {clock.now}): the growth "
            f"waits for the safety check",
        )
    if _due_size(env, scenario) == size_before:
        clock.now += CHECK_INTERVAL
        d.scheduler.run_pass([managed])  # what the safety check does
        settle(d)
        stage = "the safety check after the fault is lifted"
        if _due_size(env, scenario) == size_before:
            checks.add(stage, f"the {scenario.growth} did not grow")
    grown = MessageId.DATA_GROWN if scenario.growth == "data" else MessageId.METADATA_GROWN
    if _due_size(env, scenario) != size_before and grown not in checks.message_ids():
        checks.add(stage, f"no {grown.name} journal entry for the growth")
    if pool_md(env).error_if_no_space:
        checks.add(stage, "still error_if_no_space with room to grow again")
    checks.state(stage)


def _run_reload(env: Env, case: Case, checks: Checks, raised: BaseException | None) -> None:
    clock, d = env.clock, env.target
    assert d is not None
    stage = "reload with the fault"
    if raised is not None:
        checks.add(stage, f"an exception escaped reload():\n{_format_exc(raised)}")
    checks.state(stage)
    _lift(env)
    if case.err in TRANSIENT and "pool2" not in d.pools:
        stage = "the safety check after the fault is lifted"
        clock.now += CHECK_INTERVAL + 0.01
        run_due(env, d)
        if "pool2" not in d.pools:
            checks.add(
                stage,
                f"the pool added by the reload is still not built {CHECK_INTERVAL:g}"
                f" s after a transient {E.errorcode[case.err]} (only a new SIGHUP "
                f"would build it)",
            )
        checks.state(stage)
    if "pool2" not in d.pools:
        stage = "a second reload after the fault is lifted"
        d.reload()
        settle(d)
        if "pool2" not in d.pools:
            checks.add(stage, "the pool added by the reload is still not built")
        checks.state(stage)
    for name in ("pool", "pool2"):
        dev = env.fake.devices.get(name)
        if dev is None or not dev.active:
            checks.add("the end", f"pool {name} has no active device")


RUNNERS = {"start": _run_start, "grow": _run_grow, "reload": _run_reload}


@pytest.mark.parametrize(("scenario_name", "case"), all_cases())
def test_fault(
    scenario_name: str, case: Case | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = recordings()[scenario_name]
    if isinstance(recorded, str) or case is None:
        pytest.fail(f"scenario {scenario_name} fails without any fault:\n{recorded}")
    scenario = SCENARIOS[scenario_name]
    caplog.set_level(logging.INFO, logger="thinwatchd")
    env = Env(tmp_path, scenario, scenario.no_tmpfile)
    try:
        prepare(env)
        caplog.clear()
        checks = Checks(env, caplog)
        start = len(env.fake.calls)
        fault = env.fake.fail(
            case.op, case.err, after=case.after, times=None if scenario.kind == "grow" else 1
        )
        raised: BaseException | None = None
        try:
            scenario.action(env)
        except Exception as exc:
            raised = exc
        _check_replay(env, start, case, recorded, fault)
        RUNNERS[scenario.kind](env, case, checks, raised)
        checks.no_larger_than(recorded.sizes)
    finally:
        env.close()
    if checks.problems:  # the whole story, without pytest re-reading this file for a traceback
        pytest.fail(checks.report(case), pytrace=False)


# -- the event paths -----------------------------------------------------------------------


def _event_env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[Env, Daemon, Checks]:
    """A started daemon whose loop watches the control fd (as run() does), a writer at the
    pool's mark: the fd is readable."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    env = Env(tmp_path, SCENARIOS["grow_data"])
    _setup_grow_data(env)
    d = env.target
    assert d is not None
    d.loop.add_reader(env.fake.fileno(), d.dm_events.check)
    caplog.clear()
    return env, d, Checks(env, caplog)


@pytest.mark.parametrize("err", [E.ENOMEM, E.EINTR], ids=lambda e: E.errorcode[e])
@pytest.mark.parametrize("op", sorted(EVENT_READ))
def test_event_read_failure_is_said_once_and_retried_by_timer(
    op: str, err: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env, d, checks = _event_env(tmp_path, caplog)
    try:
        clock, total = env.clock, pool_md(env).metadata.data_total
        fault = env.fake.fail(op, err, times=None)
        before = _op_count(env, op)
        d.loop.run_once(max_wait=0)  # the fd is readable: dm_events.check, which fails
        checks.state("the failed event read")
        calls = _op_count(env, op)
        if calls != before + 1:
            checks.add("the failed event read", f"{op} made {calls - before} times, not once")
        for _ in range(3):  # the fd stays readable (unarmed / unread): no busy loop on it
            d.loop.run_once(max_wait=0)
        if _op_count(env, op) != calls:
            checks.add("before the retry timer", f"{op} retried at once: a busy loop on the fd")
        for attempt in range(1, 4):
            calls = _op_count(env, op)
            clock.now += 1.0  # the daemon's event retry interval
            d.loop.run_once(max_wait=0)
            settle(d)
            if _op_count(env, op) == calls:
                checks.add(f"retry {attempt}", f"{op} not retried by the timer after 1 s")
        said = [r for r in checks.records() if "dm events" in r.getMessage()]
        if len(said) != 1:
            checks.add(
                "3 s of failed event reads",
                f"said {len(said)} times, not once: {[r.getMessage() for r in said]}",
            )
        checks.state("3 s of failed event reads")
        fault.times = 0
        clock.now += 1.0
        d.loop.run_once(max_wait=0)
        settle(d)
        stage = "the retry after the fault is lifted"
        if pool_md(env).metadata.data_total <= total:
            checks.add(stage, "the event was lost: the pool at its mark did not grow")
        calls = _op_count(env, op)
        env.fake.set_mode("pool", "rw")  # a new dm event: the fd must be watched again
        d.loop.run_once(max_wait=0)
        if _op_count(env, op) == calls:
            checks.add(stage, "the control fd is no longer watched: a new event was not read")
        checks.state(stage)
    finally:
        env.close()
    if checks.problems:
        pytest.fail(
            f"{op} failing with {E.errorcode[err]} in dm_events.check:\n"
            + "\n".join(checks.problems),
            pytrace=False,
        )


class OverflowingMonitor:
    """A udev monitor (fileno/poll) whose netlink socket overflowed: recv fails with ENOBUFS
    once per overflow, which also clears it, as the kernel does."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def overflow(self) -> None:
        os.write(self.w, b"!")

    def poll(self, timeout: float = 0) -> None:
        os.read(self.r, 1)
        raise OSError(E.ENOBUFS, os.strerror(E.ENOBUFS))

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def test_udev_overflow_rechecks_every_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOBUFS on the udev socket: events were lost, so every pool is checked: one at its mark
    grows, one removed behind our back is rebuilt; nothing escapes, it is said once."""
    caplog.set_level(logging.INFO, logger="thinwatchd")
    monitor = OverflowingMonitor()
    env = Env(tmp_path, SCENARIOS["grow_data"])
    try:
        env.write_config(pool=pool_config(tmp_path, "pools"), pool2=pool_config(tmp_path, "pools2"))
        d = Daemon(
            env.config,
            env.kernel,
            notifier=Notifier(),
            loop=EventLoop(env.clock),
            udev_monitor=monitor,
            threads=SYNC,
        )
        env.daemons.append(d)
        d.start()
        settle(d)
        d.loop.add_reader(monitor.fileno(), d._on_udev)  # as run() does
        md = pool_md(env).metadata
        total = md.data_total
        env.fake.write_blocks("pool", total - d.pools["pool"].pool.table.low_water_mark + 2)
        env.fake.write_blocks("pool2", 7)
        env.fake.remove("pool2")
        caplog.clear()
        checks = Checks(env, caplog)
        monitor.overflow()
        d.loop.run_once(max_wait=0)
        settle(d)
        d.loop.run_once(max_wait=0)  # nothing more to read: the socket's error is cleared
        stage = "after the overflow"
        checks.state(stage)
        if pool_md(env).metadata.data_total <= total:
            checks.add(stage, "the pool at its mark was not checked (not grown)")
        pool2 = pool_md(env, "pool2")
        if pool2 is None or pool2.metadata.data_used != 7:
            checks.add(stage, "the pool removed behind our back was not rebuilt over its data")
        said = [r for r in checks.records() if "udev" in r.getMessage()]
        if len(said) != 1:
            checks.add(stage, f"said {len(said)} times: {[r.getMessage() for r in said]}")
    finally:
        env.close()
        monitor.close()
    if checks.problems:
        pytest.fail("udev socket overflow (ENOBUFS):\n" + "\n".join(checks.problems), pytrace=False)
