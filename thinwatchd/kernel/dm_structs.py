"""The dm_ioctl structs to and from bytes, by the layouts in dm_abi.py: the header, target specs
(a table to load, a table or status read back), the device list and a target message."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thinwatchd.base.units import Sectors
from thinwatchd.kernel import dm_abi as _abi
from thinwatchd.kernel.api import DmDevice, Target

__all__ = [
    "DmHeader",
    "align8",
    "cstring",
    "encode",
    "pack_header",
    "pack_message",
    "pack_targets",
    "parse_name_list",
    "parse_targets",
    "unpack_header",
]


_ENCODING = "utf-8"


def encode(text: str) -> bytes:
    return text.encode(_ENCODING, "surrogateescape")


def cstring(data: bytes | bytearray, offset: int = 0) -> str:
    end = data.find(b"\0", offset)
    raw = data[offset:] if end < 0 else data[offset:end]
    return bytes(raw).decode(_ENCODING, "surrogateescape")


def align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class DmHeader:
    """A struct dm_ioctl, as sent or as answered."""

    version: tuple[int, int, int] = (4, 0, 0)
    data_size: int = _abi.HEADER.size
    data_start: int = _abi.DATA_START
    target_count: int = 0
    open_count: int = 0
    flags: int = 0
    event_nr: int = 0
    dev: int = 0
    name: str = ""
    uuid: str = ""


def pack_header(h: DmHeader) -> bytes:
    """Return the 312 bytes of h (name and uuid NUL-padded; padding and data[7] zero)."""
    return _abi.HEADER.pack(
        *h.version,
        h.data_size,
        h.data_start,
        h.target_count,
        h.open_count,
        h.flags,
        h.event_nr,
        0,
        h.dev,
        encode(h.name),
        encode(h.uuid),
        b"",
    )


def unpack_header(buf: bytes | bytearray) -> DmHeader:
    """Parse the first 312 bytes of buf."""
    v0, v1, v2, size, start, count, opens, flags, event_nr, _pad, dev, name, uuid, _data = (
        _abi.HEADER.unpack_from(buf)
    )
    return DmHeader(
        version=(v0, v1, v2),
        data_size=size,
        data_start=start,
        target_count=count,
        open_count=opens,
        flags=flags,
        event_nr=event_nr,
        dev=dev,
        name=cstring(name),
        uuid=cstring(uuid),
    )


def pack_targets(targets: Sequence[Target]) -> bytes:
    """Return a DM_TABLE_LOAD payload: specs with ``next`` relative to each spec, 8-aligned."""
    out = bytearray()
    for t in targets:
        ttype, params = encode(t.target_type), encode(t.params)
        if not ttype or len(ttype) >= _abi.DM_MAX_TYPE_NAME or b"\0" in ttype + params:
            raise ValueError(f"invalid target type or params: {t.target_type!r} {t.params!r}")
        if t.start < 0 or t.length <= 0:
            raise ValueError(f"invalid target extent: start {t.start}, length {t.length}")
        plen = align8(len(params) + 1)
        out += _abi.TARGET_SPEC.pack(t.start, t.length, 0, _abi.TARGET_SPEC.size + plen, ttype)
        out += params.ljust(plen, b"\0")
    return bytes(out)


def parse_targets(data: bytes, count: int) -> list[Target]:
    """Parse a DM_TABLE_STATUS answer: count specs, ``next`` relative to the data start."""
    targets, offset = [], 0
    for _ in range(count):
        start, length, _status, nxt, ttype = _abi.TARGET_SPEC.unpack_from(data, offset)
        params = cstring(data, offset + _abi.TARGET_SPEC.size)
        targets.append(Target(Sectors(start), Sectors(length), cstring(ttype), params))
        offset = nxt
    return targets


def parse_name_list(data: bytes) -> list[DmDevice]:
    """Parse a DM_LIST_DEVICES answer (interface >= 4.37: event_nr after each name)."""
    devices: list[DmDevice] = []
    offset = 0
    if len(data) < _abi.NAME_LIST_HEAD.size:
        return devices
    while True:
        dev, nxt = _abi.NAME_LIST_HEAD.unpack_from(data, offset)
        if dev == 0 and offset == 0:
            return devices  # "nl->dev = 0: flags no data"
        name_at = offset + _abi.NAME_LIST_HEAD.size
        name = cstring(data, name_at)
        event_nr, _flags = _abi.NAME_LIST_TAIL.unpack_from(
            data, align8(name_at + len(encode(name)) + 1)
        )
        devices.append(DmDevice(name, dev, event_nr))
        if nxt == 0:
            return devices
        offset += nxt


def pack_message(sector: int, message: str) -> bytes:
    """Return a DM_TARGET_MSG payload: u64 sector, the message, NUL, zero-padded to 8."""
    raw = encode(message)
    if not raw.strip() or b"\0" in raw:
        raise ValueError(f"invalid target message {message!r}")
    body = _abi.TARGET_MSG.pack(sector) + raw + b"\0"
    return body.ljust(align8(len(body)), b"\0")
