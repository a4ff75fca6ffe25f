"""The plain counters of one worker, read by its logs and metrics.

Owns: the counters' names and their meaning.  Each counter has one writer,
named beside it; everyone else only reads.

Never: touches prometheus-client (``metrics`` moves the counters into it
from the worker's sweep) or logs.
"""

from __future__ import annotations


class Stats:
    """Counters of one worker: plain ints, so that counting costs an add, never a call."""

    __slots__ = (
        "accept_backoffs",
        "accepted",
        "answered",
        "backpressure_pauses",
        "closes",
        "proxy_headers",
        "unknown",
    )

    def __init__(self) -> None:
        self.accepted = 0  # accept.Acceptor
        self.accept_backoffs = 0  # accept.Acceptor
        self.answered = 0  # worker.Worker, when a connection closes
        self.unknown = 0  # metrics.counting_answers, only with metrics on
        self.backpressure_pauses = 0  # connection.Connection
        #: Connections closed, by the value of their ``policy.CloseReason`` (worker.Worker).
        self.closes: dict[str, int] = {}
        self.proxy_headers: dict[str, int] = {}  # accepted PROXY headers by command (connection.ProxiedConnection)
