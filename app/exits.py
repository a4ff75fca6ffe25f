"""Exit codes shared by the master, its workers and the CLI (named, never bare ints).

Owns: what each exit status means to a process manager.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
#: A worker slot crashed too often (see ``master.CRASH_LIMIT``); supervisord
#: or the platform should see the failure rather than a silent restart loop.
CRASH_LOOP: Final = 1
#: Invalid configuration: nothing was started (also argparse's usage code).
CONFIG: Final = 2
#: A worker failed before it was ready to serve (bind error, import error...).
BOOT_FAILED: Final = 3
#: A health check (``python -m app check``) got no answer or a wrong one.
UNHEALTHY: Final = 1
