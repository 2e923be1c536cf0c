"""File operations on the backing files: creation, growth, refusals, accounting."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel import fs
from thinwatchd.kernel.syscalls import Syscalls

MiB = 1 << 20
FILES = fs.Files()


def allocated(path: Path) -> int:
    return path.lstat().st_blocks * 512


def test_create_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "data"
    FILES.create(str(path), Bytes(64 * MiB), preallocate=False)
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 64 * MiB
    assert allocated(path) < MiB  # sparse
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary left behind


def test_create_preallocated_file(tmp_path: Path) -> None:
    path = tmp_path / "meta"
    FILES.create(str(path), Bytes(4 * MiB), preallocate=True)
    assert path.stat().st_size == 4 * MiB
    assert allocated(path) >= 4 * MiB
    assert path.read_bytes()[:4096] == bytes(4096)


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling", "fifo", "dir"])
def test_create_never_touches_an_existing_name(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data"
    target = tmp_path / "elsewhere"
    if kind == "file":
        path.write_bytes(b"keep me")
    elif kind == "symlink":
        target.write_bytes(b"keep me")
        path.symlink_to(target)
    elif kind == "dangling":
        path.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(KernelError) as info:
        FILES.create(str(path), Bytes(MiB), preallocate=False)
    assert info.value.errno == errno.EEXIST and str(path) in str(info.value)
    assert not target.exists() or target.read_bytes() == b"keep me"
    if kind == "file":
        assert path.read_bytes() == b"keep me"


def test_grow_sparse_and_never_shrink(tmp_path: Path) -> None:
    path = tmp_path / "data"
    FILES.create(str(path), Bytes(8 * MiB), preallocate=False)
    assert FILES.grow(str(path), Bytes(16 * MiB), preallocate=False) == 8 * MiB
    assert path.stat().st_size == 16 * MiB
    assert FILES.grow(str(path), Bytes(16 * MiB), preallocate=False) == 16 * MiB  # no-op
    with pytest.raises(KernelError) as info:
        FILES.grow(str(path), Bytes(8 * MiB), preallocate=False)
    assert info.value.errno == errno.EINVAL and "shrink" in str(info.value)
    assert path.stat().st_size == 16 * MiB


def test_grow_preallocated_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * MiB)
    FILES.grow(str(path), Bytes(4 * MiB), preallocate=True)
    assert path.stat().st_size == 4 * MiB
    assert allocated(path) >= 4 * MiB
    with path.open("rb") as f:
        assert f.read(MiB) == b"x" * MiB and f.read() == bytes(3 * MiB)


class NoSpaceToAllocate(Syscalls):
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        super().fallocate(fd, mode, offset, length)  # really allocate beyond EOF, then fail
        raise OSError(errno.ENOSPC, "No space left on device")


def test_grow_that_cannot_allocate_leaves_the_size(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"y" * MiB)
    with pytest.raises(KernelError) as info:
        fs.Files(NoSpaceToAllocate()).grow(str(path), Bytes(8 * MiB), preallocate=True)
    assert info.value.errno == errno.ENOSPC
    assert path.stat().st_size == MiB and path.read_bytes() == b"y" * MiB
    assert allocated(path) < 2 * MiB  # the stray allocation beyond EOF was given back


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_grow_and_open_refuse_non_regular_files(tmp_path: Path, kind: str) -> None:
    real = tmp_path / "real"
    real.write_bytes(bytes(4096))
    path = tmp_path / "data"
    if kind == "symlink":
        path.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    expected = errno.ELOOP if kind == "symlink" else errno.EINVAL
    with pytest.raises(KernelError) as info:
        FILES.grow(str(path), Bytes(2 * MiB), preallocate=False)
    assert info.value.errno == expected
    with pytest.raises(KernelError) as info:
        FILES.open_regular(str(path))
    assert info.value.errno == expected
    assert real.stat().st_size == 4096


def test_open_existing_regular(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"abc")
    fd = FILES.open_regular(str(path), os.O_RDONLY)
    try:
        assert os.read(fd, 3) == b"abc"
        assert os.get_inheritable(fd) is False
    finally:
        os.close(fd)
    with pytest.raises(KernelError) as info:
        FILES.open_regular(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT


def test_header_is_zero_and_holds_data(tmp_path: Path) -> None:
    path = tmp_path / "data"
    FILES.create(str(path), Bytes(4 * MiB), preallocate=True)
    assert FILES.header_is_zero(str(path))
    assert not FILES.holds_data(str(path))  # preallocated, never written: no data
    with path.open("r+b") as f:
        f.seek(3 * MiB)
        f.write(b"x")
    assert FILES.header_is_zero(str(path)) and FILES.holds_data(str(path))
    with path.open("r+b") as f:
        f.write(b"superblock")
    assert not FILES.header_is_zero(str(path))


def test_make_dirs_creates_private_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    assert FILES.make_dirs(str(target)) == [
        str(tmp_path / "a"),
        str(tmp_path / "a" / "b"),
        str(target),
    ]
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) & 0o077 == 0
    assert FILES.make_dirs(str(target)) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(KernelError) as info:
        FILES.make_dirs(str(tmp_path / "file" / "x"))
    assert info.value.errno == errno.ENOTDIR


def test_inspect(tmp_path: Path) -> None:
    path = tmp_path / "data"
    assert FILES.inspect(str(path)) is None
    path.write_bytes(b"abc")
    info = FILES.inspect(str(path))
    assert info is not None and info.is_regular and info.size == 3
    st = path.lstat()
    assert info.identity == (st.st_dev, st.st_ino) and info.uid == st.st_uid


def test_filesystem_space(tmp_path: Path) -> None:
    space = FILES.space(str(tmp_path))
    st = os.statvfs(tmp_path)
    assert space.total == st.f_blocks * st.f_frsize
    assert 0 <= space.free <= space.total
    with pytest.raises(KernelError):
        FILES.space(str(tmp_path / "missing"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_make_node_replaces_a_wrong_node(tmp_path: Path) -> None:
    path = tmp_path / "mapper" / "pool"
    assert fs.make_node(str(path), os.makedev(253, 4), block=True) is True
    assert fs.make_node(str(path), os.makedev(253, 4), block=True) is False
    assert fs.make_node(str(path), os.makedev(253, 5), block=True) is True
    st = path.lstat()
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(253, 5)
    assert os.listdir(path.parent) == ["pool"]
