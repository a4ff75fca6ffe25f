"""Security posture of the running server.

- Nothing listens beyond what is configured (the server's own sockets,
  inspected with psutil).
- Client input is never evaluated nor handed to a shell: hostile questions
  get the unknown-aphorism answer, nothing runs, no process is started; and
  no server module that handles client bytes calls eval/exec/a shell.
- Client bytes in log events are escaped: a question carrying newlines or
  terminal escape sequences cannot forge or corrupt a log line, in JSON and
  in console format.

The supervisorctl socket (0700) and the non-root container are checked by
the deployment suite (tests/deploy).
"""

from __future__ import annotations

import ast
import socket
import tempfile
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from app.core import zen
from tests.server import free_port

from .server import Server, open_server

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[2] / "app"
#: The modules that receive client bytes.
CLIENT_FACING = (
    "core/protocol.py",
    "core/zen.py",
    "server/connection.py",
    "server/worker.py",
    "logs.py",
    "core/proxy.py",
)
FORBIDDEN_BUILTINS = frozenset({"eval", "exec", "compile", "__import__"})
FORBIDDEN_MODULES = frozenset({"subprocess", "pickle", "marshal", "shlex", "pty"})
FORBIDDEN_OS = frozenset({"system", "popen", "execv", "execve", "execvp", "spawnv", "spawnl", "posix_spawn", "fork"})
#: Newlines, a forged JSON event, a carriage return, terminal escapes (clear screen, set title, bell).
EVIL = b'x\n{"event":"forged","level":"critical"}\r\x1b[2J\x1b]0;pwned\x07'
CONTROL = (b"\x1b", b"\x07", b"\r")


def _server_pids(server: Server) -> set[int]:
    return {server.pid} | {p.pid for p in server.workers()}


def _inet_sockets(pids: set[int]) -> list[Any]:
    out = []
    for pid in pids:
        out.extend(psutil.Process(pid).net_connections("inet"))
    return out


def test_nothing_listens_beyond_what_is_configured(figures: dict[str, Any]) -> None:
    admin = free_port()
    with open_server({"ADMIN_PORT": str(admin)}) as server:
        with socket.create_connection(server.addr) as client:
            client.sendall(b"Beautiful is better than?")
            assert client.recv(16) == b"Ugly."
            conns = _inet_sockets(_server_pids(server))
        listening = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
        udp = [c for c in conns if c.type == socket.SOCK_DGRAM]
        others = [c for c in conns if c.status not in (psutil.CONN_LISTEN, psutil.CONN_ESTABLISHED)]
    assert listening == {("127.0.0.1", server.port), ("127.0.0.1", admin)}
    assert udp == []
    assert others == []
    figures["listening"] = sorted(f"{ip}:{port}" for ip, port in listening)


def test_without_admin_port_only_the_zen_port_listens() -> None:
    with open_server() as server:
        conns = _inet_sockets(_server_pids(server))
    assert {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN} == {("127.0.0.1", server.port)}


HOSTILE = (
    b"__import__('os').system('touch {canary}')?",
    b"$(touch {canary})?",
    b"`touch {canary}`?",
    b"; touch {canary} #?",
    b"| touch {canary}?",
    b"{0.__class__.__mro__}?",
    b"%s%s%s%n%x?",
    b"${jndi:ldap://127.0.0.1/x}?",
    b"\x00\xff\xfe'\"\\?",
    b"Beautiful is better than? ; touch {canary}?",
)


