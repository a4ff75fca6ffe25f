"""The pure core: the Zen protocol, its aphorisms, the PROXY header, the per-connection policy.

Owns: every decision about bytes and time that a server makes, as functions
of their inputs (sans-I/O, as h11): framing questions, choosing answers,
parsing PROXY headers, which deadline applies and when a connection closes.

Never: touches a socket, a clock, an event loop, the environment or the
logs.  It imports nothing of ``app`` outside ``app.core`` (an import-linter
contract in ``pyproject.toml`` checks it in the test command).
"""
