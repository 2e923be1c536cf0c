"""Pool activation against the fake kernel: create, adopt, recreate, refuse, recover."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.fake_kernel import FakeKernel
from thinwatchd.base.errors import KernelError, PoolMismatchError, PoolSetupError
from thinwatchd.base.units import Bytes, Sectors, bytes_to_sectors
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import Kernel
from thinwatchd.pool.bring_up import activate
from thinwatchd.pool.running import Activation
from thinwatchd.thin.status import ThinPoolWorkingStatus

MiB = 1024**2


def test_fresh_start_creates_files_loops_and_pool(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    assert pool.activation is Activation.CREATED
    assert os.stat(pool_settings.data_file).st_size == 64 * MiB
    assert os.stat(pool_settings.metadata_file).st_size == 8 * MiB
    (target,) = fake.table("pool")
    assert target.length == 64 * MiB // 512
    # mark: the free blocks at the 80 % threshold (204 of 1024) beat the configured 16
    assert (
        target.params
        == f"7:{pool.meta_loop.index} 7:{pool.data_loop.index} 128 204 1 skip_block_zeroing"
    )
    status = pool.read_status(fake)
    assert isinstance(status, ThinPoolWorkingStatus)
    assert status.data_total == 64 * MiB // (128 * 512)
    assert kernel.nodes.synced == ["pool"]  # type: ignore[attr-defined]


def test_restart_adopts_without_touching_the_table(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    first = activate(pool_settings, kernel)
    fake.write_blocks("pool", 100)
    fake.calls.clear()
    again = activate(pool_settings, kernel)
    assert again.activation is Activation.ADOPTED
    assert again.data_loop == first.data_loop
    assert not [
        c for c in fake.calls if c.startswith(("DM_TABLE_LOAD", "DM_DEV_CREATE", "LOOP_CONFIGURE"))
    ]
    status = again.read_status(fake)
    assert isinstance(status, ThinPoolWorkingStatus) and status.data_used == 100


def test_reboot_recreates_over_existing_metadata(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    activate(pool_settings, kernel)
    fake.write_blocks("pool", 100)
    # "reboot": devices and loops vanish, files and metadata stay
    fake.devices.clear()
    fake.loops.clear()
    checked: list[str] = []
    pool = activate(pool_settings, kernel, lambda path: checked.append(path))
    assert pool.activation is Activation.RECREATED
    assert checked == [pool.meta_loop.path]  # thin_check before activating used metadata
    status = pool.read_status(fake)
    assert isinstance(status, ThinPoolWorkingStatus) and status.data_used == 100


def test_damaged_metadata_is_not_activated(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    activate(pool_settings, kernel)
    fake.devices.clear()
    with pytest.raises(PoolSetupError, match="thin_repair"):
        activate(pool_settings, kernel, lambda path: "bad superblock")
    assert "pool" not in fake.devices


def test_data_without_metadata_is_refused(kernel: Kernel, pool_settings: PoolSettings) -> None:
    with open(pool_settings.data_file, "wb") as f:
        f.write(b"precious")
    with pytest.raises(PoolSetupError, match="refusing to format new metadata"):
        activate(pool_settings, kernel)
    assert not pool_settings.metadata_file.exists()


def test_used_metadata_without_data_is_refused(kernel: Kernel, pool_settings: PoolSettings) -> None:
    with open(pool_settings.metadata_file, "wb") as f:
        f.write(b"superblock" + bytes(4096))
    with pytest.raises(PoolSetupError, match=r"data file .* is missing"):
        activate(pool_settings, kernel)
    assert not pool_settings.data_file.exists()


def test_interrupted_creation_resumes(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    # crash after the metadata file was made, before the data file
    with open(pool_settings.metadata_file, "wb") as f:
        f.truncate(1 * MiB)
    pool = activate(pool_settings, kernel)
    assert pool.activation is Activation.CREATED
    assert os.stat(pool_settings.metadata_file).st_size == 8 * MiB


def test_symlinked_data_file_is_refused(
    tmp_path: Path, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, pool_settings.data_file)
    with pytest.raises(PoolSetupError, match=r"data_file: .* is a symlink"):
        activate(pool_settings, kernel)


def test_adopt_refuses_a_pool_on_other_files(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings, tmp_path: Path
) -> None:
    activate(pool_settings, kernel)
    other = replace(pool_settings, data_file=tmp_path / "d2", metadata_file=tmp_path / "m2")
    before = fake.table("pool")
    with pytest.raises(PoolMismatchError, match="left untouched"):
        activate(other, kernel)
    assert fake.table("pool") == before
    assert not (tmp_path / "d2").exists()


def test_adopt_refuses_another_block_size(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    activate(pool_settings, kernel)
    with pytest.raises(PoolMismatchError, match="data_block_size"):
        activate(replace(pool_settings, data_block_size=Sectors(256)), kernel)


def test_crash_after_file_growth_is_finished_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    os.truncate(pool_settings.data_file, 128 * MiB)  # step 1 done, then the daemon died
    again = activate(pool_settings, kernel)
    assert fake.size(again.data_loop) == 128 * MiB
    assert again.length == 128 * MiB // 512
    status = again.read_status(fake)
    assert isinstance(status, ThinPoolWorkingStatus) and status.data_total == 2048
    assert again.recovered and pool.length == 64 * MiB // 512


def test_crash_after_set_capacity_is_finished_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    os.truncate(pool_settings.data_file, 128 * MiB)
    fake.set_capacity(pool.data_loop)  # step 2 done too
    again = activate(pool_settings, kernel)
    assert again.length == 128 * MiB // 512


def test_crash_after_table_load_is_finished_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    os.truncate(pool_settings.data_file, 128 * MiB)
    fake.set_capacity(pool.data_loop)
    # step 3: inactive table left behind
    fake.load_table("pool", [pool.target(bytes_to_sectors(Bytes(128 * MiB)))])
    again = activate(pool_settings, kernel)
    info = fake.info("pool")
    assert info is not None and not info.inactive_present and not info.suspended
    assert again.length == 128 * MiB // 512


def test_a_pool_our_last_instance_left_suspended_is_resumed_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    activate(pool_settings, kernel)
    fake.suspend("pool")
    pool = activate(pool_settings, kernel, own_suspend=True)
    info = fake.info("pool")
    assert info is not None and not info.suspended
    assert not pool.left_suspended


def test_a_pool_someone_else_suspended_is_left_suspended_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    """dmsetup suspend, then a restart: the kernel shows what our own refused resume would
    show, and the record says it is not ours. Left as it is, and said."""
    activate(pool_settings, kernel)
    fake.suspend("pool")
    pool = activate(pool_settings, kernel)
    info = fake.info("pool")
    assert info is not None and info.suspended
    assert not pool.left_suspended  # not ours to resume
    assert not pool.recovered, pool.recovered  # nothing done to it


def test_a_pool_stuck_on_someone_elses_refused_resume_is_resumed_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    """An active table shorter than the pool (a resume the kernel refused) is nobody's to
    keep: no resume of it can ever succeed, so it is resumed on the pool's size."""
    pool = activate(pool_settings, kernel)
    recorded = pool.length
    fake.load_table("pool", [pool.target(Sectors(recorded // 2))])  # a stale length
    with pytest.raises(KernelError):
        fake.resume("pool")  # pool_preresume: "pool target too small"
    info = fake.info("pool")
    assert info is not None and info.suspended and not info.inactive_present
    again = activate(pool_settings, kernel)
    info = fake.info("pool")
    assert info is not None and not info.suspended
    assert again.length >= recorded


def test_failed_creation_removes_the_device(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    fake.fail_next["DM_TABLE_LOAD"] = 22
    with pytest.raises(KernelError, match="DM_TABLE_LOAD on pool"):
        activate(pool_settings, kernel)
    assert "pool" not in fake.devices


def test_crash_during_metadata_growth_is_finished_at_start(
    fake: FakeKernel, kernel: Kernel, pool_settings: PoolSettings
) -> None:
    pool = activate(pool_settings, kernel)
    os.truncate(pool_settings.metadata_file, 16 * MiB)  # metadata file grown, then the crash
    again = activate(pool_settings, kernel)
    status = again.read_status(fake)
    assert isinstance(status, ThinPoolWorkingStatus) and status.meta_total == 16 * MiB // 4096
    assert any("metadata device re-read" in note for note in again.recovered)
    assert again.length == pool.length


def test_data_next_to_unused_metadata_is_refused(
    kernel: Kernel, pool_settings: PoolSettings
) -> None:
    # e.g. metadata_file mistyped to point at an empty file: the kernel would format it
    pool_settings.metadata_file.write_bytes(bytes(8 * MiB))
    with open(pool_settings.data_file, "wb") as f:
        f.write(b"precious")
    with pytest.raises(PoolSetupError, match="never been used"):
        activate(pool_settings, kernel)
    assert pool_settings.data_file.read_bytes() == b"precious"
