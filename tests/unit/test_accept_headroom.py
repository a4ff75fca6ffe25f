"""How far below its cap a worker lets libuv accept (``accept.native_headroom``, ``listener.queue_limit``)."""

from __future__ import annotations

from pathlib import Path

from app.server import accept, listener


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text(encoding="ascii"))


def test_the_queue_limit_is_the_backlog_capped_by_somaxconn_plus_one() -> None:
    assert listener.queue_limit(4) == 5
    assert listener.queue_limit(1 << 20) == _somaxconn() + 1


def test_a_libuv_that_accepts_one_per_iteration_needs_a_small_headroom() -> None:
    assert accept.native_headroom(2048, (1 << 16) | (45 << 8)) == accept.NATIVE_HEADROOM
    assert accept.native_headroom(2048, (1 << 16) | (52 << 8) | 1) == accept.NATIVE_HEADROOM


def test_an_older_libuv_gets_a_whole_accept_queue() -> None:
    assert accept.native_headroom(2048, (1 << 16) | (44 << 8) | 9) == min(2048, _somaxconn()) + 1
    assert accept.native_headroom(16, 0) == 17


def test_this_machines_uvloop_reports_its_libuv() -> None:
    version = accept.libuv_version()
    assert version >> 16 == 1
    assert version >= (1 << 16) | (45 << 8), "the worker would fall back to whole-queue headrooms"
