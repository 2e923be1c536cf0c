"""README's "Quick start on other distributions: scripts/install", step by step, in the
systemd guest (a fresh machine).

The steps are read from README.md and must be the ones this test knows, so the README and the
test cannot drift apart. Each runs as written (as root, so without sudo):

- ``bash scripts/install`` itself: the virtualenv in /opt, /usr/local/bin/thinwatchd, the unit,
  the example config. The guest has no network, so pip gets the package as a wheel of this
  checkout and its dependencies as wheels of .venv's (PACKAGE, PIP_NO_INDEX, PIP_FIND_LINKS);
- the config is left exactly as config.example.yaml (100 GiB sparse data, 2 GiB metadata, in
  /var/lib/thinwatchd). The guest's root is RAM, so /var/lib/thinwatchd is an empty directory
  of the scratch disk (ext4) mounted there, as /var/lib would be a disk on a real host;
- ``systemctl enable --now thinwatchd``; then the unit is active, /dev/mapper/docker-pool exists,
  the journal has the pool-created entry and ``thinwatchd status`` exits 0.

Everything is undone afterwards (unit, pool, loops, files), so later tests start clean. It changes
/opt, /usr/local/bin, /etc and /var/lib: it runs only in the throwaway guest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import subprocess
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.harness import REPO, scratch_dir, teardown
from thinwatchd.base.logs import MessageId
from thinwatchd.kernel.dm import DeviceMapper

pytestmark = [pytest.mark.systemd, pytest.mark.kernel]

UNIT = "thinwatchd.service"
POOL = "docker-pool"  # config.example.yaml's pool
STATE = Path("/var/lib/thinwatchd")
INSTALLED = [  # what scripts/install makes, and enable
    Path("/opt/thinwatchd"),
    Path("/usr/local/bin/thinwatchd"),
    Path(f"/etc/systemd/system/{UNIT}"),
    Path("/etc/systemd/system/containerd.service.d/thinwatchd.conf"),  # containerd is installed
    Path("/etc/systemd/system/docker.service.d/thinwatchd.conf"),  # and so is docker.io
    Path("/usr/local/share/man/man8/thinwatchd.8"),
    Path("/usr/local/share/man/man5/thinwatchd.yaml.5"),
    Path("/usr/local/lib/systemd/catalog/thinwatchd.catalog"),
    Path("/etc/thinwatchd"),
]
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, check=False, env=env, cwd=REPO, timeout=900
    )


def readme_quick_start() -> list[str]:
    """Return the commands of README's quick start code block, without comments."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start on other distributions: scripts/install", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README.md: no code block under 'Quick start on other distributions'"
    lines = (line.split("#", 1)[0].strip() for line in block[1].splitlines())
    return [line for line in lines if line]


# -- an offline package source for scripts/install ----------------------------------------------


def _write_wheel(path: Path, files: dict[str, bytes], dist_info: str) -> Path:
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{name},sha256={digest.decode()},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return path


def wheel_of_installed(name: str, out: Path) -> Path:
    """Pack an installed distribution (here: one of .venv's) back into a wheel."""
    dist = importlib.metadata.distribution(name)
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    assert tags, f"{name}: no wheel tag in its WHEEL file"
    files: dict[str, bytes] = {}
    dist_info = ""
    for file in dist.files or []:
        parts = file.parts
        if parts[0] == ".." or "__pycache__" in parts:
            continue  # scripts outside site-packages; bytecode
        if parts[0].endswith(".dist-info"):
            dist_info = parts[0]
            if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
        files[str(file)] = Path(str(file.locate())).read_bytes()
    escaped = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    return _write_wheel(out / f"{escaped}-{dist.version}-{tags[0]}.whl", files, dist_info)


