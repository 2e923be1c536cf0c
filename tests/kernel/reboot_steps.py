"""The two halves of the guest-reboot test, each run in its own boot of the same scratch disk.

    python -m tests.kernel.reboot_steps before   # build the pool, write a pattern, power off
    python -m tests.kernel.reboot_steps after    # a fresh kernel: rebuild over the metadata, read

Each prints `checksum=<sha256>` for tests/reboot/test_guest_reboot.py to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys

from testbed.harness import DaemonProcess, GiB, MiB, create_thin, scratch_dir, write_config
from tests.kernel.harness import read_checksum, write_pattern
from thinwatchd.base.units import Bytes, Sectors, bytes_to_sectors
from thinwatchd.kernel.api import Target
from thinwatchd.kernel.dm import DeviceMapper
from thinwatchd.kernel.nodes import UdevNodes

POOL = "reboot-pool"
THIN = "reboot-thin"
SIZE = 64 * MiB


def main(step: str) -> int:
    directory = scratch_dir() / "reboot"
    directory.mkdir(exist_ok=True)
    config = write_config(
        directory / "config.yaml",
        {
            POOL: {
                "data_file": str(directory / "data"),
                "metadata_file": str(directory / "metadata"),
                "data_size": "256MiB",
                "metadata_size": "16MiB",
            }
        },
    )
    daemon = DaemonProcess(config, directory / f"daemon-{step}.log")
    try:
        daemon.start()
        with DeviceMapper() as dm:
            if step == "before":
                thin = create_thin(dm, POOL, THIN, 0, 1 * GiB)
                checksum = write_pattern(thin, SIZE, b"survive a reboot")
            else:
                info = dm.info(POOL)
                assert info is not None
                dm.create(THIN)  # thin volume 0 exists in the metadata: only activate it
                pool_dev = f"{os.major(info.dev)}:{os.minor(info.dev)}"
                length = bytes_to_sectors(Bytes(GiB))
                dm.load_table(THIN, [Target(Sectors(0), length, "thin", f"{pool_dev} 0")])
                UdevNodes().resume_synced(dm, THIN)
                checksum = read_checksum(f"/dev/mapper/{THIN}", SIZE)
            dm.remove(THIN)
        assert daemon.stop() == 0
    finally:
        daemon.close()
        print(daemon.log(), file=sys.stderr)
    subprocess.run(["sync"], check=True)
    print(f"checksum={checksum}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
