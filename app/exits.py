"""Exit codes of ``python -m app``, named, never bare ints.

Owns: what each exit status means to whoever reads it.  Two namespaces,
because the same number means different things to different readers:
:class:`Exit` is the server's process status (the master, its workers and
the CLI), read by a process manager; :class:`Probe` is the status of the
commands that ask a running server (``check``, ``client``), read by a health
checker.  ``Probe.UNHEALTHY`` and ``Exit.CRASH_LOOP`` are both 1 and never
meet.

Never: exits, or decides anything; the callers return these values.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class Exit(IntEnum):
    """Status of the server process (master, worker) and of the CLI."""

    OK = 0
    #: A worker slot crashed too often (see ``master.CRASH_LIMIT``); supervisord
    #: or the platform should see the failure rather than a silent restart loop.
    CRASH_LOOP = 1
    #: Invalid configuration or command line: nothing was started (also
    #: argparse's usage code).
    CONFIG = 2
    #: A worker failed before it was ready to serve (bind error, import error...).
    BOOT_FAILED = 3
    #: Stopped by Ctrl-C outside the server's own handler: 128 + SIGINT, as a shell reports it.
    INTERRUPTED = 130


@unique
class Probe(IntEnum):
    """Status of ``python -m app check`` and ``client``: whether the server answered right."""

    HEALTHY = 0
    #: No connection, a timeout or a wrong answer.
    UNHEALTHY = 1
