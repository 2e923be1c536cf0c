"""A pool's backing files: what must be true of them before a pool is built on them.

Create what a new pool lacks (parent directories 0700, files 0600, metadata first: its zero
header marks a pool never activated); refuse what could lose data or be tampered with: used
metadata without its data file, data next to never-used metadata, files another user could
write, one file under two names. Every refusal is one line naming the config key.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Mapping

from thinwatchd.base.errors import KernelError, PoolSetupError
from thinwatchd.base.human import format_bytes
from thinwatchd.base.units import Bytes
from thinwatchd.config.settings import PoolSettings
from thinwatchd.kernel.api import FileInfo, FilesApi
from thinwatchd.policy.fs_room import reserve_bytes

__all__ = ["check_distinct_files", "prepare_files"]


#: Errors from a pool file's path that no retry will fix: the operator must act.
_PERMANENT_FILE_ERRORS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EROFS,
        errno.EINVAL,
        errno.EEXIST,
        errno.EISDIR,
    }
)


def _file_key(settings: PoolSettings, path: str) -> str:
    which = "data_file" if path == str(settings.data_file) else "metadata_file"
    return f"pools.{settings.name}.{which}"


def _inspect_pool_file(files: FilesApi, settings: PoolSettings, path: str) -> FileInfo | None:
    """Return the file's lstat, None if missing; refuse what a pool must not be built on.

    Like sshd's StrictModes: a file that someone other than us could write (not owned by our
    user, or writable by group or others) could be swapped or scribbled on, and it holds every
    byte of the pool's volumes. Symlinks and non-regular files are refused too.
    """
    key = _file_key(settings, path)
    info = files.inspect(path)
    if info is None:
        return None
    if not info.is_regular:
        kind = "a symlink" if stat.S_ISLNK(info.mode) else "not a regular file"
        raise PoolSetupError(
            f"{key}: {path} is {kind}; thinwatchd only backs pools with regular files it can "
            f"open without following links. Point {key} at the real file"
        )
    owner = os.geteuid()
    if info.uid != owner or info.mode & 0o022:
        raise PoolSetupError(
            f"{key}: {path} is owned by uid {info.uid} with mode {stat.S_IMODE(info.mode):04o}; "
            f"a pool file must be owned by uid {owner} and writable by nobody else. Fix it "
            f"with: chown {owner} {path} && chmod go-w {path}"
        )
    return info


def prepare_files(
    settings: PoolSettings, files: FilesApi, before_making: Callable[[], None] | None = None
) -> bool:
    """Create whatever files a new pool lacks; return True if the pool is new (never activated).

    before_making runs once the files on disk are found fit, before anything is made: a
    refusal there leaves nothing behind.

    Raise PoolSetupError when the files on disk could hold a used pool that is incomplete (we
    never format metadata next to data that may be reachable, nor attach used metadata to a
    data file we would have to invent), when a file is unsafe, and when a path cannot be used
    for a reason no retry fixes (EACCES, ENOTDIR, ELOOP, EROFS, ...). Other kernel errors (EIO,
    ENOSPC, ENOMEM) are raised as KernelError: a later start may succeed.
    """
    try:
        return _prepare_files_unchecked(settings, files, before_making)
    except KernelError as exc:
        if exc.errno not in _PERMANENT_FILE_ERRORS:
            raise
        key = (
            _file_key(settings, exc.device)
            if exc.device in (str(settings.data_file), str(settings.metadata_file))
            else f"pools.{settings.name}"
        )
        raise PoolSetupError(f"{key}: {exc}; fix the path or its permissions") from exc


def _prepare_files_unchecked(
    settings: PoolSettings, files: FilesApi, before_making: Callable[[], None] | None
) -> bool:
    data, meta = str(settings.data_file), str(settings.metadata_file)
    data_info = _inspect_pool_file(files, settings, data)
    meta_info = _inspect_pool_file(files, settings, meta)
    if data_info is not None and meta_info is not None and data_info.identity == meta_info.identity:
        raise PoolSetupError(
            f"pools.{settings.name}: data_file {data} and metadata_file {meta} are the same file; "
            f"each needs its own"
        )
    if meta_info is not None and not files.header_is_zero(meta):
        if data_info is None:
            raise PoolSetupError(
                f"pool {settings.name}: metadata file {meta} holds a used pool but data file "
                f"{data} is missing; refusing to create an empty one (the thin volumes would "
                f"read zeros). Restore the data file or fix pools.{settings.name}.data_file"
            )
        if before_making is not None:
            before_making()
        return False
    # Data written but no used metadata: a lost or mistyped metadata file, never our own
    # interrupted creation (it makes the metadata first, and writes no data; a preallocated
    # file's unwritten extents are no data to SEEK_DATA). Formatting would lose that data.
    if data_info is not None and files.holds_data(data):
        state = "is missing" if meta_info is None else "has never been used (all-zero header)"
        raise PoolSetupError(
            f"pool {settings.name}: data file {data} holds data but metadata file {meta} "
            f"{state}; refusing to format new metadata over it. Restore the metadata file or fix "
            f"pools.{settings.name}.metadata_file"
        )
    if before_making is not None:
        before_making()
    # A new pool (or a creation interrupted part-way): metadata first; a new file reads as
    # zeros, and its zero header is what marks the pool as never activated.
    for path, info, size in (
        (meta, meta_info, settings.metadata_size),
        (data, data_info, settings.data_size),
    ):
        allocate = settings.allocates(metadata=path == meta)
        if info is None:
            files.make_dirs(os.path.dirname(os.path.abspath(path)))
        if allocate and (info is None or info.size < size):
            _check_room(settings, files, path, Bytes(size - (0 if info is None else info.size)))
        if info is None:
            files.create(path, size, preallocate=allocate)
        elif info.size < size:
            files.grow(path, size, preallocate=allocate)
    return True


def _check_room(settings: PoolSettings, files: FilesApi, path: str, needed: Bytes) -> None:
    """Refuse (ENOSPC, a transient error: the unit retries) a new file that would take its
    filesystem into the pool's reserve, before any of it is allocated."""
    space = files.space(os.path.dirname(os.path.abspath(path)))
    reserve = reserve_bytes(settings, space.total)
    if space.free - needed < reserve:
        raise KernelError(
            "create file",
            path,
            errno.ENOSPC,
            f"{_file_key(settings, path)} needs {format_bytes(needed)} and its filesystem has "
            f"{format_bytes(space.free)} free, less the reserve of {format_bytes(reserve)}: "
            f"free space there, or lower pools.{settings.name}.data_size / metadata_size / "
            f"reserve",
        )


