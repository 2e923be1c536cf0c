"""Loop ABI: loop_info64/loop_config against hand-computed layouts; attach logic with a fake."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from thinwatchd.base.errors import KernelError
from thinwatchd.kernel import loop_abi
from thinwatchd.kernel.loop import (
    LoopControl,
    LoopInfo,
    pack_loop_config,
    pack_loop_info,
    unpack_loop_info,
)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


INFO_BYTES = (
    u64(0xFE01)  # lo_device @0: st_dev 254:1
    + u64(12)  # lo_inode @8
    + u64(0)  # lo_rdevice @16
    + u64(4096)  # lo_offset @24
    + u64(0)  # lo_sizelimit @32
    + u32(3)  # lo_number @40
    + u32(0)  # lo_encrypt_type @44
    + u32(0)  # lo_encrypt_key_size @48
    + u32(16)  # lo_flags @52: DIRECT_IO
    # lo_file_name[64] @56
    + b"/scratch/data"
    + bytes(64 - 13)
    + bytes(64)  # lo_crypt_name @120
    + bytes(32)  # lo_encrypt_key @184
    # lo_init[2] @216
    + u64(0)
    + u64(0)
)
INFO = LoopInfo(0xFE01, 12, 4096, 0, 3, 16, "/scratch/data")


def test_numbers() -> None:
    assert loop_abi.LOOP_INFO64.size == 232
    assert loop_abi.LOOP_CONFIG.size == 304
    assert (loop_abi.LOOP_SET_FD, loop_abi.LOOP_CLR_FD) == (0x4C00, 0x4C01)
    assert (loop_abi.LOOP_SET_STATUS64, loop_abi.LOOP_GET_STATUS64) == (0x4C04, 0x4C05)
    assert (loop_abi.LOOP_SET_CAPACITY, loop_abi.LOOP_SET_DIRECT_IO) == (0x4C07, 0x4C08)
    assert (loop_abi.LOOP_CONFIGURE, loop_abi.LOOP_CTL_GET_FREE) == (0x4C0A, 0x4C82)
    # BLKGETSIZE64 = _IOR(0x12, 114, size_t): dir READ (2) << 30 | 8 << 16 | 0x12 << 8 | 114
    assert loop_abi.BLKGETSIZE64 == (2 << 30) | (8 << 16) | (0x12 << 8) | 114
    assert [int(f) for f in loop_abi.LoopFlag] == [1, 4, 8, 16]


def test_loop_info64_layout_by_hand() -> None:
    assert len(INFO_BYTES) == 232
    assert pack_loop_info(INFO) == INFO_BYTES
    assert unpack_loop_info(INFO_BYTES) == INFO


def test_loop_info64_file_name_is_truncated_with_a_nul() -> None:
    packed = pack_loop_info(LoopInfo(file_name="/" + "x" * 100))
    assert packed[56:119] == b"/" + b"x" * 62 and packed[119] == 0


def test_loop_config_layout_by_hand() -> None:
    packed = pack_loop_config(5, INFO)
    assert len(packed) == 304
    assert packed[0:4] == u32(5)  # fd
    assert packed[4:8] == u32(0)  # block_size: kernel default
    assert packed[8:240] == INFO_BYTES
    assert packed[240:] == bytes(64)  # __reserved[8]


class FakeLoops:
    """Loop ioctls against plain files standing in for the device nodes."""

    def __init__(self, tmp: Path, busy: int = 0, configure_errno: int = 0) -> None:
        self.dev = tmp / "dev"
        self.sys = tmp / "sys"
        self.dev.mkdir()
        self.sys.mkdir()
        (self.dev / "loop-control").write_bytes(b"")
        self.busy = busy
        self.configure_errno = configure_errno
        self.next_free = 0
        self.calls: list[int] = []
        self.configs: list[bytes] = []
        self.bound: dict[str, tuple[int, int]] = {}

    def __call__(self, fd: int, request: int, arg: int | bytearray) -> int:
        self.calls.append(request)
        node = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1]
        if request == loop_abi.LOOP_CTL_GET_FREE:
            index = self.next_free
            self.next_free += 1
            (self.dev / f"loop{index}").write_bytes(b"")
            return index
        if request == loop_abi.LOOP_CONFIGURE:
            assert isinstance(arg, bytearray)
            self.configs.append(bytes(arg))
            if self.configure_errno:
                raise OSError(self.configure_errno, "no LOOP_CONFIGURE")
            if self.busy:
                self.busy -= 1
                raise OSError(errno.EBUSY, "Device or resource busy")
            st = os.fstat(int.from_bytes(arg[0:4], "little"))
            self.bound[node] = (st.st_dev, st.st_ino)
            return 0
        if request == loop_abi.LOOP_SET_FD:
            assert isinstance(arg, int)
            st = os.fstat(arg)
            self.bound[node] = (st.st_dev, st.st_ino)
            return 0
        if request == loop_abi.LOOP_GET_STATUS64:
            assert isinstance(arg, bytearray)
            if node not in self.bound:
                raise OSError(errno.ENXIO, "not bound")
            dev, ino = self.bound[node]
            arg[:] = pack_loop_info(LoopInfo(dev, ino))
            return 0
        if request == loop_abi.LOOP_CLR_FD:
            del self.bound[node]
        return 0


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.write_bytes(bytes(4096))
    return path


def test_attach_retries_when_another_attacher_wins(tmp_path: Path, backing: Path) -> None:
    fake = FakeLoops(tmp_path, busy=2)
    lc = LoopControl(dev_dir=str(fake.dev), sys_block=str(fake.sys), ioctl=fake)
    loop = lc.attach(str(backing))
    assert loop.index == 2
    st = backing.stat()
    assert (loop.backing_dev, loop.backing_inode) == (st.st_dev, st.st_ino)
    assert fake.calls.count(loop_abi.LOOP_CTL_GET_FREE) == 3
    flags = unpack_loop_info(fake.configs[-1][8:240]).flags
    assert not flags & loop_abi.LoopFlag.AUTOCLEAR  # the pool must outlive the daemon
    assert unpack_loop_info(fake.configs[-1][8:240]).file_name == str(backing)[:63]


@pytest.mark.parametrize("code", [errno.ENOTTY, errno.EINVAL])
def test_attach_falls_back_without_loop_configure(tmp_path: Path, backing: Path, code: int) -> None:
    fake = FakeLoops(tmp_path, configure_errno=code)
    lc = LoopControl(dev_dir=str(fake.dev), sys_block=str(fake.sys), ioctl=fake)
    lc.attach(str(backing), direct_io=True)
    assert fake.calls[-4:] == [
        loop_abi.LOOP_CONFIGURE,
        loop_abi.LOOP_SET_FD,
        loop_abi.LOOP_SET_STATUS64,
        loop_abi.LOOP_SET_DIRECT_IO,
    ]


def test_attach_refuses_a_symlink(tmp_path: Path, backing: Path) -> None:
    fake = FakeLoops(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(backing)
    lc = LoopControl(dev_dir=str(fake.dev), sys_block=str(fake.sys), ioctl=fake)
    with pytest.raises(KernelError) as info:
        lc.attach(str(link))
    assert info.value.errno == errno.ELOOP
    assert fake.calls == []


def test_operations_check_the_loop_still_backs_the_file(tmp_path: Path, backing: Path) -> None:
    fake = FakeLoops(tmp_path)
    lc = LoopControl(dev_dir=str(fake.dev), sys_block=str(fake.sys), ioctl=fake)
    loop = lc.attach(str(backing))
    fake.bound["loop0"] = (1, 2)  # the index now serves another file
    with pytest.raises(KernelError) as info:
        lc.detach(loop)
    assert info.value.errno == errno.ENXIO and "another file" in str(info.value)
    assert loop_abi.LOOP_CLR_FD not in fake.calls