def wheel_of_checkout(out: Path) -> Path:
    """Build this checkout's wheel (pure Python) as pip would, without setuptools."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    sources = [p for p in sorted((REPO / name).rglob("*.py")) if "__pycache__" not in p.parts]
    files = {str(p.relative_to(REPO)): p.read_bytes() for p in sources}
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Requires-Python: {project['requires-python']}",
        *(f"Requires-Dist: {dep}" for dep in project["dependencies"]),
    ]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    scripts = "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
    files[f"{dist_info}/entry_points.txt"] = f"[console_scripts]\n{scripts}".encode()
    wheel = _write_wheel(out / f"{name}-{version}-py3-none-any.whl", files, dist_info)
    for dep in project["dependencies"]:
        found = re.match(r"[A-Za-z0-9._-]+", dep)
        assert found, dep
        wheel_of_installed(found[0], out)
    return wheel


# -- the fresh machine ---------------------------------------------------------------------------


@pytest.fixture
def fresh_machine() -> Iterator[Path]:
    """Nothing of thinwatchd installed; /var/lib/thinwatchd absent until the scratch disk's
    empty directory is mounted there. Yields a scratch directory for the wheels."""
    if os.environ.get("THINWATCHD_IN_VM") != "1":
        pytest.skip("installs into /opt, /usr/local/bin and /etc: only in the throwaway guest")
    # installed_unit (the other systemd tests) leaves its config behind; nothing else may be.
    Path("/etc/thinwatchd/config.yaml").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path("/etc/thinwatchd").rmdir()
    left = [str(p) for p in [*INSTALLED, STATE, Path(f"/dev/mapper/{POOL}")] if p.exists()]
    assert not left, f"not a fresh machine: {left}"
    work = scratch_dir() / "quickstart"
    shutil.rmtree(work, ignore_errors=True)
    (work / "var-lib-thinwatchd").mkdir(parents=True)
    (work / "wheels").mkdir()
    STATE.mkdir()
    dm = DeviceMapper()
    try:
        subprocess.run(
            ["mount", "--bind", str(work / "var-lib-thinwatchd"), str(STATE)], check=True
        )
        yield work / "wheels"
    finally:
        run("systemctl", "disable", "--now", UNIT)
        teardown(dm, [POOL], [STATE / POOL / "data", STATE / POOL / "metadata"])
        dm.close()
        for path in INSTALLED:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        run("systemctl", "daemon-reload")
        run("systemctl", "reset-failed", UNIT)
        run("umount", str(STATE))
        with contextlib.suppress(OSError):
            STATE.rmdir()
        shutil.rmtree(work, ignore_errors=True)


def journal(since: str, *match: str) -> list[dict[str, str]]:
    out = run("journalctl", "-u", UNIT, "-o", "json", "--since", since, "--no-pager", *match)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_quick_start_as_written(fresh_machine: Path) -> None:
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    wheels = fresh_machine
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k not in ("PYTHON", "PACKAGE")
    }
    root_env = {**env, "PATH": ROOT_PATH}

    def log() -> str:
        return "\n".join(str(e.get("MESSAGE", "")) for e in journal(since))

    def install() -> None:
        package = wheel_of_checkout(wheels)
        offline = {
            "PACKAGE": str(package),
            "PIP_NO_INDEX": "1",
            "PIP_FIND_LINKS": str(wheels),
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        done = run("bash", "scripts/install", env={**root_env, **offline})
        assert done.returncode == 0, done.stdout + done.stderr
        assert "wrote /etc/thinwatchd/config.yaml" in done.stdout
        example = (REPO / "config.example.yaml").read_bytes()
        assert Path("/etc/thinwatchd/config.yaml").read_bytes() == example
        # The unit runs what the script installed.
        command = shutil.which("thinwatchd", path=ROOT_PATH)
        assert command == "/usr/local/bin/thinwatchd"
        assert os.path.realpath(command) == "/opt/thinwatchd/bin/thinwatchd"
        exec_start = run("systemctl", "show", "-P", "ExecStart", UNIT).stdout
        assert "path=/usr/local/bin/thinwatchd " in exec_start, exec_start
        assert [str(p) for p in INSTALLED if not p.exists()] == [], done.stdout
        page = run("man", "-w", "thinwatchd", env=root_env).stdout.strip()
        # Debian's /usr/local/man is a link to /usr/local/share/man: man may name either.
        assert os.path.realpath(page) == "/usr/local/share/man/man8/thinwatchd.8", page

    def edit_config() -> None:
        pass  # sudoedit: the example config is used as it is

    def enable_now() -> None:
        done = run("systemctl", "enable", "--now", "thinwatchd", env=root_env)
        assert done.returncode == 0, done.stderr + log()
        state = run("systemctl", "is-active", UNIT).stdout.strip()
        assert state == "active", log()
        assert run("systemctl", "show", "-P", "NRestarts", UNIT).stdout.strip() == "0", log()
        assert run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
        assert Path(f"/dev/mapper/{POOL}").exists(), log()
        mode = (STATE / POOL).stat().st_mode  # made by the daemon, for root only
        assert stat.S_ISDIR(mode) and mode & 0o077 == 0, oct(mode)

    def follow_journal() -> None:
        done = run("journalctl", "-u", "thinwatchd", "--no-pager")  # without -f: it never ends
        assert done.returncode == 0 and "Started" in done.stdout, done.stdout
        created = journal(since, f"MESSAGE_ID={MessageId.POOL_CREATED.value}")
        assert [e["POOL"] for e in created] == [POOL], log()

    def status() -> None:
        done = run("thinwatchd", "status", env=root_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert POOL in done.stdout and "rw" in done.stdout.split(), done.stdout

    steps: dict[str, Callable[[], None]] = {
        "sudo bash scripts/install": install,
        "sudoedit /etc/thinwatchd/config.yaml": edit_config,
        "sudo systemctl enable --now thinwatchd": enable_now,
        "sudo journalctl -u thinwatchd -f": follow_journal,
        "sudo thinwatchd status": status,
    }
    assert readme_quick_start() == list(steps), "README's quick start changed: update this test"
    for step in steps.values():
        step()
