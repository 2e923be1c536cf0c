"""The Debian package as built (scripts/build-deb, on the host): lintian-clean, and it holds
exactly the tree's files where Debian puts them, with Debian's dependencies and maintainer
scripts that enable without starting, try-restart on upgrade and stop on removal.

The build needs Debian 12's debhelper, dh-python, pybuild-plugin-pyproject and lintian
(scripts/bootstrap installs them): without them these tests fail, they never skip. What the
package does on a machine is tests/systemd/test_debian_package.py's (in the systemd guest).
"""

from __future__ import annotations

import gzip
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.package.deb import (
    REPO,
    build,
    build_upgrade,
    committed,
    committed_files,
    release_version,
    upgrade_version,
)

UNIT = "/lib/systemd/system/thinwatchd.service"
CONFFILE = "/etc/thinwatchd/config.yaml"
SITE = "/usr/lib/python3/dist-packages"
#: Every file the package ships besides the Python package, and its one source in the tree
#: (the unit differs in ExecStart only; .gz files are compared uncompressed).
SHIPPED = {
    UNIT: "systemd/thinwatchd.service",
    CONFFILE: "config.example.yaml",
    "/lib/systemd/system/containerd.service.d/thinwatchd.conf": (
        "systemd/containerd.service.d/thinwatchd.conf"
    ),
    "/lib/systemd/system/docker.service.d/thinwatchd.conf": (
        "systemd/docker.service.d/thinwatchd.conf"
    ),
    "/usr/share/thinwatchd/thinwatchd-alerts.yml": "monitoring/thinwatchd-alerts.yml",
    "/usr/share/man/man8/thinwatchd.8.gz": "docs/man/thinwatchd.8",
    "/usr/share/man/man5/thinwatchd.yaml.5.gz": "docs/man/thinwatchd.yaml.5",
    # systemd's dpkg trigger on /usr/lib/systemd/catalog runs `journalctl --update-catalog`.
    "/usr/lib/systemd/catalog/thinwatchd.catalog": "systemd/thinwatchd.catalog",
    "/usr/share/doc/thinwatchd/README.md.gz": "README.md",
    # README's "Use with containerd" and "Use with Docker" configs
    "/usr/share/doc/thinwatchd/examples/containerd-config.toml": "docs/containerd-config.toml",
    "/usr/share/doc/thinwatchd/examples/docker-daemon.json": "docs/docker-daemon.json",
    "/usr/share/doc/thinwatchd/copyright": "debian/copyright",
    "/usr/share/doc/thinwatchd/changelog.Debian.gz": "debian/changelog",
    "/usr/share/lintian/overrides/thinwatchd": "debian/thinwatchd.lintian-overrides",
}
#: The Python package's requirements (pyproject.toml) and the Debian packages that provide
#: them (dh-python's map; systemd-python is python3-systemd).
DEBIAN_MODULES = {
    "pyudev": "python3-pyudev",
    "systemd-python": "python3-systemd",
    "PyYAML": "python3-yaml",
}


@dataclass(frozen=True)
class Package:
    deb: Path
    root: Path  # dpkg-deb -x
    control: Path  # dpkg-deb -e

    def field(self, name: str) -> str:
        return dpkg_deb("-f", str(self.deb), name).strip()

    def files(self) -> dict[str, str]:
        """Path -> mode string (dpkg-deb -c), regular files only."""
        listing = {}
        for line in dpkg_deb("-c", str(self.deb)).splitlines():
            mode, _owner, _size, _date, _time, path = line.split(None, 5)
            if mode.startswith("-"):
                listing[path.removeprefix(".")] = mode
        return listing

    def read(self, path: str) -> bytes:
        data = (self.root / path.lstrip("/")).read_bytes()
        return gzip.decompress(data) if path.endswith(".gz") else data


