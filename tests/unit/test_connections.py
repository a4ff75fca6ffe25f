"""The worker's registry of open connections (``worker.Connections``): counts, snapshots, bounded memory."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.server.connection import Connection
from app.server.worker import COMPACT_SLACK, Connections, Worker


class _Log:
    def info(self, *_args: object, **_fields: object) -> None:
        pass


@pytest.fixture
def worker() -> Iterator[Worker]:
    with socket.socket() as sock:
        yield Worker(Settings(), sock, log=_Log())


def _open(worker: Worker, n: int) -> list[Connection]:
    conns = []
    for _ in range(n):
        conn = Connection(worker.context)
        conn.transport = object()  # open: the registry marks a removed one by detaching it
        conns.append(conn)
    return conns


def _registry(conns: list[Connection]) -> Connections:
    registry = Connections()
    for conn in conns:
        registry.add(conn)
    return registry


def test_count_and_snapshot_follow_adds_and_removes(worker: Worker) -> None:
    conns = _open(worker, 5)
    registry = _registry(conns)
    registry.remove(conns[1])
    registry.remove(conns[3])
    assert registry.count == 3
    assert list(registry) == [conns[0], conns[2], conns[4]]
    assert conns[1].transport is None


def test_iterating_gives_a_snapshot_safe_to_remove_in(worker: Worker) -> None:
    registry = _registry(_open(worker, 10))
    for conn in registry:
        registry.remove(conn)
    assert registry.count == 0
    assert list(registry) == []


def test_removed_connections_do_not_pile_up(worker: Worker) -> None:
    keep = _open(worker, 10)
    registry = _registry(keep)
    for _ in range(50):  # churn: 5,000 connections come and go beside 10 that stay
        batch = _open(worker, 100)
        for conn in batch:
            registry.add(conn)
        for conn in batch:
            registry.remove(conn)
    assert registry.count == 10
    assert len(registry._items) <= 2 * 10 + COMPACT_SLACK + 1
    assert list(registry) == keep
