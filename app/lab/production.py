"""The production server in the lab: the per-core master, or one worker in-process.

Owns: adapting ``app.server.master`` and ``app.server.worker`` to ``python -m app lab``
(``percore`` is exactly ``python -m app serve``; ``worker`` runs one
:class:`app.server.worker.Worker` on one socket in this process: the same code on
one core, to compare with the single-loop lab servers).
Never: reimplements anything of the production server.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from app.config import Settings
from app.lab.shell import announce_ready, open_listener


def serve(settings: Settings, *, name: str, percore: bool = False, **_options: Any) -> int:
    """Run the production server (``percore``) or one production worker in this process."""
    if percore:
        from app.server.master import serve_master  # noqa: PLC0415

        return serve_master(settings)
    from app.server.loops import choose_loop  # noqa: PLC0415
    from app.server.worker import build_worker  # noqa: PLC0415

    run = choose_loop(settings.loop).run  # LOOP, as a production worker (without its boot-time warning)

    listener = open_listener(settings, blocking=False)
    # Built as a production worker is: the same event and close-line loggers.
    worker = build_worker(settings, listener, slot=0, on_ready=lambda: announce_ready(name, listener, settings))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
        loop.add_signal_handler(signal.SIGINT, worker.request_stop)
        await worker.serve()

    run(main())
    return 0
