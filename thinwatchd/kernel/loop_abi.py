"""The loop-device ioctl ABI as data (include/uapi/linux/loop.h, include/uapi/linux/fs.h).

Checked against Debian 12's linux-libc-dev 6.1 headers with a C program printing sizeof,
offsetof and the ioctl values. No logic lives here.
"""

from __future__ import annotations

import enum as _enum
import struct as _struct

__all__ = [
    "BLKGETSIZE64",
    "LOOP_CLR_FD",
    "LOOP_CONFIG",
    "LOOP_CONFIGURE",
    "LOOP_CTL_GET_FREE",
    "LOOP_GET_STATUS64",
    "LOOP_INFO64",
    "LOOP_MAJOR",
    "LOOP_SET_CAPACITY",
    "LOOP_SET_DIRECT_IO",
    "LOOP_SET_FD",
    "LOOP_SET_STATUS64",
    "LO_NAME_SIZE",
    "LoopFlag",
]

# Loop ioctls: plain numbers (0x4C = 'L'), not _IO-encoded. LOOP_CTL_* go to /dev/loop-control.
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
#: Linux 5.8+: attach and configure in one step.
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
#: _IOR(0x12, 114, size_t): the block device's size in bytes, as u64.
BLKGETSIZE64 = 0x80081272

#: include/uapi/linux/major.h
LOOP_MAJOR = 7
LO_NAME_SIZE = 64

#: struct loop_info64, 232 bytes: lo_device @0, lo_inode @8, lo_rdevice @16, lo_offset @24,
#: lo_sizelimit @32, lo_number @40, lo_encrypt_type @44, lo_encrypt_key_size @48, lo_flags @52,
#: lo_file_name[64] @56, lo_crypt_name[64] @120, lo_encrypt_key[32] @184, lo_init[2] @216.
#: lo_device is huge_encode_dev(st_dev of the backing file), equal to Python's st_dev.
LOOP_INFO64 = _struct.Struct("=QQQQQIIII64s64s32s2Q")
#: struct loop_config, 304 bytes: fd (u32) @0, block_size (u32, 0 = default) @4,
#: info (loop_info64) @8, __reserved[8] (u64, must be zero) @240.
LOOP_CONFIG = _struct.Struct(f"=II{LOOP_INFO64.size}s64s")


class LoopFlag(_enum.IntFlag):
    """lo_flags bits."""

    #: The device is read-only (LOOP_CONFIGURE may set it; SET_STATUS64 may not).
    READ_ONLY = 1
    #: Detach when the last opener closes. thinwatchd never sets it: the pool must outlive us.
    AUTOCLEAR = 4
    #: Scan partitions.
    PARTSCAN = 8
    #: Use direct I/O on the backing file (LOOP_CONFIGURE; else LOOP_SET_DIRECT_IO).
    DIRECT_IO = 16
