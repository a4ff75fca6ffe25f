"""The accept back-off on EMFILE and its rate-limited report (``accept.Backoff``): a pure schedule."""

from __future__ import annotations

import itertools

from app.server.accept import BACKOFF_CAP, BACKOFF_FIRST, BACKOFF_LOG_EVERY, Backoff


def test_the_pause_doubles_from_the_first_up_to_the_cap() -> None:
    backoff = Backoff()
    delays = []
    for _ in range(12):
        backoff.failed(0.0)
        delays.append(backoff.delay)
    assert delays[0] == BACKOFF_FIRST
    assert delays[1] == 2 * BACKOFF_FIRST
    assert all(b == min(BACKOFF_CAP, 2 * a) for a, b in itertools.pairwise(delays))
    assert delays[-1] == BACKOFF_CAP


def test_a_successful_accept_starts_over() -> None:
    backoff = Backoff()
    for _ in range(5):
        backoff.failed(0.0)
    backoff.succeeded()
    assert backoff.delay == 0.0
    backoff.failed(0.0)
    assert backoff.delay == BACKOFF_FIRST


def test_the_first_failure_is_reported_then_at_most_one_report_per_interval() -> None:
    backoff = Backoff()
    assert backoff.failed(100.0) == 1  # at once, however soon after start-up
    quiet = [backoff.failed(100.0 + i * 0.5) for i in range(1, 10)]  # 0.5 .. 4.5 s later
    assert quiet == [0] * 9
    assert backoff.failed(100.0 + BACKOFF_LOG_EVERY) == 10  # the nine kept quiet, and this one
    assert backoff.failed(100.0 + BACKOFF_LOG_EVERY + 0.1) == 0
