"""The wheels as pip would install them: what lands at the top level of site-packages, and what is left out.

Both wheels are built from a copy of the sources in tmp_path (nothing is written into the repository) with the
setuptools of this environment: no build isolation, no dependencies, so no network and about a second.
"""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"services": "epserve/services", "kernels": "epserve/kernels", "load_tests": "epserve/load_tests"}
BUILD_TIMEOUT_S = 120
BUILD = "import sys, setuptools.build_meta as backend; print(backend.build_wheel(sys.argv[1]))"


def _copy_sources(project: Path, to: Path) -> Path:
    """The project without what builds and tests leave behind (a stale build/ or egg-info changes the wheel)."""
    def ignore(folder, names):
        at_root = Path(folder) == project
        return {n for n in names if n in {"__pycache__", ".pytest_cache"} or n.endswith(".egg-info")
                or (at_root and n in {".git", ".venv", "build", "dist", ".bench"})}

    return Path(shutil.copytree(project, to, ignore=ignore))


def build_wheel(project: Path, tmp_path: Path) -> zipfile.ZipFile:
    source = _copy_sources(project, tmp_path / "src")
    out = tmp_path / "dist"
    result = subprocess.run([sys.executable, "-c", BUILD, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"building the wheel of {project} failed:\n{result.stdout}\n{result.stderr}"
    return zipfile.ZipFile(out / result.stdout.strip().splitlines()[-1])


def top_level_names(wheel: zipfile.ZipFile) -> set[str]:
    """Import names the wheel puts at the top of site-packages (files under *.data/purelib|platlib included)."""
    names = set()
    for name in wheel.namelist():
        parts = name.split("/")
        if parts[0].endswith(".dist-info"):
            continue
        if parts[0].endswith(".data"):
            if parts[1] not in {"purelib", "platlib"}:
                continue                               # scripts, headers, data: not importable
            parts = parts[2:]
        top = parts[0]
        names.add(top.split(".")[0] if len(parts) == 1 and top.endswith((".py", ".so", ".pyd")) else top)
    return names


@pytest.fixture(scope="module")
def epserve_wheel(tmp_path_factory):
    return build_wheel(ROOT, tmp_path_factory.mktemp("epserve-wheel"))


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory):
    return build_wheel(ROOT / "sdk", tmp_path_factory.mktemp("client-wheel"))


def test_epserve_installs_only_epserve(epserve_wheel):
    assert top_level_names(epserve_wheel) == {"epserve"}
    assert "epserve/__init__.py" not in epserve_wheel.namelist(), "epserve is a namespace package: no __init__.py"


def test_every_source_file_is_in_the_epserve_wheel(epserve_wheel):
    """A subpackage missing from [tool.setuptools] packages in pyproject.toml imports in an editable install
    and is missing from the wheel."""
    shipped = set(epserve_wheel.namelist())
    packages = [init.parent for folder in PACKAGE_DIRS for init in sorted((ROOT / folder).rglob("__init__.py"))]
    assert len(packages) >= len(PACKAGE_DIRS)
    missing_packages = [f"{p.relative_to(ROOT)}/" for p in packages
                        if _in_wheel(p / "__init__.py") not in shipped]
    assert not missing_packages, f"packages not in the wheel (add them to pyproject's packages): {missing_packages}"
    missing_files = [str(f.relative_to(ROOT)) for folder in PACKAGE_DIRS for f in sorted((ROOT / folder).rglob("*"))
                     if f.is_file() and "__pycache__" not in f.parts and _in_wheel(f) not in shipped]
    assert not missing_files, f"files not in the wheel: {missing_files}"


def _in_wheel(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).parts
    return "/".join([PACKAGE_DIRS[folder], *rest])


def test_console_script(epserve_wheel):
    (entry_points,) = [n for n in epserve_wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.optionxform = str
    parser.read_string(epserve_wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]).get("epserve") == "epserve.services.cli:main"


def test_client_installs_only_epserve_client(client_wheel):
    assert top_level_names(client_wheel) == {"epserve_client"}
    shipped = set(client_wheel.namelist())
    package = ROOT / "sdk" / "epserve_client"
    missing = [str(f.relative_to(ROOT)) for f in sorted(package.rglob("*"))
               if f.is_file() and "__pycache__" not in f.parts and str(f.relative_to(ROOT / "sdk")) not in shipped]
    assert not missing, f"files not in the epserve-client wheel: {missing}"