def check_distinct_files(
    pools: list[PoolSettings],
    files: FilesApi,
    live: Mapping[tuple[object, ...], tuple[str, str]] | None = None,
) -> None:
    """Refuse two pool files that are one file under two spellings (links, bind mounts).

    Compared by (st_dev, st_ino), across all pools: one loop device would otherwise become
    both a pool's metadata and data, or two pools' data. A file still to be created is known
    by its nearest existing directory's (st_dev, st_ino) and the rest of its path, so two
    spellings of one new file are caught before pools are built side by side. live gives the
    files running pools use, by their loops' (st_dev, st_ino), as (key, path): a reload must
    not give one to another pool, whatever the new config says of the running one. Raise
    PoolSetupError naming both keys.
    """
    seen: dict[tuple[object, ...], tuple[str, str]] = dict(live or {})
    for settings in pools:
        for path in (str(settings.metadata_file), str(settings.data_file)):
            try:
                identity = _identity(files, path)
            except KernelError:
                continue  # activation reports it, with the key
            key = _file_key(settings, path)
            other = seen.setdefault(identity, (key, path))
            if other[0] != key:
                raise PoolSetupError(
                    f"{key}: {path} is the same file as {other[0]} ({other[1]}); every pool "
                    f"file needs its own. Fix one of the two keys"
                )


def _identity(files: FilesApi, path: str) -> tuple[object, ...]:
    """(st_dev, st_ino) of an existing file; of its nearest existing directory plus the rest of
    the path for one that does not exist yet."""
    info = files.inspect(path)
    if info is not None:
        return (info.dev, info.ino)
    rest: list[str] = []
    here = os.path.abspath(path)
    while True:
        here, name = os.path.split(here)
        rest.insert(0, name)
        directory = files.inspect(here, follow=True)
        if directory is not None or not name:
            break
    found = directory or files.inspect("/", follow=True)
    assert found is not None
    return (found.dev, found.ino, *rest)
