"""The build: the daemon's hot modules compiled with mypyc into the wheel, or pure Python.

Everything else about the package is in pyproject.toml; this file only adds
the compiled extension modules, in three cases out of four:

* ``pip install .`` (a wheel): :data:`HOT_MODULES` are compiled with mypyc
  (the same ``.py`` files, already ``mypy --strict``) and installed beside
  their sources; Python imports the ``.so`` first.
* ``ZEN_PURE_PYTHON=1 pip install .``: pure Python, on purpose.
* No C compiler, or mypyc fails: the wheel is pure Python; the build says so
  on stderr and the install still succeeds.
* ``pip install -e .`` (development, ``make test``/``make run``): always pure
  Python, so that an edited ``.py`` is what runs.

``python -m app --version`` tells which build is running (``app/build.py``).
The C sources and objects go to ``build/`` (ignored by git).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: app/build.py's list (a standard-library-only module, read here without importing the package).
HOT_MODULES = [f"{name.replace('.', '/')}.py" for name in runpy.run_path("app/build.py")["HOT_MODULES"]]

#: Commands that build a wheel or install from it; anything else (egg_info, editable_wheel, sdist) compiles nothing.
_BUILDING = {"bdist_wheel", "build", "build_ext", "install"}


def _say(message: str) -> None:
    print(f"zen-server build: {message}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext whose failure (no compiler, a C error) leaves a pure-Python wheel instead of no wheel."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - whatever the compiler says, pure Python still works
            self._discard(exc)
        else:
            if self.extensions:
                _say(f"compiled with mypyc: {', '.join(HOT_MODULES)}")

    def _discard(self, exc: BaseException) -> None:
        for output in self.get_outputs():
            Path(output).unlink(missing_ok=True)
        self.extensions = []
        self.distribution.ext_modules = []
        _say(f"compiling failed ({type(exc).__name__}: {exc}); installing pure Python")


def _extensions() -> list[Any]:
    if not _BUILDING.intersection(sys.argv[1:]) or "editable_wheel" in sys.argv[1:]:
        return []
    if os.environ.get("ZEN_PURE_PYTHON", "") not in {"", "0"}:
        _say("ZEN_PURE_PYTHON is set: pure Python")
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415 - only a wheel build needs mypy

        # The build environment holds setuptools and mypy only: the third-party packages are
        # typed Any there (so returning one of their values is no error here), and the modules not
        # compiled are followed for their types without their errors (make lint checks them with
        # the packages installed).
        flags = [
            "--ignore-missing-imports",
            "--no-warn-unused-ignores",
            "--no-warn-return-any",
            "--follow-imports=silent",
        ]
        return list(mypycify([*flags, *HOT_MODULES], opt_level="3", group_name="app_native"))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc missing or refusing: pure Python
        _say(f"mypyc unavailable ({type(exc).__name__}: {exc}); installing pure Python")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
