"""The C library, loaded once, for the calls Python's os module lacks (fallocate, SysV semaphores).

Each user declares the argtypes of the functions it calls, beside its calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["libc"]

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
