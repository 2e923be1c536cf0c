"""device-mapper ABI: packing against hand-computed byte layouts, and _ioctl's buffer handling.

The expected bytes are written out by hand from include/uapi/linux/dm-ioctl.h (x86-64, little
endian), not produced by the code under test.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from thinwatchd.base.errors import KernelError
from thinwatchd.base.units import Sectors
from thinwatchd.kernel import dm_abi
from thinwatchd.kernel.api import DmDevice, Target
from thinwatchd.kernel.dm import DeviceMapper, check_name
from thinwatchd.kernel.dm_structs import (
    DmHeader,
    pack_header,
    pack_message,
    pack_targets,
    parse_name_list,
    parse_targets,
    unpack_header,
)

Cmd = dm_abi.Command
F = dm_abi.DmFlag


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


# --- ioctl numbers ---------------------------------------------------------------------------


def test_struct_sizes_match_the_kernel_header() -> None:
    assert dm_abi.HEADER.size == 312
    assert dm_abi.DATA_START == 312 and dm_abi.DATA_START % 8 == 0
    assert dm_abi.TARGET_SPEC.size == 40
    assert dm_abi.NAME_LIST_HEAD.size == 12  # offsetof(struct dm_name_list, name)


@pytest.mark.parametrize("cmd", list(Cmd))
def test_ioctl_numbers_follow_iowr(cmd: Cmd) -> None:
    # _IOWR: dir READ|WRITE (3) << 30, size << 16, type << 8, nr
    assert cmd.request == (3 << 30) | (312 << 16) | (0xFD << 8) | cmd.value
    assert cmd.request == 0xC138FD00 | cmd.value


def test_known_ioctl_numbers() -> None:
    assert Cmd.VERSION.request == 0xC138FD00
    assert Cmd.LIST_DEVICES.request == 0xC138FD02
    assert Cmd.DEV_SUSPEND.request == 0xC138FD06
    assert Cmd.TABLE_LOAD.request == 0xC138FD09
    assert Cmd.TABLE_STATUS.request == 0xC138FD0C
    assert Cmd.TARGET_MSG.request == 0xC138FD0E
    assert Cmd.DEV_ARM_POLL.request == 0xC138FD10
    assert Cmd.GET_TARGET_VERSION.request == 0xC138FD11


def test_flag_values() -> None:
    assert (F.READONLY, F.SUSPEND, F.PERSISTENT_DEV, F.STATUS_TABLE) == (0x1, 0x2, 0x8, 0x10)
    assert (F.ACTIVE_PRESENT, F.INACTIVE_PRESENT, F.BUFFER_FULL) == (0x20, 0x40, 0x100)
    assert (F.SKIP_LOCKFS, F.NOFLUSH, F.QUERY_INACTIVE_TABLE) == (0x400, 0x800, 0x1000)
    assert (F.UEVENT_GENERATED, F.UUID, F.DATA_OUT) == (0x2000, 0x4000, 0x10000)
    assert set(dm_abi.MIN_VERSION) == set(Cmd) == set(dm_abi.VALID_FLAGS)
    assert dm_abi.MIN_VERSION[Cmd.DEV_ARM_POLL] == (4, 37, 0)
    assert dm_abi.MIN_VERSION[Cmd.LIST_DEVICES] == (4, 37, 0)


# --- packing ---------------------------------------------------------------------------------

HEADER_BYTES = (
    # version
    u32(4)
    + u32(37)
    + u32(0)
    + bytes.fromhex("00040000")  # data_size 1024
    + bytes.fromhex("38010000")  # data_start 312
    + bytes.fromhex("02000000")  # target_count 2
    + bytes.fromhex("ffffffff")  # open_count -1 (s32)
    + bytes.fromhex("10200000")  # flags STATUS_TABLE | UEVENT_GENERATED
    + bytes.fromhex("34124d0d")  # event_nr / cookie 0x0d4d1234
    + bytes(4)  # padding
    + bytes.fromhex("03fd000000000000")  # dev 253:3 = (253 << 8) | 3
    # name[128] @48
    + b"pool"
    + bytes(124)
    # uuid[129] @176
    + b"abc"
    + bytes(126)
    + bytes(7)  # data[7] @305
)


def test_header_layout_by_hand() -> None:
    dev = os.makedev(253, 3)
    h = DmHeader((4, 37, 0), 1024, 312, 2, -1, 0x2010, 0x0D4D1234, dev, "pool", "abc")
    assert len(HEADER_BYTES) == 312
    assert pack_header(h) == HEADER_BYTES
    assert unpack_header(HEADER_BYTES) == h
    assert HEADER_BYTES[48:52] == b"pool" and HEADER_BYTES[176:179] == b"abc"


def test_table_load_payload_two_targets_padded_to_8() -> None:
    payload = pack_targets(
        [
            Target(Sectors(0), Sectors(2048), "thin-pool", "7:1 7:0 128 16"),
            Target(Sectors(2048), Sectors(1024), "error", ""),
        ]
    )
    expected = (
        # spec 1 @0: params "7:1 7:0 128 16" = 14 bytes + NUL = 15 -> 16; next = 40 + 16 = 56
        u64(0)
        + u64(2048)
        + u32(0)
        + u32(56)
        + b"thin-pool"
        + bytes(7)
        + b"7:1 7:0 128 16\0"
        + bytes(1)
        # spec 2 @56: params "" = NUL -> 8; next = 40 + 8 = 48 (relative to this spec)
        + u64(2048)
        + u64(1024)
        + u32(0)
        + u32(48)
        + b"error"
        + bytes(11)
        + bytes(8)
    )
    assert len(expected) == 104
    assert payload == expected


def test_table_load_refuses_what_the_kernel_would() -> None:
    with pytest.raises(ValueError):
        pack_targets([Target(Sectors(0), Sectors(8), "a-type-name-too-long", "")])
    with pytest.raises(ValueError):
        pack_targets([Target(Sectors(0), Sectors(8), "linear", "x\0y")])
    with pytest.raises(ValueError):
        pack_targets([Target(Sectors(0), Sectors(0), "error", "")])


def test_message_payload() -> None:
    # u64 sector, "create_thin 0" (13 bytes) + NUL = 22 bytes, padded to 24
    assert pack_message(0, "create_thin 0") == u64(0) + b"create_thin 0\0" + bytes(2)
    with pytest.raises(ValueError):
        pack_message(0, "  ")


LIST_DEVICES_DATA = (
    # record 1 @0: dev 253:0, next 32, "pool\0" @12..17, align 8 -> 24: event_nr 7, flags 0
    bytes.fromhex("00fd000000000000")
    + u32(32)
    + b"pool\0"
    + bytes(7)
    + u32(7)
    + u32(0)
    # record 2 @32: dev 253:1, next 0, "thin-volume-1\0" @44..58 -> 64: event_nr 3, flags 0
    + bytes.fromhex("01fd000000000000")
    + u32(0)
    + b"thin-volume-1\0"
    + bytes(6)
    + u32(3)
    + u32(0)
)


def test_parse_list_devices_with_event_nr() -> None:
    assert len(LIST_DEVICES_DATA) == 72
    assert parse_name_list(LIST_DEVICES_DATA) == [
        DmDevice("pool", os.makedev(253, 0), 7),
        DmDevice("thin-volume-1", os.makedev(253, 1), 3),
    ]


def test_parse_list_devices_empty() -> None:
    assert parse_name_list(b"") == []
    assert parse_name_list(bytes(16)) == []  # dev 0: "flags no data"


POOL_STATUS = b"1 10/4096 100/512 - rw discard_passdown queue_if_no_space - 1024"
TABLE_STATUS_DATA = (
    # spec 1 @0: status text 64 bytes + NUL = 65 -> 72; next spec @112 (relative to the DATA
    # start, not to this spec as in TABLE_LOAD)
    u64(0)
    + u64(65536)
    + u32(0)
    + u32(112)
    + b"thin-pool"
    + bytes(7)
    + POOL_STATUS
    + b"\0"
    + bytes(7)
    # spec 2 @112, next (unused after the last) 160
    + u64(65536)
    + u64(8)
    + u32(0)
    + u32(160)
    + b"error"
    + bytes(11)
    + b"\0"
)


def test_parse_table_status_reply() -> None:
    assert len(POOL_STATUS) == 64
    assert parse_targets(TABLE_STATUS_DATA, 2) == [
        Target(Sectors(0), Sectors(65536), "thin-pool", POOL_STATUS.decode()),
        Target(Sectors(65536), Sectors(8), "error", ""),
    ]
    assert parse_targets(b"", 0) == []


def test_check_name() -> None:
    check_name("pool-1")
    check_name("x" * 127)
    for bad in ("", "a/b", "control", ".", "..", "x" * 128, "a\0b"):
        with pytest.raises(ValueError):
            check_name(bad)


# --- _ioctl with an injected ioctl function --------------------------------------------------

Handler = Callable[[DmHeader, bytearray], None]


class FakeIoctl:
    """Records every call; handlers answer per command by editing the buffer."""

    def __init__(self, handlers: dict[Cmd, Handler] | None = None) -> None:
        self.handlers = handlers or {}
        self.calls: list[tuple[Cmd, DmHeader, bytes]] = []

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        cmd = Cmd(request & 0xFF)
        assert request == cmd.request
        hdr = unpack_header(buf)
        self.calls.append((cmd, hdr, bytes(buf)))
        if cmd in self.handlers:
            self.handlers[cmd](hdr, buf)
        return 0


def answer(buf: bytearray, hdr: DmHeader, **changes: object) -> None:
    fields = {**hdr.__dict__, "version": (4, 47, 0), "data_size": 305, **changes}
    buf[:312] = pack_header(DmHeader(**fields))  # type: ignore[arg-type]


def list_devices_answer(count: int) -> Handler:
    names = [f"dev-{i:03d}-with-a-longish-name-to-fill-buffers" for i in range(count)]
    records = b""
    for i, name in enumerate(names):
        raw = name.encode() + b"\0"
        pad = (-(12 + len(raw))) % 8
        size = 12 + len(raw) + pad + 8
        nxt = 0 if i == count - 1 else size
        records += u64(os.makedev(253, i)) + u32(nxt) + raw + bytes(pad) + u32(i) + u32(0)

    def handle(hdr: DmHeader, buf: bytearray) -> None:
        if hdr.data_size - 312 < len(records):
            answer(buf, hdr, flags=hdr.flags | F.BUFFER_FULL)
            return
        buf[312 : 312 + len(records)] = records
        answer(buf, hdr, data_size=312 + len(records))

    return handle


def test_buffer_full_grows_until_the_answer_fits() -> None:
    fake = FakeIoctl({Cmd.LIST_DEVICES: list_devices_answer(100)})
    devices = DeviceMapper(fd=-1, ioctl=fake).list_devices()
    assert [d.event_nr for d in devices] == list(range(100))
    assert devices[42].name.startswith("dev-042") and devices[42].dev == os.makedev(253, 42)
    sizes = [h.data_size for _c, h, _b in fake.calls]
    assert sizes == [1024, 2048, 4096, 8192]  # 100 records of 64 bytes need 6400
    for _cmd, hdr, raw in fake.calls:
        assert len(raw) == hdr.data_size
        assert hdr.version == (4, 37, 0) and hdr.data_start == 312
        assert hdr.name == "" and hdr.event_nr == 0 and hdr.flags == 0


def test_table_load_header_and_payload_reach_the_kernel() -> None:
    fake = FakeIoctl()
    targets = [
        Target(Sectors(0), Sectors(2048), "thin-pool", "7:1 7:0 128 16"),
        Target(Sectors(2048), Sectors(1024), "error", ""),
    ]
    DeviceMapper(fd=-1, ioctl=fake).load_table("pool", targets)
    ((cmd, hdr, raw),) = fake.calls
    assert cmd is Cmd.TABLE_LOAD
    assert hdr.target_count == 2 and hdr.name == "pool" and hdr.data_size == 312 + 104
    assert raw[312:] == pack_targets(targets)
    assert hdr.data_size <= 1024  # small enough for fcntl.ioctl to release the GIL


def test_errors_name_the_operation_and_the_device() -> None:
    def fail(hdr: DmHeader, buf: bytearray) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    dm = DeviceMapper(fd=-1, ioctl=FakeIoctl({Cmd.TABLE_LOAD: fail}))
    with pytest.raises(KernelError) as info:
        dm.load_table("pool", [Target(Sectors(0), Sectors(8), "thin-pool", "bad")])
    err = info.value
    assert (err.op, err.device, err.errno) == ("load_table (DM_TABLE_LOAD)", "pool", errno.EINVAL)
    assert "load_table" in str(err) and "pool" in str(err) and "EINVAL" in str(err)
    assert "0 8 thin-pool bad" in str(err)


def test_info_is_none_for_a_missing_device() -> None:
    def enxio(hdr: DmHeader, buf: bytearray) -> None:
        raise OSError(errno.ENXIO, "No such device or address")

    assert DeviceMapper(fd=-1, ioctl=FakeIoctl({Cmd.DEV_STATUS: enxio})).info("nope") is None


def test_eintr_is_retried() -> None:
    interrupted = [True]

    def once(hdr: DmHeader, buf: bytearray) -> None:
        if interrupted.pop() if interrupted else False:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        answer(buf, hdr, event_nr=hdr.event_nr + 1)

    fake = FakeIoctl({Cmd.DEV_WAIT: once})
    assert DeviceMapper(fd=-1, ioctl=fake).wait("pool", 5) == 6
    assert len(fake.calls) == 2


def test_wait_uses_a_header_only_buffer_and_ignores_buffer_full() -> None:
    def full(hdr: DmHeader, buf: bytearray) -> None:
        answer(buf, hdr, event_nr=9, flags=hdr.flags | F.BUFFER_FULL)

    fake = FakeIoctl({Cmd.DEV_WAIT: full})
    assert DeviceMapper(fd=-1, ioctl=fake).wait("pool", 8) == 9
    ((_cmd, hdr, raw),) = fake.calls
    assert len(raw) == 312 and hdr.event_nr == 8 and hdr.flags == F.NOFLUSH


def test_message_reply_overflow_is_not_retried() -> None:
    def full(hdr: DmHeader, buf: bytearray) -> None:
        answer(buf, hdr, flags=hdr.flags | F.BUFFER_FULL | F.DATA_OUT)

    fake = FakeIoctl({Cmd.TARGET_MSG: full})
    with pytest.raises(KernelError) as info:
        DeviceMapper(fd=-1, ioctl=fake).message("pool", "create_thin 0")
    assert info.value.errno == errno.ENOBUFS
    assert len(fake.calls) == 1  # the message ran once; running it again would repeat it


def test_message_reply() -> None:
    def reply(hdr: DmHeader, buf: bytearray) -> None:
        buf[312:318] = b"hello\0"
        answer(buf, hdr, flags=F.DATA_OUT, data_size=318)

    dm = DeviceMapper(fd=-1, ioctl=FakeIoctl({Cmd.TARGET_MSG: reply}))
    assert dm.message("p", "x") == "hello"


def test_resume_passes_the_cookie_and_returns_the_uevent() -> None:
    def resumed(hdr: DmHeader, buf: bytearray) -> None:
        answer(buf, hdr, flags=F.UEVENT_GENERATED | F.ACTIVE_PRESENT, event_nr=0)

    fake = FakeIoctl({Cmd.DEV_SUSPEND: resumed})
    assert DeviceMapper(fd=-1, ioctl=fake).resume("pool", 0x00400000 | 0x1234) is True
    ((_cmd, hdr, raw),) = fake.calls
    assert hdr.event_nr == 0x00401234 and hdr.flags == 0 and len(raw) == 312


def test_suspend_flags_and_event_nr_masking() -> None:
    fake = FakeIoctl()
    dm = DeviceMapper(fd=-1, ioctl=fake)
    dm.suspend("pool", noflush=True)
    dm.arm_poll()
    (_c1, suspend, _r1), (_c2, arm, _r2) = fake.calls
    assert suspend.flags == F.SUSPEND | F.NOFLUSH and suspend.event_nr == 0
    assert arm.version == (4, 37, 0) and arm.name == "" and arm.flags == 0


def test_table_status_parses_the_reply_and_grows() -> None:
    def status(hdr: DmHeader, buf: bytearray) -> None:
        assert hdr.flags == F.STATUS_TABLE
        if hdr.data_size < 2048:
            answer(buf, hdr, flags=hdr.flags | F.BUFFER_FULL, target_count=2)
            return
        buf[312 : 312 + len(TABLE_STATUS_DATA)] = TABLE_STATUS_DATA
        answer(buf, hdr, target_count=2, data_size=312 + len(TABLE_STATUS_DATA))

    fake = FakeIoctl({Cmd.TABLE_STATUS: status})
    assert DeviceMapper(fd=-1, ioctl=fake).table("pool")[1] == Target(
        Sectors(65536), Sectors(8), "error", ""
    )
    assert [h.data_size for _c, h, _r in fake.calls] == [1024, 2048]
