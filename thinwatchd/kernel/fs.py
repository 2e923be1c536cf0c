"""File operations for the backing files and device nodes, by syscall (no forks).

Every failure raises KernelError(op, path, errno); a policy refusal (a symlink, a device, a
shrink) raises it too, with an errno that says why (ELOOP, EINVAL, EEXIST) and a detail text.
"""

from __future__ import annotations

import ctypes as _ctypes
import ctypes.util as _ctypes_util
import errno as _errno
import os as _os
import stat as _stat

from thinwatchd.errors import KernelError

__all__ = [
    "allocated_bytes",
    "create_regular_file",
    "filesystem_space",
    "grow_file",
    "header_is_zero",
    "make_node",
    "open_device_node",
    "open_existing_regular",
    "regular_file_size",
    "zero_header",
]

#: include/uapi/linux/falloc.h FALLOC_FL_KEEP_SIZE: allocate without changing the file size.
_FALLOC_FL_KEEP_SIZE = 0x01
_libc = _ctypes.CDLL(_ctypes_util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [_ctypes.c_int, _ctypes.c_int, _ctypes.c_int64, _ctypes.c_int64]
_libc.fallocate.restype = _ctypes.c_int


def _kind(mode: int) -> str:
    for test, name in (
        (_stat.S_ISREG, "a regular file"),
        (_stat.S_ISLNK, "a symlink"),
        (_stat.S_ISDIR, "a directory"),
        (_stat.S_ISBLK, "a block device"),
        (_stat.S_ISCHR, "a character device"),
        (_stat.S_ISFIFO, "a fifo"),
        (_stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "of unknown type"


def _refuse(op: str, path: str, mode: int) -> KernelError:
    code = _errno.ELOOP if _stat.S_ISLNK(mode) else _errno.EINVAL
    return KernelError(op, path, code, f"{_kind(mode)}, not a regular file: refused")


def _preallocate(fd: int, offset: int, length: int) -> None:
    """Allocate [offset, offset+length) beyond EOF without changing the size (KEEP_SIZE)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        raise OSError(_ctypes.get_errno(), _os.strerror(_ctypes.get_errno()))


def open_existing_regular(path: str, flags: int = _os.O_RDWR) -> int:
    """Open an existing regular file without following a symlink; return the fd.

    Raise KernelError: ELOOP for a symlink, EINVAL for a device/fifo/socket/directory
    (checked before opening, so opening a device node has no side effect, and again on the
    open fd), ENOENT when missing, or whatever open() reported.
    """
    op = "open backing file"
    try:
        st = _os.lstat(path)
        if not _stat.S_ISREG(st.st_mode):
            raise _refuse(op, path, st.st_mode)
        fd = _os.open(path, flags | _os.O_NOFOLLOW | _os.O_CLOEXEC | _os.O_NOCTTY)
    except OSError as exc:
        raise KernelError(op, path, exc.errno or _errno.EIO) from exc
    st = _os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        _os.close(fd)
        raise _refuse(op, path, st.st_mode)
    return fd


def _stage(dirfd: int, base: str) -> tuple[int, str | None]:
    """Open an unnamed file in the directory (O_TMPFILE), or a named temporary one."""
    try:
        flags = _os.O_TMPFILE | _os.O_WRONLY | _os.O_CLOEXEC
        return _os.open(".", flags, 0o600, dir_fd=dirfd), None
    except OSError as exc:
        if exc.errno not in (_errno.EOPNOTSUPP, _errno.EISDIR, _errno.EINVAL):
            raise
    prefix = f".{base}.thinwatchd-"
    for entry in _os.scandir(dirfd):  # leftovers of a crash during an earlier create
        if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
            _os.unlink(entry.name, dir_fd=dirfd)
    tmp = prefix + _os.urandom(4).hex()
    flags = _os.O_WRONLY | _os.O_CREAT | _os.O_EXCL | _os.O_NOFOLLOW | _os.O_CLOEXEC
    return _os.open(tmp, flags, 0o600, dir_fd=dirfd), tmp


def create_regular_file(path: str, size: int, *, preallocate: bool) -> None:
    """Create a new regular file of exactly size bytes (mode 0600); never touch an existing one.

    The file is built unnamed (O_TMPFILE; or under a temporary name opened with
    O_CREAT|O_EXCL|O_NOFOLLOW where the filesystem lacks O_TMPFILE), sized (sparse with
    ftruncate, or allocated with fallocate when preallocate), fsynced, then published with
    link(), which fails if anything (file, symlink, device) already has the name; then the
    directory is fsynced. A crash thus never leaves a half-made file under path. Raise
    KernelError: EEXIST if path exists (of any kind), ENOSPC when preallocation does not fit,
    or the failing syscall's errno.
    """
    op = "create file"
    if size < 0:
        raise ValueError(f"size must be >= 0, not {size}")
    directory, base = _os.path.split(_os.path.abspath(path))
    try:
        st = _os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KernelError(op, path, exc.errno or _errno.EIO) from exc
    else:
        raise KernelError(op, path, _errno.EEXIST, f"already exists ({_kind(st.st_mode)})")
    tmp: str | None = None
    try:
        dirfd = _os.open(directory, _os.O_RDONLY | _os.O_DIRECTORY | _os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(op, directory, exc.errno or _errno.EIO) from exc
    try:
        fd, tmp = _stage(dirfd, base)
        try:
            if preallocate:
                _preallocate(fd, 0, size)
            _os.ftruncate(fd, size)
            _os.fsync(fd)
            if tmp is None:  # linkat(AT_SYMLINK_FOLLOW) through /proc names the O_TMPFILE inode
                src = f"/proc/self/fd/{fd}"
                _os.link(src, base, dst_dir_fd=dirfd, follow_symlinks=True)
            else:
                _os.link(tmp, base, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        finally:
            _os.close(fd)
            if tmp is not None:
                _os.unlink(tmp, dir_fd=dirfd)
        _os.fsync(dirfd)
    except OSError as exc:
        raise KernelError(op, path, exc.errno or _errno.EIO) from exc
    finally:
        _os.close(dirfd)


def grow_file(path: str, new_size: int, *, preallocate: bool, sync: bool = True) -> int:
    """Extend a regular file to new_size bytes, crash-safely; return the previous size.

    With preallocate, first allocate the new range beyond EOF with FALLOC_FL_KEEP_SIZE (the size
    does not change, so ENOSPC leaves the file as it was; the stray blocks are released), then
    ftruncate to the new size — one atomic inode update, so a crash leaves the old or the new
    size — then fsync unless sync is False (for a pool file the kernel makes the size durable
    itself before it records the new size; see extender.py). Never shrinks: raise
    KernelError(EINVAL) if new_size < the current size (equal is a no-op). EOPNOTSUPP means the
    filesystem cannot preallocate.
    """
    op = "grow file"
    fd = open_existing_regular(path, _os.O_RDWR)
    try:
        old = _os.fstat(fd).st_size
        if new_size < old:
            raise KernelError(op, path, _errno.EINVAL, f"would shrink {old} -> {new_size} bytes")
        if new_size == old:
            return old
        try:
            if preallocate:
                try:
                    _preallocate(fd, old, new_size - old)
                except OSError:
                    _os.ftruncate(fd, old)  # give back blocks allocated beyond EOF
                    raise
            _os.ftruncate(fd, new_size)
            if sync:
                _os.fsync(fd)
        except OSError as exc:
            raise KernelError(op, path, exc.errno or _errno.EIO) from exc
        return old
    finally:
        _os.close(fd)


def zero_header(path: str, nbytes: int = 4096) -> None:
    """Write nbytes of zeros at the start of a NEW metadata file and fsync it.

    Only for a file this process just created: zeroing an existing pool's metadata destroys
    the pool. Raise KernelError(EINVAL) if the file is shorter than nbytes.
    """
    fd = open_existing_regular(path, _os.O_WRONLY)
    try:
        if _os.fstat(fd).st_size < nbytes:
            raise KernelError("zero header", path, _errno.EINVAL, f"shorter than {nbytes} bytes")
        _os.pwrite(fd, bytes(nbytes), 0)
        _os.fsync(fd)
    except OSError as exc:
        raise KernelError("zero header", path, exc.errno or _errno.EIO) from exc
    finally:
        _os.close(fd)


def filesystem_space(path: str) -> tuple[int, int]:
    """Return (bytes available to unprivileged users, total bytes) of path's filesystem."""
    try:
        st = _os.statvfs(path)
    except OSError as exc:
        raise KernelError("statvfs", path, exc.errno or _errno.EIO) from exc
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def allocated_bytes(path: str) -> int:
    """Return the bytes the file really occupies on disk (st_blocks * 512; sparse-aware)."""
    try:
        return _os.lstat(path).st_blocks * 512
    except OSError as exc:
        raise KernelError("stat", path, exc.errno or _errno.EIO) from exc


def open_device_node(path: str, sysfs_dev: str, *, block: bool, flags: int) -> int:
    """Open a device node; if it is missing (no devtmpfs/udev), create it from sysfs first.

    sysfs_dev is the "major:minor" file, e.g. /sys/class/misc/device-mapper/dev. An existing
    node with the wrong type or number is replaced. Raise KernelError(op "open", path, errno),
    e.g. ENODEV when the driver is not in the kernel.
    """
    try:
        return _os.open(path, flags | _os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KernelError("open", path, exc.errno or _errno.EIO) from exc
    try:
        with open(sysfs_dev, encoding="ascii") as f:
            major, minor = (int(x) for x in f.read().strip().split(":"))
        make_node(path, _os.makedev(major, minor), block=block)
        return _os.open(path, flags | _os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError("open", path, exc.errno or _errno.EIO, f"via {sysfs_dev}") from exc


def make_node(path: str, dev: int, *, block: bool, mode: int = 0o600) -> bool:
    """Make path a device node for dev (atomically replacing a wrong one); return True if changed.

    Creates the parent directory (0755) if needed. Raise OSError on failure.
    """
    kind = _stat.S_IFBLK if block else _stat.S_IFCHR
    try:
        st = _os.lstat(path)
        if _stat.S_IFMT(st.st_mode) == kind and st.st_rdev == dev:
            return False
    except FileNotFoundError:
        pass
    _os.makedirs(_os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{_os.getpid()}.tmp"
    _os.mknod(tmp, kind | mode, dev)
    try:
        _os.rename(tmp, path)
    except OSError:
        _os.unlink(tmp)
        raise
    return True


def regular_file_size(path: str) -> int:
    """Return the apparent size of a regular file (not following symlinks); raise KernelError."""
    fd = open_existing_regular(path, _os.O_RDONLY)
    try:
        return _os.fstat(fd).st_size
    finally:
        _os.close(fd)


def header_is_zero(path: str, nbytes: int = 4096) -> bool:
    """Return True if the file's first nbytes are all zero (a never-activated metadata file)."""
    fd = open_existing_regular(path, _os.O_RDONLY)
    try:
        return not any(_os.pread(fd, nbytes, 0))
    except OSError as exc:
        raise KernelError("read header", path, exc.errno or _errno.EIO) from exc
    finally:
        _os.close(fd)