def test_hostile_questions_are_never_evaluated(figures: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp, open_server() as server:
        canary = Path(tmp) / "canary"
        questions = [q.replace(b"{canary}", str(canary).encode()) for q in HOSTILE]
        expected = [b"".join(zen.answer(p.strip() + b"?") for p in q.split(b"?")[:-1]) for q in questions]
        with socket.create_connection(server.addr) as client:
            for question, answer in zip(questions, expected, strict=True):
                client.sendall(question)
                got = b""
                while len(got) < len(answer):
                    got += client.recv(64)
                assert got == answer
        workers = server.workers()
        assert all(not w.children() for w in workers), "a worker started a process"
        assert len(psutil.Process(server.pid).children()) == len(workers) == 2
        assert not canary.exists()
    assert expected[:-1] == [zen.UNKNOWN] * (len(HOSTILE) - 1)
    assert expected[-1] == b"Ugly." + zen.UNKNOWN
    figures["hostile_questions"] = len(HOSTILE)


def _forbidden(path: Path) -> set[str]:
    """Calls of eval-like builtins, of os process functions, shell=..., and imports of process/pickle modules."""
    bad = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad |= {m for m in modules if m.split(".")[0] in FORBIDDEN_MODULES}
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_BUILTINS:
                bad.add(func.id)
            name = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if name == "os" and isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_OS:
                bad.add(f"os.{func.attr}")
            if any(k.arg == "shell" for k in node.keywords):
                bad.add("shell=")
    return bad


def test_client_facing_modules_never_evaluate_or_spawn() -> None:
    checked = 0
    for name in CLIENT_FACING:
        path = APP / name
        if path.exists():
            checked += 1
            bad = _forbidden(path)
            assert not bad, f"{name}: {sorted(bad)}"
    assert checked >= 4
    # And the check itself catches what it looks for.
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.py"
        sample.write_text("import os, subprocess\nos.system('x')\neval('1')\nsubprocess.run('x', shell=True)\n")
        assert _forbidden(sample) == {"subprocess", "os.system", "eval", "shell="}


def _log_lines_about_evil(server: Server, env: dict[str, str]) -> None:
    """Send EVIL three ways: unfinished at EOF, stalled until REQUEST_TIMEOUT, inside a question."""
    with socket.create_connection(server.addr) as eof:
        eof.sendall(EVIL)
        eof.shutdown(socket.SHUT_WR)
        eof.settimeout(10)
        assert eof.recv(64) == b""
    stalled = socket.create_connection(server.addr)
    stalled.sendall(EVIL)
    with socket.create_connection(server.addr) as asked:
        asked.sendall(EVIL + b"?")
        asked.settimeout(10)
        assert asked.recv(64) == zen.UNKNOWN
    stalled.settimeout(float(env["REQUEST_TIMEOUT"]) + 5)
    assert stalled.recv(64) == b""  # closed by the request timeout
    stalled.close()


def _raw_log(server: Server) -> bytes:
    server.log.refresh()
    return b"\n".join(server.log.raw)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_client_bytes_cannot_forge_or_corrupt_a_log_line(fmt: str, figures: dict[str, Any]) -> None:
    env = {"LOG_FORMAT": fmt, "REQUEST_TIMEOUT": "1"}
    with open_server(env, ready=False) as server:
        server.wait_for("server_ready", lambda: b"server_ready" in _raw_log(server), 20)
        _log_lines_about_evil(server, env)
        server.wait_for("two connection_closed lines", lambda: _raw_log(server).count(b"forged") >= 2, 10)
    raw = _raw_log(server)
    for byte in CONTROL:
        assert byte not in raw, f"raw {byte!r} from a client reached the log"
    lines = raw.split(b"\n")
    assert not any(line.lstrip().startswith(b'{"event":"forged"') for line in lines)
    evil_lines = [line for line in lines if b"forged" in line]
    assert len(evil_lines) == 2  # the EOF and the timeout closes; the answered question is not logged
    if fmt == "json":
        events = [orjson.loads(line) for line in lines if line]
        assert all(e["event"] != "forged" for e in events)
        unfinished = [e["unfinished"] for e in events if "unfinished" in e]
        assert unfinished == [unfinished[0]] * 2
        assert "\\n" in unfinished[0]
        assert "\\x1b" in unfinished[0]
    else:
        assert all(b"connection_closed" in line for line in evil_lines)
    figures[f"log_injection_{fmt}"] = "escaped"


def test_proxy_header_bytes_are_escaped_in_the_log() -> None:
    env = {"PROXY_PROTOCOL": "v1"}
    with open_server(env) as server:
        with socket.create_connection(server.addr) as sock:
            sock.sendall(b"PROXY TCP4 " + EVIL + b" 127.0.0.1 1 2\r\n")
            sock.settimeout(10)
            assert sock.recv(64) == b""
        closed = server.wait_event("connection_closed", reason="proxy_invalid")
    raw = _raw_log(server)
    for byte in CONTROL:
        assert byte not in raw
    assert all(e["event"] != "forged" for e in server.log.events)
    assert "proxy_error" in closed[0]
