"""File operations on the backing files (class Files) and on device nodes, by syscall.

Every failure raises KernelError(op, path, errno); a policy refusal (a symlink, a device, a
shrink) raises it too, with an errno that says why (ELOOP, EINVAL, EEXIST) and a detail text.
Files makes its syscalls through a Syscalls object, so the engine tests can fail any of them.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import stat as _stat

from thinwatchd.base.errors import KernelError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.units import Bytes, disk_blocks_to_bytes, fs_blocks_to_bytes
from thinwatchd.kernel.api import FileInfo, FsSpace
from thinwatchd.kernel.syscalls import FALLOC_FL_KEEP_SIZE, Syscalls

__all__ = ["Files", "make_node", "open_device_node"]

#: The metadata superblock lives in the first 4 KiB; all zero means never activated.
HEADER_BYTES = 4096
#: Mode of directories thinwatchd creates for pool files: root's own, like its files.
DIRECTORY_MODE = 0o700
#: Zeros written at once where a filesystem cannot fallocate.
ZERO_CHUNK_BYTES = 1024 * 1024


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


def _error(op: str, path: str, exc: OSError) -> KernelError:
    return KernelError(op, path, exc.errno or _errno.EIO)


class Files:
    """The backing-file operations of FilesApi, over a Syscalls object."""

    def __init__(self, syscalls: Syscalls | None = None) -> None:
        self.sys = syscalls or Syscalls()

    # -- looking ---------------------------------------------------------------------------

    def inspect(self, path: str, *, follow: bool = False) -> FileInfo | None:
        try:
            st = self.sys.stat(path) if follow else self.sys.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error("stat", path, exc) from exc
        return FileInfo(
            dev=st.st_dev,
            ino=st.st_ino,
            mode=st.st_mode,
            uid=st.st_uid,
            size=Bytes(st.st_size),
            allocated=disk_blocks_to_bytes(st.st_blocks),
        )

    def space(self, path: str) -> FsSpace:
        try:
            st = self.sys.statvfs(path)
        except OSError as exc:
            raise _error("statvfs", path, exc) from exc
        return FsSpace(
            free=fs_blocks_to_bytes(st.f_bavail, st.f_frsize),
            total=fs_blocks_to_bytes(st.f_blocks, st.f_frsize),
        )

    def open_regular(self, path: str, flags: int = _os.O_RDWR) -> int:
        """Open an existing regular file without following a symlink; return the fd.

        Raise KernelError: ELOOP for a symlink, EINVAL for a device/fifo/socket/directory
        (checked before opening, so opening a device node has no side effect, and again on the
        open fd), ENOENT when missing, or whatever open() reported.
        """
        op = "open backing file"
        try:
            st = self.sys.lstat(path)
            if not _stat.S_ISREG(st.st_mode):
                raise _refuse(op, path, st.st_mode)
            fd = self.sys.open(path, flags | _os.O_NOFOLLOW | _os.O_CLOEXEC | _os.O_NOCTTY)
        except OSError as exc:
            raise _error(op, path, exc) from exc
        try:
            st = self.sys.fstat(fd)
        except OSError as exc:
            self.sys.close(fd)
            raise _error(op, path, exc) from exc
        if not _stat.S_ISREG(st.st_mode):
            self.sys.close(fd)
            raise _refuse(op, path, st.st_mode)
        return fd

    def holds_data(self, path: str) -> bool:
        """Return whether any byte of the file was written: SEEK_DATA finds data.

        Holes and preallocated (unwritten) extents read as zeros and are no data on ext4, xfs,
        btrfs and tmpfs; a filesystem without SEEK_DATA reports the whole file as data, which
        errs on the safe side (a file that may hold data is treated as holding it). Clean
        cached pages count as data to SEEK_DATA (a read of an unwritten extent, by udev's probe
        of a loop device, caches zeros), so they are dropped first; dirty pages stay.
        """
        fd = self.open_regular(path, _os.O_RDONLY)
        try:
            self.sys.fadvise_dontneed(fd)
            self.sys.lseek(fd, 0, _os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == _errno.ENXIO:  # no data at or after offset 0
                return False
            raise _error("seek data", path, exc) from exc
        finally:
            self.sys.close(fd)
        return True

    def header_is_zero(self, path: str) -> bool:
        fd = self.open_regular(path, _os.O_RDONLY)
        try:
            return not any(self.sys.pread(fd, HEADER_BYTES, 0))
        except OSError as exc:
            raise _error("read header", path, exc) from exc
        finally:
            self.sys.close(fd)

    # -- changing --------------------------------------------------------------------------

    def make_dirs(self, directory: str) -> list[str]:
        """Create directory and its missing parents with mode 0700; return those created.

        An existing component that is not a directory gives ENOTDIR, named. A symlink to a
        directory is a directory here (/var/lib/thinwatchd -> /srv is common); only the pool
        files themselves must not be links.
        """
        missing: list[str] = []
        path = _os.path.abspath(directory)
        while True:
            info = self.inspect(path, follow=True)
            if info is not None:
                if not _stat.S_ISDIR(info.mode):
                    raise KernelError("mkdir", path, _errno.ENOTDIR, f"{_kind(info.mode)}")
                break
            missing.append(path)
            parent = _os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for path in reversed(missing):
            try:
                self.sys.mkdir(path, DIRECTORY_MODE)
            except FileExistsError:
                continue  # made by someone else meanwhile: checked by the caller's next step
            except OSError as exc:
                raise _error("mkdir", path, exc) from exc
        return list(reversed(missing))

    def _preallocate(self, fd: int, offset: int, length: int) -> None:
        """Allocate [offset, offset+length) beyond EOF, the range no loop device sees yet.

        With fallocate(KEEP_SIZE) the size does not change. A filesystem that cannot
        fallocate (EOPNOTSUPP: NFS before 4.2, ext4 without extents) gets the range written
        with zeros instead, as posix_fallocate(3) does: that moves EOF, which the caller sets
        again. Zeros are only ever written past EOF, never into a file a pool is using.
        """
        if length <= 0:
            return
        try:
            self.sys.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno != _errno.EOPNOTSUPP:
                raise
            zeros = bytes(ZERO_CHUNK_BYTES)
            end = offset + length
            while offset < end:
                count = min(ZERO_CHUNK_BYTES, end - offset)
                offset += self.sys.pwrite(fd, zeros[:count], offset)

    def claim(self, path: str, identity: tuple[int, int] | None = None) -> Bytes:
        """Allocate every hole of a file in use, without changing a byte of it; return the
        bytes this took from the filesystem (st_blocks after, less before).

        fallocate(KEEP_SIZE) over the whole file: written blocks stay as they are, holes become
        unwritten extents that read as zeros, so a pool's write there cannot meet a full
        filesystem. Safe beside the loop device's own I/O (the filesystem orders it with
        direct I/O and hole punches). ENOSPC leaves what was allocated so far allocated. A
        filesystem that cannot fallocate gives EOPNOTSUPP: a file in use is never written to
        instead. With identity (st_dev, st_ino), the file opened must be that one (ESTALE).
        """
        op = "claim holes"
        fd = self.open_regular(path, _os.O_RDWR)
        try:
            st = self.sys.fstat(fd)
            if identity is not None and (st.st_dev, st.st_ino) != identity:
                raise KernelError(op, path, _errno.ESTALE, "not the file behind the loop device")
            before = st.st_blocks
            try:
                if st.st_size > 0:
                    self.sys.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, st.st_size)
            except OSError as exc:
                taken = max(0, self.sys.fstat(fd).st_blocks - before)
                detail = f"{format_bytes(disk_blocks_to_bytes(taken))} claimed before it failed"
                raise KernelError(op, path, exc.errno or _errno.EIO, detail) from exc
            return disk_blocks_to_bytes(max(0, self.sys.fstat(fd).st_blocks - before))
        except OSError as exc:
            raise _error(op, path, exc) from exc
        finally:
            self.sys.close(fd)

    def _stage(self, dirfd: int, base: str) -> tuple[int, str | None]:
        """Open an unnamed file in the directory (O_TMPFILE), or a named temporary one."""
        try:
            flags = _os.O_TMPFILE | _os.O_WRONLY | _os.O_CLOEXEC
            return self.sys.open(".", flags, 0o600, dir_fd=dirfd), None
        except OSError as exc:
            if exc.errno not in (_errno.EOPNOTSUPP, _errno.EISDIR, _errno.EINVAL):
                raise
        prefix = f".{base}.thinwatchd-"
        for name in self.sys.listdir(dirfd):  # leftovers of a crash during an earlier create
            if name.startswith(prefix):
                self.sys.unlink(name, dirfd)
        tmp = prefix + _os.urandom(4).hex()
        flags = _os.O_WRONLY | _os.O_CREAT | _os.O_EXCL | _os.O_NOFOLLOW | _os.O_CLOEXEC
        return self.sys.open(tmp, flags, 0o600, dir_fd=dirfd), tmp

    def create(self, path: str, size: Bytes, *, preallocate: bool) -> None:
        """Create a new regular file of exactly size bytes (mode 0600); never touch an existing one.

        The file is built unnamed (O_TMPFILE; or under a temporary name opened with
        O_CREAT|O_EXCL|O_NOFOLLOW where the filesystem lacks O_TMPFILE), sized (sparse with
        ftruncate, or allocated with fallocate when preallocate), fsynced, then published with
        link(), which fails if anything (file, symlink, device) already has the name; then the
        directory is fsynced. A crash thus never leaves a half-made file under path, and the
        file reads as zeros (a metadata file's zero header marks it as never activated).
        Raise KernelError: EEXIST if path exists (of any kind), ENOSPC when preallocation does
        not fit, or the failing syscall's errno.
        """
        op = "create file"
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        directory, base = _os.path.split(_os.path.abspath(path))
        existing = self.inspect(path)
        if existing is not None:
            raise KernelError(op, path, _errno.EEXIST, f"already exists ({_kind(existing.mode)})")
        try:
            dirfd = self.sys.open(directory, _os.O_RDONLY | _os.O_DIRECTORY | _os.O_CLOEXEC)
        except OSError as exc:
            raise _error(op, directory, exc) from exc
        try:
            fd, tmp = self._stage(dirfd, base)
            try:
                if preallocate:
                    self._preallocate(fd, 0, size)
                self.sys.ftruncate(fd, size)
                self.sys.fsync(fd)
                if tmp is None:  # linkat(AT_SYMLINK_FOLLOW) through /proc names the inode
                    src = f"/proc/self/fd/{fd}"
                    self.sys.link(src, base, src_dir_fd=None, dst_dir_fd=dirfd, follow=True)
                else:
                    self.sys.link(tmp, base, src_dir_fd=dirfd, dst_dir_fd=dirfd, follow=False)
            finally:
                self.sys.close(fd)
                if tmp is not None:
                    self.sys.unlink(tmp, dirfd)
            self.sys.fsync(dirfd)
        except OSError as exc:
            raise _error(op, path, exc) from exc
        finally:
            self.sys.close(dirfd)

    def grow(
        self,
        path: str,
        new_size: Bytes,
        *,
        preallocate: bool,
        sync: bool = True,
        identity: tuple[int, int] | None = None,
    ) -> Bytes:
        """Extend a regular file to new_size bytes, crash-safely; return the previous size.

        With preallocate, first allocate the new range beyond EOF with FALLOC_FL_KEEP_SIZE (the
        size does not change, so ENOSPC leaves the file as it was; the stray blocks are
        released), then ftruncate to the new size — one atomic inode update, so a crash leaves
        the old or the new size — then fsync unless sync is False (for a pool file the kernel
        makes the size durable itself before it records the new size; see growth/extender.py). Never
        shrinks: raise KernelError(EINVAL) if new_size < the current size (equal is a no-op).
        Where the filesystem cannot fallocate, the new range is written with zeros (it is past
        the old EOF: nothing uses it yet). With identity (st_dev, st_ino), the
        open file must be that one (the one behind the loop device): a file replaced under the
        same name is refused with ESTALE, never grown in its place.
        """
        op = "grow file"
        fd = self.open_regular(path, _os.O_RDWR)
        try:
            st = self.sys.fstat(fd)
            if identity is not None and (st.st_dev, st.st_ino) != identity:
                raise KernelError(
                    op,
                    path,
                    _errno.ESTALE,
                    "not the file behind the loop device "
                    "any more (replaced or renamed behind thinwatchd's back)",
                )
            old = Bytes(st.st_size)
            if new_size < old:
                raise KernelError(
                    op, path, _errno.EINVAL, f"would shrink {old} -> {new_size} bytes"
                )
            if new_size == old:
                return old
            if preallocate:
                try:
                    self._preallocate(fd, old, new_size - old)
                except OSError:
                    # Give back what was allocated or written beyond the old EOF: no loop
                    # device sees past it yet, so this truncate can only drop that, never data.
                    if self.sys.fstat(fd).st_size >= old:
                        self.sys.ftruncate(fd, old)
                    raise
            self.sys.ftruncate(fd, new_size)
            if sync:
                self.sys.fsync(fd)
            return old
        except OSError as exc:
            raise _error(op, path, exc) from exc
        finally:
            self.sys.close(fd)


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
