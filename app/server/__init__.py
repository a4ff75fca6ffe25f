"""The production daemon: listener, accepting, connection, worker, master, admin, metrics.

Owns: the I/O shell around :mod:`app.core` that ships: one uvloop worker per
core on its own ``SO_REUSEPORT`` socket, and the master that supervises them.

Never: imports the lab, the tools or the command line (import-linter
contract in ``pyproject.toml``).
"""
