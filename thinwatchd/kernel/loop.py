"""LoopControl: loop devices by ioctl (attach, find, set capacity, size, detach).

A LoopDevice names a loop by index and remembers the backing file's (st_dev, st_ino); every
operation on an existing loop first checks, with LOOP_GET_STATUS64, that the loop still backs
that file (an index can be reused after a detach), and raises KernelError ENXIO otherwise.
Loops are attached without AUTOCLEAR: the pool must survive the daemon.
"""

from __future__ import annotations

import errno as _errno
import fcntl as _fcntl
import os as _os
import re as _re
import stat as _stat
import struct as _struct
from collections.abc import Callable
from dataclasses import dataclass

from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Bytes
from thinwatchd.kernel import loop_abi as _abi
from thinwatchd.kernel.api import LoopDevice
from thinwatchd.kernel.fs import Files, open_device_node

__all__ = ["LoopControl", "LoopInfo", "pack_loop_config", "pack_loop_info", "unpack_loop_info"]

#: Signature of fcntl.ioctl as used here: (fd, request, int or mutable buffer) -> int.
IoctlFn = Callable[[int, int, int | bytearray], int]

_ATTACH_ATTEMPTS = 16


@dataclass(frozen=True)
class LoopInfo:
    """The fields of struct loop_info64 thinwatchd reads or sets."""

    backing_dev: int = 0
    backing_inode: int = 0
    offset: int = 0
    sizelimit: int = 0
    number: int = 0
    flags: int = 0
    file_name: str = ""


def pack_loop_info(info: LoopInfo) -> bytes:
    """Return the 232 bytes of a loop_info64 (file_name truncated to 63 bytes + NUL)."""
    name = info.file_name.encode("utf-8", "surrogateescape")[: _abi.LO_NAME_SIZE - 1]
    return _abi.LOOP_INFO64.pack(
        info.backing_dev,
        info.backing_inode,
        0,
        info.offset,
        info.sizelimit,
        info.number,
        0,
        0,
        info.flags,
        name,
        b"",
        b"",
        0,
        0,
    )


def unpack_loop_info(buf: bytes | bytearray) -> LoopInfo:
    """Parse a loop_info64 as LOOP_GET_STATUS64 fills it."""
    dev, ino, _rdev, offset, limit, number, _et, _eks, flags, name, *_rest = (
        _abi.LOOP_INFO64.unpack_from(buf)
    )
    text = name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return LoopInfo(dev, ino, offset, limit, number, flags, text)


def pack_loop_config(fd: int, info: LoopInfo, block_size: int = 0) -> bytes:
    """Return the 304 bytes of a loop_config for LOOP_CONFIGURE (reserved words zero)."""
    return _abi.LOOP_CONFIG.pack(fd, block_size, pack_loop_info(info), b"")


def _fcntl_ioctl(fd: int, request: int, arg: int | bytearray) -> int:
    if isinstance(arg, bytearray):
        return int(_fcntl.ioctl(fd, request, arg, True))
    return int(_fcntl.ioctl(fd, request, arg))


