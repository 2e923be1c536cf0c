"""Device-mapper names: the one place that decides which names are valid.

The pool's dm name is the one the user configured (containerd and Docker look the pool up by it),
so it is validated once, when the config is read, instead of being mangled later.
"""

from __future__ import annotations

import re

__all__ = ["DM_NAME_LEN", "validate_dm_name"]

#: include/uapi/linux/dm-ioctl.h DM_NAME_LEN: the name field is 128 bytes including the NUL.
DM_NAME_LEN = 128

# Characters udev and libdevmapper pass through unchanged (dmsetup's name mangling whitelist,
# udev's allowed symlink characters). Anything else is escaped or replaced by udev's rules, so
# /dev/mapper/<name> would differ from the node we create ourselves when udev is absent.
_SAFE = re.compile(r"[A-Za-z0-9#+\-.:=@_]+")
# The dm core refuses these (drivers/md/dm-ioctl.c invalid_str and check_name).
_RESERVED = frozenset({".", "..", "control"})


def validate_dm_name(name: str) -> str | None:
    """Return why name cannot be a device-mapper device name, or None if it can."""
    if not name:
        return "it is empty"
    if name in _RESERVED:
        return f"{name!r} is reserved by device-mapper"
    if "/" in name:
        return "it contains '/'"
    if not _SAFE.fullmatch(name):
        bad = next(char for char in name if not _SAFE.fullmatch(char))
        return (
            f"it contains {bad!r}; use only letters, digits and # + - . : = @ _ "
            "(udev would rename anything else)"
        )
    if len(name.encode()) >= DM_NAME_LEN:
        return f"it is {len(name.encode())} bytes long; the limit is {DM_NAME_LEN - 1}"
    return None
