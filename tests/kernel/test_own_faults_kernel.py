"""Issue 19, item 5, against the real kernel: a running pool's data file is never handed to a
new pool (commit 1e0ea1d).

The kernel refuses a metadata device that a live table holds, but maps one data loop into two
pools, and the new pool's empty metadata would then give away the running pool's blocks. The
real daemon runs pool a with a writer's data on it; a SIGHUP brings a config in which a new
pool b has a's data file (and a metadata file of its own) while a is moved to other paths or
removed (it stays active). b must never exist, the daemon must say why (a's file is live), a's
data must read back, and a must go on growing. Then the same at start-up: a daemon whose only
pool would sit on a live pool's data loop refuses it (activation's own check).

Before 1e0ea1d, the reload checked the new config's files only against each other, and
activation built a pool on whatever loop already backed its data file. One guard was there
already: a data file that holds data (SEEK_DATA finds some) is never given new metadata. So
the test reloads while a's data file is still empty (the pool just built, its thin volume
made, nothing written yet): there the old daemon built b on a's data loop. (With a's data
written first, the old daemon refused b too, for that other reason; that case was dropped for
CI's time, as only the wording told it apart.)
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from testbed.harness import MiB, teardown, write_config
from tests.kernel.harness import (
    HostileEnv,
    await_writer,
    build_pool,
    hostile_env,
    spawn_daemon,
    verify_stamped,
)
from thinwatchd.kernel.loop import LoopControl

pytestmark = pytest.mark.kernel

OUT_OF_SPACE = "switching pool to out-of-data-space"
BLOCK_SECTORS = 128  # 64 KiB data blocks, the default

#: Small pool, fixed mark, small steps: a few growths in 128 MiB.
SMALL_POOL: dict[str, object] = {
    "data_size": "64MiB",
    "metadata_size": "16MiB",
    "low_water_mark": 128,
    "reserve": 0,
    "data": {"adaptive_low_water": False, "step": "32MiB", "step_percent": "0%"},
}
FAST_CHECKS: dict[str, object] = {"check_interval": "1s"}
FIRST, MORE = 32 * MiB, 64 * MiB  # the data written before and after: 96 MiB > 64 MiB
SEED = b"item 5"


def mapped_by(env: HostileEnv, path: Path) -> list[str]:
    """Return the dm devices whose live table maps the loop that backs path."""
    loop = LoopControl().find(str(path))
    assert loop is not None, f"no loop backs {path}"
    token = f"{os.major(loop.dev)}:{os.minor(loop.dev)}"
    names = []
    for device in env.dm.list_devices():
        for target in env.dm.table(device.name):
            if token in target.params.split():
                names.append(device.name)
    return names


def first_word_on(env: HostileEnv, b: str, timeout: float) -> str:
    """Return the first daemon log line about b (its refusal, its failure or its creation),
    checking all along that b never exists."""
    rx = re.compile(rf"{re.escape(b)}\b")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert env.dm.info(b) is None, f"pool {b} was built on a's data file\n{env.diagnostics()}"
        found = [line for line in env.logs().splitlines() if rx.search(line)]
        if found:
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"nothing said about {b} after {timeout:.0f} s\n{env.diagnostics()}")


@pytest.mark.parametrize("when", ["empty_at_reload"])
@pytest.mark.parametrize("how", ["moved", "removed"])
def test_a_reload_never_gives_a_running_pools_data_file_to_a_new_pool(how: str, when: str) -> None:
    with hostile_env("twown") as env:
        a, b = env.pool, f"{env.pool}-b"
        b_meta = env.directory / "b.meta"
        moved = {"data_file": str(env.directory / "a2.data")}
        moved["metadata_file"] = str(env.directory / "a2.meta")
        try:
            daemon = env.daemon(env.config(FAST_CHECKS, **SMALL_POOL))
            thin = env.thin(size=512 * MiB)
            if when == "data_written_before":
                await_writer(env, env.writer(thin, FIRST, SEED), deadline=120)
            # else: not one byte yet, a's data file is all preallocated (no data to SEEK_DATA)
            length_before = env.table_length()

            pools: dict[str, dict[str, object]] = {
                b: {"data_file": str(env.data), "metadata_file": str(b_meta), **SMALL_POOL}
            }
            if how == "moved":
                pools[a] = {**moved, **SMALL_POOL}
            write_config(env.directory / "config.yaml", pools, **FAST_CHECKS)
            daemon.send(signal.SIGHUP)
            said = first_word_on(env, b, timeout=90)
            print(f"{how}/{when}: the daemon said: {said}")
            # The refusal names a's live file, not some other reason (before 1e0ea1d: "holds
            # data but metadata file ... is missing", when a's data was written).
            assert re.search(
                rf"new pools not built: .*same file as pools\.{re.escape(a)}\.data_file"
                rf"|mapped by the live device {re.escape(a)}\b",
                said,
            ), f"{said}\n{env.logs()}"
            settle = time.monotonic() + 4  # four safety checks (and retries) later, still none
            while time.monotonic() < settle:
                assert env.dm.info(b) is None, f"pool {b} built late\n{env.diagnostics()}"
                time.sleep(0.2)
            assert mapped_by(env, env.data) == [a], mapped_by(env, env.data)
            print(f"{how}/{when}: b's metadata file made: {b_meta.exists()}")

            if when == "empty_at_reload":
                await_writer(env, env.writer(thin, FIRST, SEED), deadline=120)
            assert not verify_stamped(thin, FIRST, SEED), "a's data differs after the reload"

            # a still works: 64 MiB more, past its 64 MiB, through growths by the same daemon
            more = env.writer(thin, MORE, SEED, offset=FIRST)
            await_writer(env, more, deadline=240)
            time.sleep(2)  # a safety check after the fill
            assert env.table_length() > length_before, (
                f"a never grew ({env.table_length()} sectors)\n{env.diagnostics()}"
            )
            bad = verify_stamped(thin, FIRST + MORE, SEED)
            assert not bad, f"{len(bad)} MiB differ, first at {bad[:8]}\n{env.diagnostics()}"
            kernel = env.klog.text()
            assert OUT_OF_SPACE not in kernel, kernel
            assert env.dm.info(b) is None
            assert daemon.proc is not None and daemon.proc.poll() is None, env.logs()
            logs = env.logs()
            assert "Traceback" not in logs and "internal error" not in logs, logs
            print(f"{how}/{when}: a grew from {length_before} to {env.table_length()} sectors")
        finally:
            env.kill_daemons()
            extra = [b_meta, Path(moved["data_file"]), Path(moved["metadata_file"])]
            teardown(env.dm, [b], extra)  # b (if the old code built it) before a


def test_start_refuses_a_pool_on_a_data_loop_a_live_pool_maps() -> None:
    """Activation's own check (_refuse_loops_in_use), without the reload's: a daemon whose
    config names only b, on the data file of a pool a that is up (built by hand, no data
    written), refuses to build b and says which live device maps the file."""
    with hostile_env("twown") as env:
        a, b = env.pool, f"{env.pool}-b"
        b_meta = env.directory / "b.meta"
        try:
            build_pool(env, 64 * MiB, 16 * MiB)  # a, up, its data file still a hole
            (table,) = env.dm.table(a)
            pools: dict[str, dict[str, object]] = {
                b: {"data_file": str(env.data), "metadata_file": str(b_meta), **SMALL_POOL}
            }
            config = write_config(env.directory / "config.yaml", pools, **FAST_CHECKS)
            daemon = spawn_daemon(env, config)
            assert daemon.proc is not None
            deadline = time.monotonic() + 120
            while daemon.proc.poll() is None and not daemon.ready():
                assert env.dm.info(b) is None, f"{b} built on {a}'s data loop\n{env.logs()}"
                assert time.monotonic() < deadline, f"neither ready nor gone\n{env.logs()}"
                time.sleep(0.2)
            assert env.dm.info(b) is None, f"{b} built on {a}'s data loop\n{env.logs()}"
            code = daemon.proc.wait(30) if not daemon.ready() else None
            log = daemon.log()
            print(f"exit {code}; log:\n{log}")
            assert code not in (None, 0), f"the daemon came up with {b} refused?\n{log}"
            assert re.search(rf"mapped by the live device {re.escape(a)}\b", log), log
            assert env.dm.table(a) == [table], "a's table changed"
            assert mapped_by(env, env.data) == [a]
            left = LoopControl().find(str(b_meta)) if b_meta.exists() else None
            print(f"b's metadata file left behind: {b_meta.exists()}; its loop: {left}")
        finally:
            env.kill_daemons()
            teardown(env.dm, [b], [b_meta])
