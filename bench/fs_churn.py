"""The filesystem workload of bench/peers.py, run as its own process (so its progress can be read
from /proc/<pid>/io and a stuck one killed):

    python -m bench.fs_churn DIR MIB SECONDS

Writes files of 64 KiB to 4 MiB (uniform, fixed seed) into DIR, each fsynced, and deletes every
fourth file written so far after each fourth file (freed blocks the filesystem may reuse), until
MIB MiB are written or SECONDS have passed. A failed write or fsync (a pool that never grows)
ends it. Prints one JSON line: files, bytes, deleted, stopped_by, error.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, 4 * MiB)


def churn(directory: Path, limit: int, seconds: float) -> dict[str, object]:
    rng = random.Random(10)
    blob = os.urandom(SIZES[1])
    deadline = time.monotonic() + seconds
    written = files = deleted = 0
    result: dict[str, object] = {"stopped_by": "mib"}
    try:
        while written < limit:
            if time.monotonic() >= deadline:
                result["stopped_by"] = "seconds"
                break
            size = rng.randint(*SIZES) // 4096 * 4096
            fd = os.open(directory / f"f{files:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, blob[:size])
                os.fsync(fd)
            finally:
                os.close(fd)
            written += size
            files += 1
            if files % 4 == 0:
                (directory / f"f{deleted * 4:05d}").unlink()
                deleted += 1
    except OSError as exc:
        result.update(stopped_by="error", error=f"{exc.strerror} (errno {exc.errno})")
    result.update(files=files, bytes=written, deleted=deleted)
    return result


def main() -> None:
    directory, mib, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    result = churn(directory, mib * MiB, seconds)
    print(json.dumps(result), flush=True)
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