class LoopControl:
    """The loop driver; implements thinwatchd.kernel.api.LoopControlApi.

    Every method raises KernelError(op, device or path, errno) on failure.
    """

    def __init__(
        self, *, dev_dir: str = "/dev", sys_block: str = "/sys/block", ioctl: IoctlFn | None = None
    ) -> None:
        self.dev_dir = dev_dir
        self.sys_block = sys_block
        self._ioctl: IoctlFn = ioctl or _fcntl_ioctl
        self._files = Files()

    # -- helpers ---------------------------------------------------------------------------

    def _open(self, index: int, flags: int = _os.O_RDONLY) -> int:
        path = _os.path.join(self.dev_dir, f"loop{index}")
        sysfs = _os.path.join(self.sys_block, f"loop{index}", "dev")
        return open_device_node(path, sysfs, block=True, flags=flags)

    def _status(self, fd: int, op: str, device: str) -> LoopInfo | None:
        """LOOP_GET_STATUS64; None if the loop is not bound (ENXIO)."""
        buf = bytearray(_abi.LOOP_INFO64.size)
        try:
            self._ioctl(fd, _abi.LOOP_GET_STATUS64, buf)
        except OSError as exc:
            if exc.errno == _errno.ENXIO:
                return None
            raise KernelError(op, device, exc.errno or _errno.EIO) from exc
        return unpack_loop_info(buf)

    def _open_verified(self, loop: LoopDevice, op: str, flags: int = _os.O_RDONLY) -> int:
        """Open loop's node and check it still backs the same file; return the fd."""
        fd = self._open(loop.index, flags)
        info = self._status(fd, op, loop.path)
        if info is None or (info.backing_dev, info.backing_inode) != (
            loop.backing_dev,
            loop.backing_inode,
        ):
            _os.close(fd)
            what = "is not bound" if info is None else "now backs another file"
            raise KernelError(op, loop.path, _errno.ENXIO, what)
        return fd

    def _call(self, fd: int, request: int, arg: int | bytearray, op: str, device: str) -> int:
        while True:
            try:
                return self._ioctl(fd, request, arg)
            except InterruptedError:
                continue
            except OSError as exc:
                raise KernelError(op, device, exc.errno or _errno.EIO) from exc

    def _bound_indexes(self) -> list[int]:
        try:
            names = _os.listdir(self.sys_block)
        except OSError as exc:
            raise KernelError("scan loops", self.sys_block, exc.errno or _errno.EIO) from exc
        found = (_re.fullmatch(r"loop(\d+)", n) for n in names)
        indexes = sorted(int(m.group(1)) for m in found if m)
        # .../loopN/loop/ exists only while the loop is bound
        return [i for i in indexes if _os.path.isdir(f"{self.sys_block}/loop{i}/loop")]

    # -- LoopControlApi --------------------------------------------------------------------

    def list_loops(self) -> list[LoopDevice]:
        """Return every bound loop device (scan /sys/block/loop*, LOOP_GET_STATUS64 each)."""
        loops = []
        for index in self._bound_indexes():
            try:
                fd = self._open(index)
            except KernelError as exc:
                if exc.errno in (_errno.ENOENT, _errno.ENXIO, _errno.ENODEV):
                    continue  # detached meanwhile
                raise
            try:
                info = self._status(fd, "list", f"loop{index}")
                if info is not None:
                    rdev = _os.fstat(fd).st_rdev
                    loops.append(LoopDevice(index, info.backing_dev, info.backing_inode, rdev))
            finally:
                _os.close(fd)
        return loops

    def find(self, path: str) -> LoopDevice | None:
        """Return the lowest-numbered loop backed by this file (same st_dev and st_ino), if any.

        path must be a regular file: a symlink raises KernelError ELOOP (as attach refuses it).
        """
        try:
            st = _os.lstat(path)
        except OSError as exc:
            raise KernelError("find loop", path, exc.errno or _errno.EIO) from exc
        if not _stat.S_ISREG(st.st_mode):
            code = _errno.ELOOP if _stat.S_ISLNK(st.st_mode) else _errno.EINVAL
            raise KernelError("find loop", path, code, "not a regular file")
        for loop in self.list_loops():
            if (loop.backing_dev, loop.backing_inode) == (st.st_dev, st.st_ino):
                return loop
        return None

    def attach(self, path: str, *, direct_io: bool = False) -> LoopDevice:
        """Attach the regular file path to a free loop device, read-write, without AUTOCLEAR.

        LOOP_CTL_GET_FREE picks a loop, LOOP_CONFIGURE binds it in one step; kernels without
        LOOP_CONFIGURE (ENOTTY/EINVAL, before 5.8) get LOOP_SET_FD + LOOP_SET_STATUS64 (+
        LOOP_SET_DIRECT_IO). EBUSY (another process bound that loop first) retries with the
        next free loop. The file is opened O_NOFOLLOW and must be regular (KernelError ELOOP /
        EINVAL otherwise). Does not check whether a loop already backs the file: see find().
        """
        file_fd = self._files.open_regular(path, _os.O_RDWR)
        try:
            st = _os.fstat(file_fd)
            flags = _abi.LoopFlag.DIRECT_IO if direct_io else _abi.LoopFlag(0)
            info = LoopInfo(flags=int(flags), file_name=path)
            ctl = open_device_node(
                _os.path.join(self.dev_dir, "loop-control"),
                "/sys/class/misc/loop-control/dev",
                block=False,
                flags=_os.O_RDWR,
            )
            try:
                for _ in range(_ATTACH_ATTEMPTS):
                    index = self._call(ctl, _abi.LOOP_CTL_GET_FREE, 0, "attach", path)
                    if self._bind(index, file_fd, info, path):
                        loop_fd = self._open(index)
                        try:
                            rdev = _os.fstat(loop_fd).st_rdev
                        finally:
                            _os.close(loop_fd)
                        return LoopDevice(index, st.st_dev, st.st_ino, rdev)
            finally:
                _os.close(ctl)
            raise KernelError("attach", path, _errno.EBUSY, "every free loop was taken first")
        finally:
            _os.close(file_fd)

    def _bind(self, index: int, file_fd: int, info: LoopInfo, path: str) -> bool:
        """Bind file_fd to loop index; return False if someone else bound it first (EBUSY)."""
        device = f"{self.dev_dir}/loop{index}"
        fd = self._open(index, _os.O_RDWR)
        try:
            config = bytearray(pack_loop_config(file_fd, info))
            try:
                self._ioctl(fd, _abi.LOOP_CONFIGURE, config)
                return True
            except OSError as exc:
                if exc.errno == _errno.EBUSY:
                    return False
                if exc.errno not in (_errno.ENOTTY, _errno.EINVAL):
                    code = exc.errno or _errno.EIO
                    raise KernelError("attach (LOOP_CONFIGURE)", device, code, path) from exc
            try:
                self._ioctl(fd, _abi.LOOP_SET_FD, file_fd)
            except OSError as exc:
                if exc.errno == _errno.EBUSY:
                    return False
                code = exc.errno or _errno.EIO
                raise KernelError("attach (LOOP_SET_FD)", device, code, path) from exc
            try:
                plain = LoopInfo(file_name=info.file_name)
                status = bytearray(pack_loop_info(plain))
                self._call(fd, _abi.LOOP_SET_STATUS64, status, "attach (SET_STATUS64)", device)
                if info.flags & _abi.LoopFlag.DIRECT_IO:
                    self._call(fd, _abi.LOOP_SET_DIRECT_IO, 1, "attach (SET_DIRECT_IO)", device)
            except KernelError:
                self._ioctl(fd, _abi.LOOP_CLR_FD, 0)
                raise
            return True
        finally:
            _os.close(fd)

    def set_capacity(self, loop: LoopDevice) -> None:
        """Make the loop re-read its backing file's size (LOOP_SET_CAPACITY)."""
        fd = self._open_verified(loop, "set_capacity")
        try:
            self._call(fd, _abi.LOOP_SET_CAPACITY, 0, "set_capacity", loop.path)
        finally:
            _os.close(fd)

    def size(self, loop: LoopDevice) -> Bytes:
        """Return the loop device's size in bytes (BLKGETSIZE64)."""
        fd = self._open_verified(loop, "size")
        try:
            buf = bytearray(8)
            self._call(fd, _abi.BLKGETSIZE64, buf, "size (BLKGETSIZE64)", loop.path)
            return Bytes(_struct.unpack("=Q", buf)[0])
        finally:
            _os.close(fd)

    def detach(self, loop: LoopDevice) -> None:
        """Detach the loop (LOOP_CLR_FD). While something (a dm table) still holds it open,
        the kernel only marks it AUTOCLEAR and detaches at the last close.
        """
        fd = self._open_verified(loop, "detach")
        try:
            self._call(fd, _abi.LOOP_CLR_FD, 0, "detach", loop.path)
        finally:
            _os.close(fd)
