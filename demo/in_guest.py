"""The demo, run inside the systemd guest by scripts/demo: thinwatchd's main job, end to end.

Installs the real unit and a config, starts the service, fills a thin volume that starts at
64 MiB with 600 MiB (and more), and shows what an admin sees: `thinwatchd status` before and
after, the journal's growth entries with their fields, and `systemctl status`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from testbed.harness import (
    REPO,
    MiB,
    create_thin,
    dd_zero,
    installed_unit,
    pool_config,
    scratch_dir,
)
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper

POOL = "docker-pool"
THINWATCHD = str(REPO / ".venv" / "bin" / "thinwatchd")


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def sh(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    out = (done.stdout + done.stderr).rstrip()
    print(out, flush=True)
    return out


def main() -> int:
    directory = scratch_dir() / "demo"
    directory.mkdir(exist_ok=True)
    config = pool_config(POOL, directory, data_size="64MiB", metadata_size="64MiB")
    config["daemon"] = {"check_interval": "5s", "metrics_file": str(directory / "thinwatchd.prom")}
    with installed_unit(directory, config) as unit:
        banner(f"config /etc/thinwatchd/config.yaml: pool {POOL}, data file starting at 64 MiB")
        print(unit.config_path.read_text(), flush=True)
        banner("systemctl start thinwatchd (returns once READY=1: the pool's node exists)")
        start = time.monotonic()
        subprocess.run(["systemctl", "start", unit.name], check=True)
        node = f"/dev/mapper/{POOL}"
        print(f"started in {time.monotonic() - start:.1f} s; {node} exists: {os.path.exists(node)}")
        banner("thinwatchd status (before)")
        sh(THINWATCHD, "--config", str(unit.config_path), "status")
        with DeviceMapper() as dm:
            thin = create_thin(dm, POOL, "demo-thin", 0, 8192 * MiB)
            for mib in (600, 3000):
                banner(f"dd if=/dev/zero of={thin} bs=1M count={mib} oflag=direct")
                seconds, code, err = dd_zero(thin, mib)
                print(err.strip().splitlines()[-1] if err.strip() else "", flush=True)
                print(f"exit {code}, {mib / seconds:.0f} MiB/s", flush=True)
            banner("journalctl -u thinwatchd (growth entries, with their structured fields)")
            entries = subprocess.run(
                [
                    "journalctl",
                    "-u",
                    unit.name,
                    "-o",
                    "json",
                    "--no-pager",
                    f"MESSAGE_ID={MessageId.DATA_GROWN.value}",
                ],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.splitlines()
            for line in entries:
                entry = json.loads(line)
                print(entry["MESSAGE"])
                keys = (
                    "POOL",
                    "OLD_SIZE_BYTES",
                    "NEW_SIZE_BYTES",
                    "GROWTH_MS",
                    "DATA_USED_BYTES",
                    "DATA_TOTAL_BYTES",
                    "POOL_MODE",
                )
                print("    " + " ".join(f"{k}={entry.get(k)}" for k in keys), flush=True)
            banner("kernel log: low-water events and growths")
            kernel_log = subprocess.run(["dmesg"], capture_output=True, text=True, check=False)
            for line in kernel_log.stdout.splitlines():
                if "thin" in line and (
                    "low water" in line or "growing" in line or "out-of-data-space" in line
                ):
                    print(line)
            banner("thinwatchd status (after)")
            sh(THINWATCHD, "--config", str(unit.config_path), "status")
            banner("systemctl status thinwatchd")
            sh("systemctl", "status", "--no-pager", "--lines=0", unit.name)
            dm.remove("demo-thin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