def dpkg_deb(*args: str) -> str:
    done = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def unpack(deb: Path, where: Path) -> Package:
    root, control = where / "root", where / "control"
    dpkg_deb("-x", str(deb), str(root))
    dpkg_deb("-e", str(deb), str(control))
    return Package(deb, root, control)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Package]:
    yield unpack(build(), tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def upgrade(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Package]:
    yield unpack(build_upgrade(), tmp_path_factory.mktemp("upgrade"))


def test_lintian_reports_nothing_but_justified_overrides(release: Package) -> None:
    # scripts/build-deb fails on any tag that is not overridden; its report is kept beside it.
    report = release.deb.with_name(f"thinwatchd_{release_version()}.lintian.txt").read_text()
    tags = [line for line in report.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert not tags, report
    # Each override (debian/*.lintian-overrides, debian/source/lintian-overrides) follows a
    # comment that says why.
    for overrides in committed_files("debian"):
        if not overrides.endswith("lintian-overrides"):
            continue
        previous = ""
        for line in committed(overrides).decode().splitlines():
            if line.strip() and not line.startswith("#"):
                assert previous.startswith("#"), f"{overrides}: {line!r} has no reason"
            previous = line if line.strip() else previous if previous.startswith("#") else ""


def test_the_source_package_is_built_and_linted_with_the_binary(release: Package) -> None:
    version = release_version()
    dsc = release.deb.with_name(f"thinwatchd_{version}.dsc")
    changes = next(release.deb.parent.glob(f"thinwatchd_{version}_*.changes")).read_text()
    assert dsc.is_file() and f" {dsc.name}\n" in changes, changes
    assert f"\nVersion: {version}\n" in dsc.read_text()
    report = release.deb.with_name(f"thinwatchd_{version}.lintian.txt").read_text()
    assert "thinwatchd source:" in report, report  # lintian saw the source package


def test_the_files_are_the_trees_where_debian_puts_them(release: Package) -> None:
    files = release.files()
    python = {f"{SITE}/{p}" for p in committed_files("thinwatchd") if p.endswith(".py")}
    dist_info = {p for p in files if p.startswith(f"{SITE}/thinwatchd-")}
    assert {p.rsplit("/", 1)[1] for p in dist_info} >= {"METADATA", "entry_points.txt"}
    expected = {"/usr/bin/thinwatchd", *SHIPPED, *python, *dist_info}
    assert set(files) == expected, (
        f"missing {sorted(expected - set(files))}, unexpected {sorted(set(files) - expected)}"
    )
    assert files["/usr/bin/thinwatchd"] == "-rwxr-xr-x"
    assert all(
        mode == "-rw-r--r--" for path, mode in files.items() if path != "/usr/bin/thinwatchd"
    )
    for path in python:
        assert release.read(path) == committed(path.removeprefix(f"{SITE}/")), path
    for path, source in SHIPPED.items():
        if path != UNIT:
            assert release.read(path) == committed(source), path


def test_the_command_runs_debians_python3(release: Package) -> None:
    script = release.read("/usr/bin/thinwatchd").decode()
    assert script.startswith("#!/usr/bin/python3\n"), script
    assert "from thinwatchd.cli import main" in script, script


def test_the_unit_differs_from_the_trees_in_execstart_only(release: Package) -> None:
    packaged = release.read(UNIT).decode().splitlines()
    tree = committed(SHIPPED[UNIT]).decode().splitlines()
    assert len(packaged) == len(tree)
    changed = [(a, b) for a, b in zip(tree, packaged, strict=True) if a != b]
    assert changed == [
        (
            "ExecStart=/usr/local/bin/thinwatchd --config /etc/thinwatchd/config.yaml run",
            "ExecStart=/usr/bin/thinwatchd --config /etc/thinwatchd/config.yaml run",
        )
    ], changed


def test_the_config_is_the_only_conffile(release: Package) -> None:
    assert (release.control / "conffiles").read_text().split() == [CONFFILE]


def test_it_depends_on_debians_packages_only(release: Package) -> None:
    depends = [d.strip() for d in release.field("Depends").split(",")]
    names = {re.split(r"[ :(]", d, maxsplit=1)[0] for d in depends}
    assert names == {*DEBIAN_MODULES.values(), "thin-provisioning-tools", "python3"}, depends
    assert "python3:any (>= 3.11~)" in depends, depends  # pyproject's requires-python
    # Every requirement of pyproject.toml is among them: dh_python3 mapped them all.
    pyproject = committed("pyproject.toml").decode()
    required = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S)
    assert required, "pyproject.toml: no dependencies"
    wanted = set(re.findall(r'"([A-Za-z0-9_.-]+)', required[1]))
    assert wanted == set(DEBIAN_MODULES), wanted
    assert release.field("Architecture") == "all"
    assert release.field("Version") == release_version()


def test_debians_own_build_tools_meet_pyprojects_build_requirements(tmp_path: Path) -> None:
    # pybuild skips the build-system check (--skip-dependency-check), so a requirement Debian 12
    # cannot meet would pass unnoticed there; python3-build (pybuild-plugin-pyproject's) checks.
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "HEAD", "pyproject.toml", "README.md", "thinwatchd"],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    done = subprocess.run(
        ["/usr/bin/python3", "-m", "build", "--no-isolation", "--wheel", "--outdir", "dist", "."],
        cwd=tree,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((tree / "dist").glob("thinwatchd-*.whl"))


def test_maintainer_scripts_enable_without_starting_and_restart_on_upgrade(
    release: Package,
) -> None:
    scripts = {p.name: p.read_text() for p in release.control.iterdir()}
    postinst = scripts["postinst"]
    assert "deb-systemd-helper enable 'thinwatchd.service'" in postinst
    # Started on no install; on an upgrade ($2 is the old version), restarted if running.
    starts = [line.strip() for line in postinst.splitlines() if "deb-systemd-invoke" in line]
    assert starts == ["deb-systemd-invoke try-restart 'thinwatchd.service' >/dev/null || true"]
    # Nothing stops it before an upgrade's files are unpacked: the old daemon runs until then.
    assert "stop" not in scripts.get("preinst", "")
    assert "deb-systemd-invoke stop thinwatchd.service" in scripts["prerm"]
    assert "deb-systemd-helper purge 'thinwatchd.service'" in scripts["postrm"]
    assert "pools and their files are left alone" in scripts["postrm"]
    # A host that had scripts/install hears which of its copies override the package's.
    assert "/etc/systemd/system/thinwatchd.service /usr/local/bin/thinwatchd" in postinst


def test_the_upgrade_package_is_newer_and_the_same_tree(release: Package, upgrade: Package) -> None:
    newer = subprocess.run(
        ["dpkg", "--compare-versions", upgrade.field("Version"), "gt", release_version()],
        check=False,
    )
    assert newer.returncode == 0, upgrade.field("Version")
    assert upgrade.field("Version") == upgrade_version()
    assert upgrade.files().keys() == release.files().keys()
    changelog = "/usr/share/doc/thinwatchd/changelog.Debian.gz"
    for path in release.files():
        if path != changelog:
            assert upgrade.read(path) == release.read(path), path
