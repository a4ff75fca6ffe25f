"""Listening sockets: the only place that calls ``setsockopt`` on a listener.

Owns: creating, binding and ``listen()``-ing TCP sockets, with
``SO_REUSEPORT`` so that one socket per worker slot shares one port and the
kernel spreads new connections across them; and accepted-socket options.

Never: accepts connections or knows about workers.

Resource handling: the caller closes what :func:`bind_socket` and
:func:`bind_slots` return.  Linux resets the connections queued in a
reuseport listener's backlog when its *last* file descriptor closes, which
is why the master keeps every slot's socket for its whole life.
"""

from __future__ import annotations

import socket
from pathlib import Path


def _family(host: str) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def bind_socket(host: str, port: int, *, backlog: int, reuse_port: bool = True) -> socket.socket:
    """Return a non-blocking socket bound to ``(host, port)`` and listening."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_slots(host: str, port: int, count: int, *, backlog: int) -> list[socket.socket]:
    """Return ``count`` reuseport sockets on one port (port 0: the first one picks it)."""
    first = bind_socket(host, port, backlog=backlog)
    socks = [first]
    try:
        port = first.getsockname()[1]
        socks.extend(bind_socket(host, port, backlog=backlog) for _ in range(count - 1))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def tune_accepted(sock: socket.socket) -> None:
    """Options of an accepted connection: no Nagle delay on small answers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def queue_limit(backlog: int) -> int:
    """The most connections a listener's accept queue holds: ``backlog`` capped by somaxconn."""
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text(encoding="ascii"))
    except (OSError, ValueError):  # not Linux: trust the backlog
        somaxconn = backlog
    # Linux admits one more than the backlog (sk_acceptq_is_full uses ">").
    return min(backlog, somaxconn) + 1
