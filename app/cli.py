"""Command line: argv -> subcommand.  No logic here; each command lives in its module.

``--version`` names the release and the build (compiled or pure Python, :mod:`app.build`).
Subcommands: serve (the default), config, client, check, lab, bench, compare, and the internal
``worker`` that the master starts.  Imports are lazy so that ``client`` and
``check`` start fast and never load the server.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from app import build
from app.config import ConfigError, Settings, load
from app.exits import Exit, Probe

Command = Callable[[argparse.Namespace, Settings], int]
if TYPE_CHECKING:
    from app.tools.client import TLSOptions

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001 (argparse's own name for it)


def _serve(_args: argparse.Namespace, settings: Settings) -> int:
    from app.server.master import serve_master  # noqa: PLC0415

    if settings.tls_cert_file or settings.tls_key_file or settings.tls_client_ca_file:
        from app.server.tls import server_context  # noqa: PLC0415 - only with TLS on

        try:  # at boot, before any worker: a bad certificate is a configuration error (exit 2)
            server_context(settings)
        except ConfigError as exc:
            print(f"configuration error:\n{exc}", file=sys.stderr)
            return Exit.CONFIG
    return serve_master(settings)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from app.server.worker import serve_worker_process  # noqa: PLC0415

    return serve_worker_process(settings, fd=args.fd, slot=args.slot, ready_fd=args.ready_fd, parent_pid=args.parent)


def _config(args: argparse.Namespace, settings: Settings) -> int:
    from app.config import markdown, rows  # noqa: PLC0415

    if args.markdown:
        print(markdown())
        return Exit.OK

    table = rows(settings)
    width = max(len(name) for name, _, _ in table)
    print(f"{'build':<{width}}  {build.status():<16}  (zen-server {_release()}, Python {platform.python_version()})")
    for name, value, source in table:
        print(f"{name:<{width}}  {value!s:<16}  ({source})")
    return Exit.OK


def _tls_options(args: argparse.Namespace, settings: Settings) -> TLSOptions | None:
    """TLS for client and check: ``--tls`` or a server certificate in the environment (the container's own)."""
    from app.tools.client import TLSOptions  # noqa: PLC0415

    if not (args.tls or args.ca or args.cert or settings.tls_cert_file):
        return None
    return TLSOptions(
        ca=args.ca or settings.tls_check_ca_file,
        cert=args.cert or settings.tls_check_cert_file,
        key=args.key or settings.tls_check_key_file,
        server_name=args.server_name or "",
    )


def _release() -> str:
    try:
        return importlib.metadata.version("zen-server")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _version() -> str:
    """``zen-server 0.1.0 (compiled, Python 3.13.1)``: the release, which build, which interpreter."""
    return f"zen-server {_release()} ({build.status()}, Python {platform.python_version()})"


def _client(args: argparse.Namespace, settings: Settings) -> int:
    from app.tools.client import ZenClient, connect_host, tls_context  # noqa: PLC0415

    questions = [q.encode() for q in args.question] or [line.strip().encode() for line in sys.stdin if line.strip()]
    host = args.host or connect_host(settings.host)
    port = args.port or settings.port
    options = _tls_options(args, settings)
    try:
        tls = None if options is None else tls_context(options)
        name = None if options is None else options.server_name or None
        with ZenClient(host, port, timeout=args.timeout, tls=tls, server_name=name) as client:
            for question in questions:
                answer = client.ask(question)
                print(answer.decode("utf-8", "backslashreplace"))
    except (OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return Probe.UNHEALTHY  # no answer: what the probe reports too
    return Probe.HEALTHY


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from app.tools.client import check  # noqa: PLC0415

    healthy, message = check(
        args.host or settings.host,
        args.port or settings.port,
        timeout=args.timeout or settings.check_timeout,
        proxy_protocol=settings.proxy_protocol,
        tls=_tls_options(args, settings),
        min_days=settings.tls_expiry_warn_days if args.min_days is None else args.min_days,
    )
    print(message, file=sys.stdout if healthy else sys.stderr)
    return Probe.HEALTHY if healthy else Probe.UNHEALTHY


def _lab(args: argparse.Namespace, settings: Settings) -> int:
    from app.lab import BY_NAME, describe, serve_lab  # noqa: PLC0415

    if args.list or args.name is None:
        for name, text in describe():
            print(f"{name:<24} {text}")
        return Exit.OK
    if args.name not in BY_NAME:
        print(f"unknown lab server {args.name!r}; see 'python -m app lab --list'", file=sys.stderr)
        return Exit.CONFIG
    return serve_lab(args.name, settings)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from app.tools.bench import main as bench_main  # noqa: PLC0415

    return bench_main(args.args, settings)


def _compare(args: argparse.Namespace, settings: Settings) -> int:
    from app.tools.compare import main as compare_main  # noqa: PLC0415

    return compare_main(args.args, settings)


class _VersionAction(argparse.Action):
    """``--version``, worked out only when asked (every probe parses argv; few ask this)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m app``."""
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Zen protocol server (one event-loop worker per core, uvloop when installed). "
        "Configured by environment variables: see 'python -m app config'.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, nargs=0, help="print the release and the build (compiled or pure Python)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_server_commands(sub)
    _add_probe_commands(sub)
    _add_lab_commands(sub)
    return parser


def _add_server_commands(sub: Subparsers) -> None:
    """The commands of the server itself: serve, config, and the internal worker."""
    sub.add_parser("serve", help="run the server in the foreground (the default)").set_defaults(func=_serve)
    p = sub.add_parser("config", help="print every setting, its effective value and its source")
    p.add_argument(
        "--markdown", action="store_true", help="print the table of variables (the docs' configuration page) instead"
    )
    p.set_defaults(func=_config)
    p = sub.add_parser("worker")  # internal: started by the master; not listed in --help
    for name in ("--fd", "--slot", "--ready-fd", "--parent"):
        p.add_argument(name, type=int, required=True)
    p.set_defaults(func=_worker)


def _add_probe_commands(sub: Subparsers) -> None:
    """The commands that ask a running server: client and check."""
    p = sub.add_parser("client", help="ask questions (arguments, or one per stdin line) and print the answers")
    p.add_argument("question", nargs="*", help="e.g. 'Beautiful is better than?'")
    p.add_argument("--host", help="server address (default: from HOST)")
    p.add_argument("--port", type=int, help="server port (default: from PORT)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    _add_tls_arguments(p)
    p.set_defaults(func=_client)
    p = sub.add_parser(
        "check", help=f"health probe: exit {Probe.HEALTHY:d} on the right answer, {Probe.UNHEALTHY:d} otherwise"
    )
    p.add_argument("--host", help="server address (default: from HOST; a wildcard means loopback)")
    p.add_argument("--port", type=int, help="server port (default: from PORT)")
    p.add_argument("--timeout", type=float, help="seconds (default: CHECK_TIMEOUT)")
    _add_tls_arguments(p)
    p.add_argument(
        "--min-days", type=float, help="over TLS: unhealthy below this many days to expiry (TLS_EXPIRY_WARN_DAYS)"
    )
    p.set_defaults(func=_check)


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """--tls and its files; on by themselves when TLS_CERT_FILE is set (the server's own environment)."""
    p.add_argument("--tls", action="store_true", help="speak TLS (default: on when TLS_CERT_FILE is set)")
    p.add_argument("--ca", help="PEM CA to verify the server with (default: TLS_CHECK_CA_FILE; none: no verification)")
    p.add_argument("--cert", help="PEM client certificate, for mutual TLS (default: TLS_CHECK_CERT_FILE)")
    p.add_argument("--key", help="PEM key of --cert (default: TLS_CHECK_KEY_FILE)")
    p.add_argument("--server-name", help="the name to ask for and verify (default: the host)")


def _add_lab_commands(sub: Subparsers) -> None:
    """The lab's servers and the tools that measure them: lab, bench, compare."""
    p = sub.add_parser("lab", help="run one of the chapter's architectures (lab --list lists them)")
    p.add_argument("name", nargs="?", help="the server to run, e.g. single, threadpool, poll, asyncio-streams")
    p.add_argument("--list", action="store_true", help="list the lab servers with a one-line description")
    p.set_defaults(func=_lab)
    # bench and compare parse their own options (see their --help), so this module stays free of their logic.
    for name, func, text in (
        ("bench", _bench, "load generator: pingpong | pipeline | churn | hold; verifies every answer"),
        ("compare", _compare, "run every lab server under the same loads; report, plots and table"),
    ):
        p = sub.add_parser(name, help=text, add_help=False, prefix_chars="\x00")
        p.add_argument("args", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the settings, run the subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    func: Command = getattr(args, "func", _serve)
    try:
        settings = load()
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return Exit.CONFIG
    try:
        return func(args, settings)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
