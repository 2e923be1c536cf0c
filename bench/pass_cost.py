"""What the daemon's passes cost in CPU with many pools, on the in-memory kernel (no guest).

    .venv/bin/python -m bench.pass_cost [--pools 1000] [--growths 20]

Builds the engine tests' scale bed (testbed/scale.py: N small pools on the fake
kernel, one filesystem), then measures the process CPU of one idle safety check and of
``--growths`` pools reaching their marks 10 ms apart, each grown in a pass of its own, plus
the publication due after them. Only ratios between runs of one machine mean anything: the
fake kernel's calls cost far less than the real ioctls (bench/run_scale measures those).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import tempfile
import time

import thinwatchd.base.workers
import thinwatchd.daemon.daemon
import thinwatchd.growth.schedule
import thinwatchd.publish.publisher
from testbed.scale import Bed
from thinwatchd.thin.status import ThinPoolWorkingStatus, parse_pool_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=1000)
    parser.add_argument("--growths", type=int, default=20)
    args = parser.parse_args()
    # 1 s where publications are not rate-limited (for comparing an older checkout).
    publish_seconds: float = getattr(thinwatchd.publish.publisher, "PUBLISH_SECONDS", 1.0)
    # The bed's clock jumps an hour to its safety check, so every pool is "full soon": said in
    # the journal, which is not what is measured here.
    logging.getLogger("thinwatchd").setLevel(logging.ERROR)
    # As the engine tests run it: reconciles inline (the bed's), one thread (CPU is the
    # process's).
    thinwatchd.base.workers.MAX_THREADS = 1
    bed = Bed(pathlib.Path(tempfile.mkdtemp(prefix="pass-cost-")), args.pools)
    try:
        d = bed.daemon
        bed.clock.now += publish_seconds
        d.loop.run_once(max_wait=0)  # anything due
        bed.clock.now += 3600.0
        started = time.process_time()
        d.loop.run_once(max_wait=0)  # the safety check
        check = time.process_time() - started
        bed.clock.now += publish_seconds
        d.loop.run_once(max_wait=0)
        growths = 0.0
        for name in bed.names[: args.growths]:
            status = parse_pool_status(bed.fake.status(name)[0].params)
            assert isinstance(status, ThinPoolWorkingStatus)
            bed.fake.write_blocks(name, status.data_free - d.pools[name].pool.table.low_water_mark)
            bed.clock.now += 0.01
            started = time.process_time()
            d.dm_events.check()
            growths += time.process_time() - started
        bed.clock.now += publish_seconds
        started = time.process_time()
        d.loop.run_once(max_wait=0)  # the publication due after them
        growths += time.process_time() - started
    finally:
        bed.close()
    print(
        json.dumps(
            {
                "pools": args.pools,
                "idle_check_cpu_ms": round(check * 1000, 1),
                f"cpu_ms_for_{args.growths}_growth_passes": round(growths * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
