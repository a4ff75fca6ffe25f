"""Helpers shared by the deployment tests: paths, free ports, polling, the Zen client.

Owns: finding the repository and its virtual environment, picking a free
loopback port, waiting for a condition with a deadline, and asking the
server a question.

Never: sleeps and hopes (every wait polls a condition with a deadline) or
talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from app.core import zen
from app.tools.client import ZenClient

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
VENV_BIN = VENV / "bin"
QUESTION = zen.PROBE_QUESTION
ANSWER = zen.PROBE_ANSWER

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def try_ask(port: int, question: bytes = QUESTION, *, timeout: float = 2.0) -> bytes | None:
    """The answer to ``question`` on 127.0.0.1:``port``, or None when nothing answers (yet)."""
    try:
        with ZenClient("127.0.0.1", port, timeout=timeout) as client:
            return client.ask(question)
    except OSError:
        return None


def wait_answer(port: int, *, timeout: float = 20.0) -> bytes:
    """Wait until the server on ``port`` answers the probe question; return the answer."""
    return wait_for(f"an answer on port {port}", lambda: try_ask(port), timeout=timeout)
