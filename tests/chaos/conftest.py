"""Fixtures of the chaos suite: the figures table, the file-descriptor limit, kernel knobs.

The figures (load held, faults survived, bad inputs tried, what was lost)
are printed at the end of the run, and written as JSON to ``$CHAOS_FIGURES``
when set (docs/reliability.md describes the suite).
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from .server import raise_nofile

_FIGURES: dict[str, Any] = {}
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """Record a figure: ``figures["idle_horde"] = {...}``."""
    return _FIGURES


@pytest.fixture(scope="package", autouse=True)
def _nofile() -> Iterator[None]:
    """The idle horde holds 10,000 client sockets in this process (and the servers inherit the limit)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_nofile(20_000)
    try:
        yield
    finally:  # the suites that run after this one see the limit they would have seen
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture(params=[0, 1], ids=["migrate_req=0", "migrate_req=1"])
def migrate_req(request: pytest.FixtureRequest) -> Iterator[int]:
    """net.ipv4.tcp_migrate_req (Linux >= 5.14) set to 0 and to 1 for one test each, restored afterwards.

    With 1, connections queued on a reuseport listener that closes move to
    another listener of the group instead of being reset.  With 0 the
    worker retiring a slot must accept what is queued before it closes the
    listener (Worker._stop_accepting): both must lose nothing.
    """
    wanted = int(request.param)
    try:
        old = MIGRATE_REQ.read_text()
    except FileNotFoundError:  # a kernel before 5.14: never migrates
        if wanted:
            pytest.skip("net.ipv4.tcp_migrate_req does not exist here (Linux < 5.14)")
        yield wanted
        return
    if int(old) == wanted:
        yield wanted
        return
    try:
        MIGRATE_REQ.write_text(f"{wanted}\n")
    except OSError as exc:
        pytest.skip(f"cannot set net.ipv4.tcp_migrate_req={wanted} here (needs root and a writable /proc/sys): {exc}")
    try:
        yield wanted
    finally:
        MIGRATE_REQ.write_text(old)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("chaos figures")
    for name, value in _FIGURES.items():
        terminalreporter.write_line(f"{name}: {orjson.dumps(value).decode()}")
    target = os.environ.get("CHAOS_FIGURES")
    if target:
        Path(target).write_bytes(orjson.dumps(_FIGURES, option=orjson.OPT_INDENT_2))
