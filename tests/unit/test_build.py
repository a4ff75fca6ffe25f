"""The wheel build's fallbacks: no C compiler, or ZEN_PURE_PYTHON=1, still give a working pure-Python wheel.

The compiled case itself is ``make test``'s second pass (``.venv-compiled``).
Each test builds a wheel from a copy of the sources, so the repository's
``build/`` is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from app import build
from tests.server import REPO

pytestmark = pytest.mark.slow


def build_wheel(tmp_path: Path, python: str = sys.executable, **env: str) -> tuple[list[str], str]:
    """(the wheel's file names, the build's stderr) of ``python -m pip wheel`` on a copy of the sources."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    out = tmp_path / "wheels"
    done = subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "--verbose", "--wheel-dir", str(out), str(src)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("zen_server-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist(), done.stdout + done.stderr


def assert_pure(names: list[str]) -> None:
    assert not [n for n in names if n.endswith(".so")]
    for module in build.HOT_MODULES:
        path = f"{module.replace('.', '/')}.py"
        # After a failed compile the wheel keeps its platform tag and lists the files under .data/purelib/.
        assert [n for n in names if n == path or n.endswith(f"/purelib/{path}")], path


def test_without_a_c_compiler_the_wheel_is_pure_python_and_says_so(tmp_path: Path) -> None:
    names, log = build_wheel(tmp_path, CC="/bin/false", ZEN_PURE_PYTHON="")
    assert_pure(names)
    assert "compiling failed" in log
    assert "installing pure Python" in log


def test_zen_pure_python_forces_a_pure_wheel(tmp_path: Path) -> None:
    names, log = build_wheel(tmp_path, ZEN_PURE_PYTHON="1")
    assert_pure(names)
    assert "ZEN_PURE_PYTHON is set: pure Python" in log


def test_a_venv_with_nothing_installed_builds_the_compiled_wheel(tmp_path: Path) -> None:
    # As on a new machine (make run's first install, the image's builder stage): mypy in the build
    # environment sees none of the runtime packages, so their types are Any there; the compile
    # must still succeed rather than fall back to pure Python (it once did, on warn_return_any).
    # Needs what any compiled install needs: a C compiler and the Python headers (Python.h).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    names, log = build_wheel(tmp_path, python=str(venv / "bin" / "python"), ZEN_PURE_PYTHON="")
    said = [line for line in log.splitlines() if "zen-server build:" in line]
    assert "compiled with mypyc" in log, said or log[-3000:]
    for module in build.HOT_MODULES:
        stem = module.replace(".", "/")
        assert [n for n in names if n.startswith(f"{stem}.") and n.endswith(".so")], module
