"""The command line: `thinwatchd run | check-config | status [--json]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from thinwatchd import __version__
from thinwatchd.config import load_settings
from thinwatchd.errors import (
    EX_CONFIG,
    EX_DATAERR,
    ConfigError,
    PoolMismatchError,
    ThinwatchError,
)
from thinwatchd.logs import setup_logging
from thinwatchd.settings import DEFAULT_CONFIG_PATH

__all__ = ["main"]

log = logging.getLogger("thinwatchd")

EX_UNAVAILABLE = 69
_DM_HINT = "is device-mapper in this kernel? (modprobe dm-thin-pool loop)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinwatchd", description="Keep device-mapper thin pools on loopback files growing."
    )
    parser.add_argument("--version", action="version", version=f"thinwatchd {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"config file (default {DEFAULT_CONFIG_PATH})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the pools and keep them growing (the daemon)")
    run.add_argument(
        "--log-target",
        choices=("auto", "journal", "stderr"),
        default="auto",
        help="where to log (auto: the journal when started by systemd)",
    )
    sub.add_parser("check-config", help="validate the config file and exit")
    status = sub.add_parser("status", help="show each pool's live state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (78 for configuration errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "status":
            return _status(args.config, as_json=args.json)
        return _run(args.config, args.log_target)
    except ConfigError as exc:
        print(f"thinwatchd: {exc.located(args.config)}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


def _check_config(path: Path) -> int:
    settings = load_settings(path)
    names = ", ".join(p.name for p in settings.pools)
    print(
        f"{path}: OK ({len(settings.pools)} pool{'s' if len(settings.pools) != 1 else ''}: {names})"
    )
    return 0


def _status(path: Path, *, as_json: bool) -> int:
    from thinwatchd.kernel.dm import DeviceMapper
    from thinwatchd.report import format_table, pool_report

    settings = load_settings(path)
    try:
        dm = DeviceMapper()
    except ThinwatchError as exc:
        print(f"thinwatchd: cannot open device-mapper: {exc}; {_DM_HINT}", file=sys.stderr)
        return EX_UNAVAILABLE
    with dm:
        reports = [pool_report(dm, p) for p in settings.pools]
    if as_json:
        print(json.dumps({"pools": [r.as_json() for r in reports]}, indent=2))
    else:
        print(format_table(reports))
    return 0 if all(r.active for r in reports) else 1


def _run(path: Path, log_target: str) -> int:
    from thinwatchd.daemon import Daemon
    from thinwatchd.pool import PoolSetupError
    from thinwatchd.runtime import open_kernel, udev_monitor
    from thinwatchd.thincheck import thin_check

    setup_logging("info", target=log_target)
    settings = load_settings(path)  # fail fast, before touching the kernel
    setup_logging(settings.daemon.log_level, target=log_target)
    try:
        kernel = open_kernel()
    except ThinwatchError as exc:
        log.error("cannot open the kernel interfaces: %s; %s", exc, _DM_HINT)
        return EX_UNAVAILABLE
    daemon = Daemon(path, kernel, check_metadata=thin_check, udev_monitor=udev_monitor())
    try:
        daemon.start()
    except ConfigError:
        raise
    except PoolMismatchError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    except PoolSetupError as exc:
        log.error("%s", exc)
        return EX_DATAERR
    except ThinwatchError as exc:
        log.error("start-up failed: %s", exc)
        return 1
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
