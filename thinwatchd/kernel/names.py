"""Device-mapper names: the one place that decides which names are valid.

Two rules: what the kernel takes for any device (``name_problem``: the ioctl layer checks every
name it sends), and, stricter, what a pool may be called (``pool_name_problem``). The pool's dm
name is the one the user configured (containerd and Docker look the pool up by it), so it is
validated once, when the config is read, into a ``PoolName``, instead of being mangled later.
"""

from __future__ import annotations

import re
from typing import NewType

from thinwatchd.kernel.dm_abi import DM_NAME_LEN

__all__ = ["PoolName", "name_problem", "pool_name", "pool_name_problem"]

#: A configured pool's name, valid as a device-mapper name and safe through udev.
PoolName = NewType("PoolName", str)

# Characters udev and libdevmapper pass through unchanged (dmsetup's name mangling whitelist,
# udev's allowed symlink characters). Anything else is escaped or replaced by udev's rules, so
# /dev/mapper/<name> would differ from the node we create ourselves when udev is absent.
_SAFE = re.compile(r"[A-Za-z0-9#+\-.:=@_]+")
# The dm core refuses these (drivers/md/dm-ioctl.c invalid_str and check_name).
_RESERVED = frozenset({".", "..", "control"})


def name_problem(name: str) -> str | None:
    """Return why the kernel would refuse name for a dm device, or None if it takes it."""
    if "\0" in name:
        return "it contains NUL"
    return _shape_problem(name) or _length_problem(name)


def pool_name_problem(name: str) -> str | None:
    """Return why name cannot be a pool's dm name, or None if it can."""
    return _shape_problem(name) or _unsafe_problem(name) or _length_problem(name)


def _shape_problem(name: str) -> str | None:
    if not name:
        return "it is empty"
    if name in _RESERVED:
        return f"{name!r} is reserved by device-mapper"
    if "/" in name:
        return "it contains '/'"
    return None


def _unsafe_problem(name: str) -> str | None:
    if _SAFE.fullmatch(name):
        return None
    bad = next(char for char in name if not _SAFE.fullmatch(char))
    return (
        f"it contains {bad!r}; use only letters, digits and # + - . : = @ _ "
        "(udev would rename anything else)"
    )


def _length_problem(name: str) -> str | None:
    if len(name.encode()) >= DM_NAME_LEN:
        return f"it is {len(name.encode())} bytes long; the limit is {DM_NAME_LEN - 1}"
    return None


def pool_name(name: str) -> PoolName:
    """Return name as a PoolName; raise ValueError saying why it cannot be one."""
    problem = pool_name_problem(name)
    if problem is not None:
        raise ValueError(f"{name!r} cannot be a device-mapper name: {problem}")
    return PoolName(name)
