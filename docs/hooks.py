# ruff: noqa: INP001
# (INP001: a MkDocs hook is loaded by its path, never imported from a package.)
"""MkDocs hook: the generated parts of the site, rendered from the code at build time.

Owns: replacing each placeholder comment of a page with what the code says
today: ``<!-- settings-table -->`` with :func:`app.config.markdown` (every
environment variable, its default and meaning) and ``<!-- lab-servers -->``
with the list ``python -m app lab --list`` prints.  So the documentation of
the settings and of the lab cannot drift from ``app/config.py`` and
``app/lab``: a variable added there appears here on the next build.

Never: writes files, runs a server or reads the environment; and never
loses a generated section silently: a placeholder that no page holds any
more fails the build.  Other comments (the figures markers of
``performance.md``) pass through untouched.

Registered in ``mkdocs.yml`` (``hooks:``); ``tests/unit/test_docs.py`` calls
:func:`render` directly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from mkdocs.exceptions import PluginError

from app import config, lab

_PLACEHOLDER: Final = re.compile(r"<!-- ([a-z-]+) -->")


def _lab_servers() -> str:
    width = max(len(name) for name, _ in lab.describe())
    lines = [f"{name:<{width}}  {text}" for name, text in lab.describe()]
    return "```console\n$ python -m app lab --list\n" + "\n".join(lines) + "\n```"


#: Placeholder name -> the Markdown that replaces it.
GENERATORS: Final[dict[str, Callable[[], str]]] = {
    "settings-table": config.markdown,
    "lab-servers": _lab_servers,
}


def render(markdown: str) -> str:
    """Return ``markdown`` with every known placeholder replaced; raise on an unknown one."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            return match.group(0)  # another comment (e.g. the figures markers)
        return GENERATORS[name]()

    return _PLACEHOLDER.sub(replace, markdown)


_used: set[str] = set()


def on_pre_build(**_kwargs: Any) -> None:
    """Start a build with no placeholder seen (``mkdocs serve`` rebuilds in one process)."""
    _used.clear()


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    """Fill the page's placeholders (MkDocs event)."""
    _used.update(name for name in _PLACEHOLDER.findall(markdown) if name in GENERATORS)
    return render(markdown)


def on_post_build(**_kwargs: Any) -> None:
    """Fail the build if a generated section lost its placeholder (MkDocs event)."""
    missing = sorted(set(GENERATORS) - _used)
    if missing:
        raise PluginError(f"no page holds the placeholder(s) {missing}: their generated sections would be missing")
