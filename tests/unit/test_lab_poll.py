"""The poll server's fix of the book's stale-descriptor bug, on real sockets.

In ``srv_async.py`` the state of a connection is keyed by file descriptor:
when one batch of events holds an event for a socket that was closed
earlier in the batch, and a connection accepted meanwhile reused that
descriptor, the stale event is applied to the new connection.
"""

from __future__ import annotations

import selectors
import socket

from app.config import Settings
from app.lab.poll import Conn, dispatch


def never_accept() -> None:
    raise AssertionError("no listener event in this batch")


def test_an_event_of_a_closed_connection_is_not_applied_to_the_one_reusing_its_descriptor() -> None:
    settings = Settings()
    with selectors.DefaultSelector() as sel:
        old_server, old_client = socket.socketpair()
        old = Conn(old_server, sel, settings)
        stale_key = sel.get_key(old_server)
        fd = old_server.fileno()
        old.close()  # closed while its event is still in the batch
        new_server, new_client = socket.socketpair()
        try:
            if new_server.fileno() != fd:  # the kernel hands out the lowest free descriptor
                new_server, new_client = new_client, new_server
            assert new_server.fileno() == fd, "the new connection reuses the closed one's descriptor"
            new_server.setblocking(False)
            new = Conn(new_server, sel, settings)
            new_client.sendall(b"Beautiful is better than?")
            dispatch([(stale_key, selectors.EVENT_READ)], never_accept)
            assert not new.reader.partial, "the stale event must not read the new connection"
            assert not new.out
            dispatch([(sel.get_key(new_server), selectors.EVENT_READ)], never_accept)
            new_client.settimeout(5)
            assert new_client.recv(64) == b"Ugly."
        finally:
            for sock in (old_client, new_server, new_client):
                sock.close()
