"""Which build is running: the hot modules compiled by mypyc, or pure Python.

Owns: the list of hot modules (``setup.py`` compiles exactly these when a
wheel is built) and :func:`status`, the words ``python -m app --version``,
``python -m app config`` and the ``master_started`` line show.

Never: imports the modules it asks about (it finds where they would load
from) nor anything outside the standard library, so that ``setup.py`` can
read :data:`HOT_MODULES` before the package's dependencies are installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from typing import Final

#: The modules every request or connection goes through (the data path, then the accept path and
#: the close line's logging), compiled together (docs/performance.md measures the choice).
HOT_MODULES: Final = (
    "app.core.protocol",
    "app.core.zen",
    "app.core.policy",
    "app.server.stats",
    "app.server.connection",
    "app.server.worker",
    "app.server.accept",
    "app.logs",
    "app.logsink",
)

COMPILED: Final = "compiled"
PURE: Final = "pure Python"


def compiled_modules() -> list[str]:
    """The hot modules that load from an extension module (a ``.so`` beside the ``.py``)."""
    found = []
    for name in HOT_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            found.append(name)
    return found


def status() -> str:
    """``"compiled"`` when every hot module is, ``"pure Python"`` when none is (else which are)."""
    found = compiled_modules()
    if len(found) == len(HOT_MODULES):
        return COMPILED
    if not found:
        return PURE
    return f"partly compiled ({', '.join(found)})"
