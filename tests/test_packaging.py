"""A regular (non-editable) install carries every package of the tree: a wheel built from this checkout
holds each folder with an ``__init__.py`` under python/sensilora and sensilora_kernels, and METHOD.md."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_every_package(tmp_path):
    # the build runs without isolation (offline-safe, as the README's GPU install does): it needs setuptools here
    setuptools = pytest.importorskip("setuptools", reason="building the wheel here needs setuptools installed")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.importorskip("wheel", reason="setuptools < 70.1 builds wheels only with the wheel package")
    env = {**os.environ, "SENSILORA_BUILD_CUDA": "0"}
    had_build_dir = (ROOT / "build").exists()  # setuptools builds in the tree: leave it as it was
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    if not had_build_dir:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("sensilora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        f"{install}/{init.parent.relative_to(source).as_posix()}/__init__.py".replace("/./", "/")
        for install, source in (("sensilora", ROOT / "python" / "sensilora"),
                                ("sensilora_kernels", ROOT / "sensilora_kernels"))
        for init in source.rglob("__init__.py")
    }  # fmt: skip
    assert wanted and wanted <= names, sorted(wanted - names)
    assert "sensilora/METHOD.md" in names
