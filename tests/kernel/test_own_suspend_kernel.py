"""Issue 19, item 1, against the real kernel: a growth whose resume the kernel refuses, and
whose rollback it refuses too, leaves the pool suspended; the daemon says so truthfully and
keeps trying, and resumes it as soon as the kernel accepts.

The kernel refuses every resume of a thin-pool whose metadata device is smaller than its
superblock records (pool_preresume, maybe_resize_metadata_dev: "metadata device (N blocks) too
small: expected M", -EINVAL), and dm then leaves the device suspended. The test makes that so
without touching a byte: it lowers the metadata loop's lo_sizelimit by 1 MiB (LOOP_SET_STATUS64;
a fresh pool's metadata lives in its first blocks). The pool runs on; its next growth's resume
is refused, and so is every table the rollback tries. The daemon must say the pool is
SUSPENDED (not "resumed on its previous size"), stay up, and, once the sizelimit is lifted,
resume the pool within its backoff: the writer, stalled meanwhile, finishes with no error, its
data reads back, and the pool keeps its new size. A restart in between must not change that:
the next instance reads whose suspend it is from the record its predecessor kept.

Before 5a2d297 (PoolState.own_suspend), every later check took the pool for one an operator had
suspended ("dmsetup suspend?") and never resumed it: the writer hung until `dmsetup resume`.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from testbed.harness import MiB
from tests.kernel.harness import await_writer, hostile_env, kernel_lines, verify_stamped
from thinwatchd.kernel import loop_abi
from thinwatchd.kernel.loop import LoopControl

pytestmark = pytest.mark.kernel

OUT_OF_SPACE = "switching pool to out-of-data-space"
BLKFLSBUF = 0x1261
SIZELIMIT_AT = 32  # lo_sizelimit's offset in struct loop_info64
#: Small pool, fixed mark, one growth in the fill: the mark is crossed at 56 MiB of 64.
SMALL_POOL: dict[str, object] = {
    "data_size": "64MiB",
    "metadata_size": "16MiB",
    "low_water_mark": 128,
    "reserve": 0,
    "data": {"adaptive_low_water": False, "step": "64MiB", "step_percent": "0%"},
}
FAST_CHECKS: dict[str, object] = {"check_interval": "1s"}
FILL = 96 * MiB
SEED = b"item 1"
#: How long the kernel keeps refusing: long enough for several of the daemon's retries.
REFUSED_FOR = 8.0
#: The backoff tops out at 30 s; after REFUSED_FOR s of retries the next is at most ~8 s away.
RESUMED_WITHIN = 40.0


def set_sizelimit(path: Path, limit: int) -> None:
    """Set the lo_sizelimit of the loop that backs path (0: the whole file)."""
    loop = LoopControl().find(str(path))
    assert loop is not None, f"no loop backs {path}"
    fd = os.open(f"/dev/loop{loop.index}", os.O_RDONLY)
    try:
        # LOOP_SET_STATUS64 refuses a size change (EAGAIN) while the loop's page cache holds pages.
        fcntl.ioctl(fd, BLKFLSBUF, 0)
        info = bytearray(loop_abi.LOOP_INFO64.size)
        fcntl.ioctl(fd, loop_abi.LOOP_GET_STATUS64, info, True)
        info[SIZELIMIT_AT : SIZELIMIT_AT + 8] = limit.to_bytes(8, "little")
        fcntl.ioctl(fd, loop_abi.LOOP_SET_STATUS64, info)
    finally:
        os.close(fd)


def test_a_pool_left_suspended_by_its_own_growth_is_resumed_once_the_kernel_accepts() -> None:
    with hostile_env("twsusp") as env:
        config = env.config(FAST_CHECKS, **SMALL_POOL)
        daemon = env.daemon(config)
        thin = env.thin(size=512 * MiB)
        length_before = env.table_length()
        meta_size = env.metadata.stat().st_size
        set_sizelimit(env.metadata, meta_size - MiB)

        writer = env.writer(thin, FILL, SEED)
        deadline = time.monotonic() + 120
        while (
            not (info := env.dm.info(env.pool))
            or not info.suspended
            or "SUSPENDED" not in (env.logs())
        ):
            assert writer.poll() is None, f"the writer ended early\n{env.diagnostics()}"
            assert time.monotonic() < deadline, f"never left suspended\n{env.diagnostics()}"
            time.sleep(0.2)
        refused = kernel_lines(env.klog, r"metadata device .* too small")
        assert refused, f"the kernel did not refuse the resume\n{env.diagnostics()}"
        print(f"the kernel refused: {refused[0]}")

        time.sleep(REFUSED_FOR)  # the daemon retries; the kernel keeps refusing
        info = env.dm.info(env.pool)
        assert info is not None and info.suspended
        assert daemon.proc is not None and daemon.proc.poll() is None, env.logs()
        logs = env.logs()
        assert "is resumed on its previous size" not in logs, logs
        said = [line for line in logs.splitlines() if "SUSPENDED" in line]
        assert len(said) == 1, f"said {len(said)} times, not once:\n{logs}"
        print(f"the daemon said: {said[0]}")

        # A restart while the kernel still refuses (an upgrade, a crash): the next instance
        # must know the suspend is its own (the record in /run/thinwatchd), not an operator's.
        assert daemon.stop() == 0, env.logs()
        daemon = env.daemon(config)
        time.sleep(REFUSED_FOR / 2)
        info = env.dm.info(env.pool)
        assert info is not None and info.suspended
        restarted = daemon.log()
        assert "suspended by someone else" not in restarted, restarted
        assert "cannot resume it yet" in restarted, restarted
        stalled = writer.written

        set_sizelimit(env.metadata, 0)  # the kernel would accept now
        lifted = time.monotonic()
        while (info := env.dm.info(env.pool)) is not None and info.suspended:
            assert time.monotonic() - lifted < RESUMED_WITHIN, (
                f"still suspended {RESUMED_WITHIN:.0f} s after the kernel would accept "
                f"(the writer hangs)\n{env.diagnostics()}"
            )
            time.sleep(0.2)
        print(f"resumed {time.monotonic() - lifted:.1f} s after the kernel would accept")

        await_writer(env, writer, deadline=180)
        print(f"the writer had {stalled} MiB written while the pool was suspended, then all")
        bad = verify_stamped(thin, FILL, SEED)
        assert not bad, f"{len(bad)} MiB differ, first at {bad[:8]}\n{env.diagnostics()}"
        assert env.table_length() > length_before, env.diagnostics()
        kernel = env.klog.text()
        assert OUT_OF_SPACE not in kernel, kernel
        harm = kernel_lines(env.klog, r"I/O error|critical|read-only|switching pool to fail")
        assert not harm, kernel
        logs = env.logs()
        assert "resumed at last" in logs, logs
        assert "dmsetup suspend?" not in logs, logs
        assert "Traceback" not in logs and "internal error" not in logs, logs
        assert daemon.proc is not None and daemon.proc.poll() is None, logs
