"""The command line: `thinwatchd [--config FILE] run | check-config | status [--json]`."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from thinwatchd import __version__
from thinwatchd.base.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    ConfigError,
    PoolMismatchError,
    PoolSetupError,
    ThinwatchError,
)
from thinwatchd.base.logs import setup_logging
from thinwatchd.config.load import load_settings, printable_path
from thinwatchd.config.settings import DEFAULT_CONFIG_PATH
from thinwatchd.daemon.instance_lock import (
    DEFAULT_LOCK_PATH,
    InstanceLockedError,
    LockFileError,
    hold_instance_lock,
)
from thinwatchd.publish.estimates import ESTIMATES_NAME, read_estimates

__all__ = ["main"]

log = logging.getLogger("thinwatchd")

_DM_HINT = "is device-mapper in this kernel? (modprobe dm-thin-pool loop)"
_NO_DRIVER = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_NO_PERMISSION = (errno.EACCES, errno.EPERM)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinwatchd", description="Keep device-mapper thin pools on loopback files growing."
    )
    parser.add_argument("--version", action="version", version=f"thinwatchd {__version__}")
    config_help = f"config file (default {DEFAULT_CONFIG_PATH})"
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the pools and keep them growing (the daemon)")
    run.add_argument(
        "--log-target",
        choices=("auto", "journal", "stderr"),
        default="auto",
        help="where to log (auto: the journal when started by systemd)",
    )
    check = sub.add_parser("check-config", help="validate the config file and exit")
    status = sub.add_parser("status", help="show each pool's live state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    lock_help = {
        run: "the lock that keeps a second instance out; the estimates for status are written "
        f"beside it, as {ESTIMATES_NAME}",
        status: f"the running daemon's lock; its fill rates and time to full are read from "
        f"{ESTIMATES_NAME} beside it",
    }
    for command, text in lock_help.items():
        command.add_argument(
            "--lock-file",
            type=Path,
            default=DEFAULT_LOCK_PATH,
            help=f"{text} (default {DEFAULT_LOCK_PATH})",
        )
    for command in (run, check, status):
        # Also after the command; SUPPRESS leaves the top-level value unless it is given here.
        command.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (78 for configuration errors)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "status":
            estimates = args.lock_file.with_name(ESTIMATES_NAME)
            return _status(args.config, estimates, as_json=args.json)
        return _run(args.config, args.log_target, args.lock_file)
    except ConfigError as exc:
        print(f"thinwatchd: {exc.located(printable_path(args.config))}", file=sys.stderr)
        return EX_CONFIG
    except InstanceLockedError as exc:
        print(f"thinwatchd: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except LockFileError as exc:
        print(f"thinwatchd: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except KeyboardInterrupt:
        return 130


def _kernel_refused(exc: ThinwatchError, command: str) -> tuple[str, int]:
    """Return what to say after exc opening device-mapper or loop, and the exit code."""
    code = getattr(exc, "errno", None)
    if code in _NO_PERMISSION:
        return f"{exc}; thinwatchd {command} needs root (CAP_SYS_ADMIN)", EX_NOPERM
    if code in _NO_DRIVER:
        return f"{exc}; {_DM_HINT}", EX_UNAVAILABLE
    return str(exc), EX_UNAVAILABLE


def _check_config(path: Path) -> int:
    settings = load_settings(path)
    names = ", ".join(p.name for p in settings.pools)
    count = f"{len(settings.pools)} pool{'s' if len(settings.pools) != 1 else ''}"
    print(f"{printable_path(path)}: OK ({count}: {names})")
    return 0


def _status(path: Path, estimates_path: Path, *, as_json: bool) -> int:
    from thinwatchd.kernel.dm import DeviceMapper
    from thinwatchd.publish.pool_report import format_table, pool_report, with_estimate

    settings = load_settings(path)
    try:
        dm = DeviceMapper()
    except ThinwatchError as exc:
        message, exit_code = _kernel_refused(exc, "status")
        print(f"thinwatchd: cannot open device-mapper: {message}", file=sys.stderr)
        return exit_code
    with dm:
        reports = [pool_report(dm, p) for p in settings.pools]
    # Fresh: written within a few of the daemon's safety checks (it writes after every pass).
    fresh = 3 * settings.daemon.check_interval + 30
    estimates = read_estimates(estimates_path, time.time(), fresh) or {}
    reports = [with_estimate(r, estimates.get(r.name)) for r in reports]
    if as_json:
        print(json.dumps({"pools": [r.as_json() for r in reports]}, indent=2))
    else:
        print(format_table(reports, str(estimates_path)))
    return 0 if all(r.active for r in reports) else 1


def _run(path: Path, log_target: str, lock_path: Path) -> int:
    setup_logging("info", target=log_target)
    settings = load_settings(path)  # fail fast, before touching the kernel
    setup_logging(settings.daemon.log_level, target=log_target)
    with hold_instance_lock(lock_path):  # before any pool is touched; held until we return
        return _run_locked(path, lock_path)


def _run_locked(path: Path, lock_path: Path) -> int:
    """Run the daemon; its run files (estimates, own suspends) go beside its lock."""
    from thinwatchd.daemon.daemon import Daemon
    from thinwatchd.growth.own_suspends import OWN_SUSPENDS_NAME
    from thinwatchd.kernel.runtime import open_kernel, process_age, udev_monitor
    from thinwatchd.pool.thin_check import end_all, thin_check

    try:
        kernel = open_kernel()
    except ThinwatchError as exc:
        message, exit_code = _kernel_refused(exc, "run")
        log.error("cannot open the kernel interfaces: %s", message)
        return exit_code
    daemon = Daemon(
        path,
        kernel,
        check_metadata=thin_check,
        udev_monitor=udev_monitor(),
        estimates_file=lock_path.with_name(ESTIMATES_NAME),
        own_suspends_file=lock_path.with_name(OWN_SUSPENDS_NAME),
        age=process_age(),
    )
    # Nothing thinwatchd started may outlive it (KillMode=process): a SIGTERM while pools are
    # still being built (a long thin_check at boot) ends the checks, then the process as before;
    # run() handles SIGTERM itself from READY=1 on.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main:
        signal.signal(signal.SIGTERM, _end_checks_then_die(end_all))
    try:
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
    finally:
        ended = end_all()  # a rebuild's check under way when SIGTERM came
        if ended:
            log.info("ended %d thin_check(s) still running", ended)
        if main:
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGTERM, previous)


def _end_checks_then_die(end_all: Callable[[], int]) -> Callable[[int, object], None]:
    def handler(signum: int, _frame: object) -> None:
        end_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handler


if __name__ == "__main__":
    sys.exit(main())
