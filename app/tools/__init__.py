"""Tools around the server: the client and health probe, the load generator, the lab comparison.

Owns: everything that talks to a server from outside (``client``, ``bench``)
and the lab's measuring harness (``process``, ``scenarios``, ``compare``).

Never: imported by the server or the lab (import-linter contract in
``pyproject.toml``); ``rich``, ``psutil`` and ``matplotlib`` are needed here
only, so the daemon's install does not carry them.
"""
