"""The build under test is the one the test command meant: compiled or pure Python.

``make test`` runs the suite on the editable install (``ZEN_EXPECT_BUILD=pure``)
and the integration and system suites on a wheel built with mypyc
(``ZEN_EXPECT_BUILD=compiled``); a source tree that shadowed the installed
package would make that second pass test pure Python without saying so.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest

from app import build
from tests.server import REPO

EXPECTED = {"compiled": build.COMPILED, "pure": build.PURE}


def expected_status() -> str | None:
    wanted = os.environ.get("ZEN_EXPECT_BUILD", "")
    if wanted and wanted not in EXPECTED:
        pytest.fail(f"ZEN_EXPECT_BUILD={wanted!r}: expected one of {sorted(EXPECTED)}")
    return EXPECTED.get(wanted)


def test_this_process_runs_the_expected_build() -> None:
    status = build.status()
    expected = expected_status()
    assert status in {build.COMPILED, build.PURE}, f"a partial build: {status}"
    if expected is not None:
        assert status == expected
    suffix = ".so" if status == build.COMPILED else ".py"
    for name in build.HOT_MODULES:
        module = importlib.import_module(name)
        assert (module.__file__ or "").endswith(suffix), f"{name} loaded from {module.__file__}"


def test_a_server_started_from_the_repository_runs_the_same_build() -> None:
    # The system tests start `python -m app` with the repository as its
    # working directory: the installed package must still win there.
    out = subprocess.run(
        [sys.executable, "-m", "app", "--version"], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.startswith("zen-server ")
    assert f"({build.status()}, Python " in out
    expected = expected_status()
    if expected is not None:
        assert f"({expected}, " in out


def test_the_per_connection_path_runs_compiled_in_the_compiled_build() -> None:
    # Every connection goes through the accept path, the worker's close and the
    # close line's logging; in the compiled build their functions are native
    # (a method of a compiled class is no Python function).
    from app import logs, logsink  # noqa: PLC0415 - imported by the test that needs them
    from app.server import accept, worker  # noqa: PLC0415

    assert {"app.server.accept", "app.logs", "app.logsink", "app.server.worker"} <= set(build.HOT_MODULES)
    per_connection = [
        accept.Acceptor._native_connection,  # libuv's protocol factory
        worker.Worker.connection_lost,
        logs.HotLogger.info_fields,
        logs.HotLogger.flush,
        logsink.LogSink.write,
    ]
    compiled = build.status() == build.COMPILED
    for function in per_connection:
        assert inspect.isfunction(function) != compiled, f"{function.__qualname__}: {type(function)}"
