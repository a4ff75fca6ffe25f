"""The admin HTTP listener of the master: ``/metrics``, ``/healthz``, ``/readyz``.

Owns: the admin socket (``ADMIN_HOST:ADMIN_PORT``, loopback by default:
metrics and health are for the operator's agents, not for clients), one
``http.server`` in one daemon thread, and what each endpoint answers from
the :class:`MasterStatus` the master publishes.

Never: changes master state, touches the Zen listeners or workers, or
blocks the master: it runs in its own thread, serves one request at a time
(a scrape or a probe is small) with a socket timeout, and only reads an
immutable snapshot.

- ``/healthz``: 200 while the master's loop is turning (it publishes at
  least once a second), every worker slot has a live process and no worker
  is hung; 503 otherwise (a crashed worker waiting for its respawn, a
  worker silent for WORKER_TIMEOUT until it is replaced, a wedged master).
- ``/readyz``: 200 once every worker has been ready and no stop has begun;
  503 from the moment a stop signal arrives (the signal handler records it,
  before the master closes the listeners), so a load balancer or a
  Kubernetes Service stops sending new connections first.  A hung worker
  does not make the server unready: the connections queued on its socket
  wait for its successor, seconds away, and taking the whole instance out
  of a load balancer for that would cost more than it saves.

Both bodies count the hung workers (``hung``: now, and since the start by
slot) and the workers recycled after MAX_REQUESTS.
- ``/metrics``: Prometheus text exposition over all workers (``metrics``).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from app.server import metrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: The master publishes at least once a second (its select() timeout); a
#: snapshot older than this means its loop is stuck.
HEARTBEAT_STALE: Final = 5.0
#: Seconds a client of the admin listener may take to send its request.
REQUEST_TIMEOUT: Final = 5.0


@dataclass(frozen=True)
class MasterStatus:
    """An immutable snapshot of the master, published by its loop."""

    pid: int
    slots: int = 0  # configured worker slots
    running: int = 0  # slots with a live worker process
    ready_workers: int = 0  # slots whose worker reported ready
    restarts: int = 0  # workers respawned after a crash
    recycles: int = 0  # workers replaced after MAX_REQUESTS
    hung: tuple[tuple[int, int], ...] = ()  # (slot, workers declared hung there), since the start
    hung_now: int = 0  # workers declared hung and not gone yet
    announced: bool = False  # every slot was ready once (server_ready)
    stopping: bool = False
    updated: float = 0.0  # time.monotonic() of publication

    @property
    def ready(self) -> bool:
        """Takes new connections: started and not stopping."""
        return self.announced and not self.stopping

    @property
    def live(self) -> bool:
        """The master's loop turns and every slot has a worker that is not hung (or a stop is under way)."""
        fresh = time.monotonic() - self.updated <= HEARTBEAT_STALE
        return fresh and (self.stopping or (self.running >= self.slots and not self.hung_now))


class AdminServer:
    """The admin listener; :meth:`start` serves in a daemon thread, :meth:`close` stops it.

    Resource handling: binds in ``__init__`` (so a bad ADMIN_PORT fails the
    master's boot); :meth:`close` closes the socket.
    """

    def __init__(
        self,
        host: str,
        port: int,
        status: Callable[[], MasterStatus],
        registry: CollectorRegistry,
        *,
        log: Any,
    ) -> None:
        self.status = status
        self.registry = registry
        self.log = log
        self._server = _HTTPServer((host, port), _Handler, family=_family(host))
        self._server.admin = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in a daemon thread (it dies with the master)."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(REQUEST_TIMEOUT)
        self._server.server_close()

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``."""
        route = path.split("?", 1)[0]
        if route == "/metrics":
            body, ctype = metrics.render(self.registry)
            return 200, ctype, body
        if route in ("/healthz", "/readyz"):
            st = self.status()
            ok = st.live if route == "/healthz" else st.ready
            return 200 if ok else 503, "application/json", _status_body(st, ok=ok)
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n"


def _status_body(st: MasterStatus, *, ok: bool) -> bytes:
    return orjson.dumps(
        {
            "status": "ok" if ok else "unavailable",
            "ready": st.ready,
            "stopping": st.stopping,
            "workers": {"configured": st.slots, "running": st.running, "ready": st.ready_workers},
            "restarts": st.restarts,
            "recycles": st.recycles,
            "hung": {"now": st.hung_now, "by_slot": {str(slot): n for slot, n in st.hung}},
            "master_pid": st.pid,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _family(host: str) -> socket.AddressFamily:
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


class _HTTPServer(http.server.HTTPServer):
    admin: AdminServer

    def __init__(self, address: tuple[str, int], handler: type[_Handler], *, family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive

    def do_GET(self) -> None:
        self._reply(head=False)

    def do_HEAD(self) -> None:
        self._reply(head=True)

    def _reply(self, *, head: bool) -> None:
        try:
            code, ctype, body = self.server.admin.answer(self.path)
        except Exception as exc:  # noqa: BLE001 - a scrape must never take the master down
            self.server.admin.log.error("admin_error", path=self.path, error=repr(exc))
            code, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Requests are not logged: probes every few seconds would drown the events."""
