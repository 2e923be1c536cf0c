"""The Debian package as tests get it: built by scripts/build-deb into .cache/deb, from HEAD.

tests/package/ checks the built package's contents on the host; it runs before the systemd
guest boots (pytest collects tests/package before tests/systemd), so the guest's
tests/systemd/test_debian_package.py finds both packages built and current. Run alone, that
test builds them in the guest (slower under TCG, never skipped).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

__all__ = [
    "REPO",
    "UPGRADE_SUFFIX",
    "build",
    "build_upgrade",
    "committed",
    "committed_files",
    "release_version",
    "upgrade_version",
]

REPO = Path(__file__).resolve().parents[2]
#: The newer package an upgrade test installs over the release: the same tree, version
#: <release>+upgradetest1 (dpkg orders it after <release>, and before a real next revision).
#: It is not linted: its tree is the release's, which is, and lintian would only add that the
#: release's initial-upload override does not apply to it (unused-override).
UPGRADE_SUFFIX = "+upgradetest1"


def committed(path: str) -> bytes:
    """A file of the tree as HEAD has it: what scripts/build-deb builds from."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "show", f"HEAD:{path}"], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def committed_files(directory: str) -> list[str]:
    """The paths of HEAD's files under directory."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD", "--", directory],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def release_version() -> str:
    """The version of debian/changelog's top entry (HEAD's)."""
    first = committed("debian/changelog").decode().splitlines()[0]
    found = re.match(r"thinwatchd \(([^)]+)\)", first)
    assert found, f"debian/changelog: no version in {first!r}"
    return found[1]


def upgrade_version() -> str:
    return release_version() + UPGRADE_SUFFIX


def build_upgrade() -> Path:
    """The newer package (UPGRADE_SUFFIX), built without lint."""
    return build(upgrade_version(), lint=False)


def build(version: str | None = None, *, lint: bool = True, timeout: float = 1800) -> Path:
    """Run scripts/build-deb (a no-op when the package is current); return the .deb's path."""
    args = ["bash", str(REPO / "scripts" / "build-deb")]
    if version is not None:
        args += ["--version", version]
    if not lint:
        args.append("--no-lint")
    done = subprocess.run(
        args, capture_output=True, text=True, check=False, cwd=REPO, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{' '.join(args[1:])} exited {done.returncode}\n{done.stdout}{done.stderr}"
    )
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.is_file(), f"scripts/build-deb printed {deb}, which is not a file\n{done.stderr}"
    return deb
