"""Fixtures for engine tests: the daemon's logic against FakeKernel, with real files in tmp_path."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.fake_kernel import FakeKernel, FakeNodes
from thinwatchd.base.units import Bytes, DataBlocks
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.kernel.names import pool_name

MiB = 1024**2


@pytest.fixture(autouse=True)
def one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations run in one worker thread, one at a time."""
    monkeypatch.setattr("thinwatchd.base.workers.MAX_THREADS", 1)


@pytest.fixture(autouse=True)
def give_back_pool_files(tmp_path: Path) -> Iterator[None]:
    """The pool files here are real and, as by default, allocated: a test's growths take real
    disk. pytest keeps every test's tmp_path until the session ends, so each test's files go
    as soon as it is done (hundreds of tests each growing a pool by 1 GiB would fill a disk)."""
    yield
    for path in tmp_path.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_blocks > 2048:
                path.unlink()


@pytest.fixture
def fake() -> Iterator[FakeKernel]:
    kernel = FakeKernel()
    yield kernel
    kernel.close()


@pytest.fixture
def kernel(fake: FakeKernel) -> Kernel:
    return Kernel(fake, fake, FakeNodes(), Files(fake.syscalls))


@pytest.fixture
def pool_settings(tmp_path: Path) -> PoolSettings:
    """A small pool: 64 MiB data, 8 MiB metadata, 64 KiB blocks, mark 16 blocks (1 MiB)."""
    return PoolSettings(
        name=pool_name("pool"),
        data_file=tmp_path / "data",
        metadata_file=tmp_path / "metadata",
        data_size=Bytes(64 * MiB),
        metadata_size=Bytes(8 * MiB),
        low_water_mark=DataBlocks(16),
        reserve=Bytes(0),
    )


def small(settings: PoolSettings, **changes: object) -> PoolSettings:
    return replace(settings, **changes)  # type: ignore[arg-type]
