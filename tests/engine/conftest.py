"""Fixtures for engine tests: the daemon's logic against FakeKernel, with real files in tmp_path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.engine.fake_kernel import FakeKernel
from thinwatchd.base.units import Bytes, DataBlocks
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import DeviceMapperApi, Kernel
from thinwatchd.kernel.fs import Files
from thinwatchd.kernel.names import pool_name

MiB = 1024**2


class FakeNodes:
    """DeviceNodes for the fake: resume, and count how often we waited for udev."""

    def __init__(self) -> None:
        self.synced: list[str] = []

    def resume_synced(self, dm: DeviceMapperApi, name: str) -> None:
        dm.resume(name)
        self.synced.append(name)

    def resume_nowait(self, dm: DeviceMapperApi, name: str) -> None:
        dm.resume(name)


class InlineWorkers:
    """Stands in for the daemon's reconcile Workers: each job runs at once on the caller's
    thread and its result reaches done before submit returns, so a test sees a pass's growths
    done when the pass returns. The daemon's threads, side by side, are test_concurrency.py's."""

    def __init__(self, loop: object = None) -> None:
        self._running: set[str] = set()

    def busy(self, key: str) -> bool:
        return key in self._running

    def keys(self) -> list[str]:
        return list(self._running)

    def hurry(self, key: str) -> bool:
        return False  # nothing ever waits for a thread here

    def submit(
        self, key: str, job: Callable[[], Any], done: Callable[..., None], background: bool = False
    ) -> bool:
        if key in self._running:
            return False
        self._running.add(key)
        result: Any = None
        error: BaseException | None = None
        try:
            result = job()
        except BaseException as exc:  # delivered to done, as Workers does
            error = exc
        finally:
            self._running.discard(key)
        done(result, error)
        return True

    def run_until_idle(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Activations run in one worker thread, one at a time; reconciles and the jobs on pool
    files (the space watch, loop checks, a reload's file check, published files) inline."""
    monkeypatch.setattr("thinwatchd.base.workers.MAX_THREADS", 1)
    monkeypatch.setattr("thinwatchd.growth.schedule.reconcile_workers", InlineWorkers)
    monkeypatch.setattr("thinwatchd.daemon.daemon.file_workers", InlineWorkers)


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
