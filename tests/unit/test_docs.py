"""The documentation stays true to the code: generated tables, markers, the README's commands.

The site itself is built with ``mkdocs build --strict`` by ``make lint``
(broken links and anchors fail there); these tests pin what a build cannot
see: that the generated sections hold every variable and lab server, that
the figures section exists exactly once for ``bench/run.py --write-docs``,
and that the README's front door names every command.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from app.cli import build_parser
from app.config import SETTINGS, markdown
from app.lab import SERVERS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(name: str, hooks: ModuleType) -> str:
    rendered: str = hooks.render((DOCS / name).read_text())
    return rendered


def test_configuration_page_lists_every_variable(hooks: ModuleType) -> None:
    text = page("configuration.md", hooks)
    for setting in SETTINGS:
        assert f"`{setting.name}`" in text, f"docs/configuration.md does not document {setting.name}"
    # The table is exactly what `python -m app config --markdown` prints.
    assert markdown() in text
    assert "<!-- settings-table -->" not in text


def test_lab_page_lists_every_lab_server(hooks: ModuleType) -> None:
    text = page("lab.md", hooks)
    for server in SERVERS:
        assert re.search(rf"^{re.escape(server.name)} +{re.escape(server.description)}$", text, re.MULTILINE), server
    assert "<!-- lab-servers -->" not in text


def test_unknown_comments_pass_through(hooks: ModuleType) -> None:
    text = "a <!-- figures:begin --> b <!-- something-else --> c"
    assert hooks.render(text) == text


def test_performance_page_has_one_figures_section() -> None:
    lines = (DOCS / "performance.md").read_text().splitlines()
    assert lines.count("<!-- figures:begin -->") == 1
    assert lines.count("<!-- figures:end -->") == 1
    begin, end = lines.index("<!-- figures:begin -->"), lines.index("<!-- figures:end -->")
    assert begin < end
    assert "make bench" in "\n".join(lines[begin:end])


def test_readme_names_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices is not None
    commands = [name for name in sub.choices if name != "worker"]  # worker: internal, started by the master
    assert {"serve", "client", "check", "config", "lab", "bench", "compare"} <= set(commands)
    for name in commands:
        assert f"python -m app {name}" in readme, f"README does not show 'python -m app {name}'"
    for target in ("run", "test", "bench", "docs"):
        assert f"make {target}" in readme, f"README does not show 'make {target}'"


def test_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).exists(), f"README links to a missing {link}"
