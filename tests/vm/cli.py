"""``python -m tests.vm``: prepare the kernel cache, or run one command in a guest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.vm import qemu
from tests.vm.kernel_cache import KernelArtifacts, PrepareError, find_prepared, prepare
from tests.vm.results import new_results_dir
from tests.vm.runner import GuestConfig, Mode, Outcome, run_guest

__all__ = ["EXIT_MISSING", "main"]

EXIT_MISSING = 3
"""Exit code when qemu, busybox or the kernel is missing."""

_HOW_TO_GET = "run 'bash scripts/bootstrap' (as root) to install qemu and prepare the kernel"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.vm", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="boot a guest and run CMD in it",
        description="Boot a guest, run CMD as root in the checkout, exit with its exit code "
        "(124: timed out, 125: the guest died, 3: qemu or the kernel is missing).",
    )
    run.add_argument("--mode", type=Mode, choices=list(Mode), default=Mode.PLAIN)
    run.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    run.add_argument("--mem", type=int, default=2048, metavar="MiB")
    run.add_argument("--scratch", type=Path, metavar="PATH", help="persistent scratch image")
    run.add_argument("--keep-scratch", action="store_true", help="keep the temporary image")
    run.add_argument("--scratch-size", type=int, default=32, metavar="GiB", help="new image size")
    run.add_argument("--out", type=Path, metavar="DIR", help="where the returned files go")
    run.add_argument("--console", action="store_true", help="show the serial console live")
    run.add_argument("--quiet", action="store_true", help="no summary line on success")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    run.set_defaults(func=_run)

    prep = commands.add_parser("prepare", help="fetch the kernel and build the initramfs")
    prep.add_argument("--version", help="kernel version, e.g. 6.1.0-56-amd64")
    prep.set_defaults(func=_prepare)
    return parser


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("python -m tests.vm run: no command given after --", file=sys.stderr)
        return 2
    qemu.install_signal_handlers()
    kernel = _kernel()
    if kernel is None:
        return EXIT_MISSING
    if qemu.find_qemu() is None:
        _say(f"{qemu.QEMU_BINARY} is not installed: {_HOW_TO_GET}")
        return EXIT_MISSING
    config = GuestConfig(
        mode=args.mode,
        timeout=args.timeout,
        mem_mib=args.mem,
        scratch=args.scratch,
        keep_scratch=args.keep_scratch,
        scratch_size_gib=args.scratch_size,
        echo_console=args.console,
    )
    results_dir = new_results_dir(str(args.mode), args.out)
    sys.stdout.flush()
    result = run_guest(command, config, kernel, results_dir, sys.stdout.buffer, sys.stderr.buffer)
    if result.outcome is not Outcome.COMPLETED:
        _say(f"{result.describe()}\n--- console tail ---\n{result.console_tail()}")
    elif not args.quiet:
        _say(result.describe())
    if result.scratch is not None and config.scratch is None:
        _say(f"scratch image kept: {result.scratch}")
    return result.exit_code


def _prepare(args: argparse.Namespace) -> int:
    try:
        kernel = prepare(args.version, log=_say)
    except PrepareError as error:
        _say(f"cannot prepare the kernel: {error}")
        return EXIT_MISSING
    _say(f"ready: kernel {kernel.version} in {kernel.root}")
    return 0


def _kernel() -> KernelArtifacts | None:
    try:
        kernel = find_prepared() or prepare(log=_say)
        kernel.initramfs(_say)
    except PrepareError as error:
        _say(f"no guest kernel: {error}; {_HOW_TO_GET}")
        return None
    return kernel


def _say(message: str) -> None:
    print(f"tests.vm: {message}", file=sys.stderr, flush=True)
