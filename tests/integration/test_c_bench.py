"""The benchmark's C programs: built with bench/Makefile, checked over real sockets.

``zenref`` must pass the conformance table and answer byte for byte like our
server (every aphorism, the configurable size limit).  ``zenload`` must load
our production worker in every mode without a single error, and must count
errors against a server that answers wrongly or not at all: a verifier that
cannot fail verifies nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core import zen
from app.tools.process import RunningServer, running_server
from tests.conformance import CASES, Case, check_case, recv_exactly, recv_until_eof
from tests.server import serve_badly

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both programs, built from bench/ into a temporary folder (warnings are errors here)."""
    out = tmp_path_factory.mktemp("cbench")
    proc = subprocess.run(
        ["make", "-C", str(BENCH), f"OUT={out}", "CFLAGS=-O2 -Wall -Wextra -Werror"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "zenref").is_file()
    assert (out / "zenload").is_file()
    return out


def start_zenref(tools: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    """zenref on a free port; its first stdout line says which, once every listener is bound."""
    proc = subprocess.Popen([str(tools / "zenref"), "-p", "0", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("zenref listening on 127.0.0.1:"), line
    return proc, int(line.split()[3].rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def zenref(tools: Path) -> Iterator[int]:
    proc, port = start_zenref(tools, "-t", "2")
    yield port
    assert proc.poll() is None, "zenref died"
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_zenref_passes_the_conformance_table(zenref: int, case: Case) -> None:
    check_case("127.0.0.1", zenref, case, timeout=10.0)


def test_zenref_knows_every_aphorism_of_ours(zenref: int) -> None:
    questions = b"".join(zen.APHORISMS)
    with socket.create_connection(("127.0.0.1", zenref), timeout=5) as sock:
        sock.sendall(questions + b"Nested is better than?")
        want = zen.answers([*zen.APHORISMS, b"Nested is better than?"])
        assert recv_exactly(sock, len(want)) == want


def test_zenref_size_limit_is_configurable(tools: Path) -> None:
    proc, port = start_zenref(tools, "-q", "32")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b" " * 100 + b"x" * 31 + b"?")  # whitespace before does not count
            assert recv_exactly(sock, len(zen.UNKNOWN)) == zen.UNKNOWN
            sock.sendall(b"Beautiful is better than?" + b"y" * 32)
            assert recv_until_eof(sock) == b"Ugly." + zen.TOO_LONG
    finally:
        proc.terminate()
        proc.wait(10)


def zenload(tools: Path, port: int, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run zenload; its exit status and its JSON lines by event."""
    proc = subprocess.run(
        [str(tools / "zenload"), "-p", str(port), *args], capture_output=True, text=True, timeout=60, check=False
    )
    events = {e["event"]: e for e in map(json.loads, proc.stdout.splitlines())}
    assert "summary" in events, proc.stdout + proc.stderr
    return proc.returncode, events


@pytest.fixture(scope="module")
def production() -> Iterator[RunningServer]:
    with running_server("worker") as server:
        yield server


LOADS = {
    "pingpong": ("-m", "pingpong", "-c", "20", "-d", "1"),
    "pipeline": ("-m", "pipeline", "-c", "10", "-D", "8", "-d", "1"),
    "churn": ("-m", "churn", "-c", "10", "-d", "1", "-t", "2"),
    "hold": ("-m", "hold", "-c", "300", "-d", "0.5", "-w", "20"),
}


@pytest.mark.parametrize("mode", sorted(LOADS))
def test_zenload_loads_our_worker_without_an_error(tools: Path, production: RunningServer, mode: str) -> None:
    code, events = zenload(tools, production.port, *LOADS[mode])
    summary = events["summary"]
    assert code == 0, summary
    assert summary["errors"] == 0
    assert set(summary["error_kinds"]) == {"mismatch", "eof", "io", "connect", "timeout"}
    assert summary["completed"] > 0
    assert summary["rps"] > 0
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["max_us"]
    if mode == "churn":
        assert summary["cycles"] > 0
        assert summary["completed"] >= 3 * summary["cycles"]
    if mode == "hold":
        assert events["ready"]["connections"] == 300
        assert summary["alive"] == 300, "every held connection is answered again after idling"


def test_zenload_loads_zenref_without_an_error(tools: Path, zenref: int) -> None:
    code, events = zenload(tools, zenref, "-m", "pipeline", "-c", "4", "-D", "32", "-d", "0.5")
    assert code == 0
    assert events["summary"]["errors"] == 0
    assert events["summary"]["completed"] > 100


def wrong_answers(conn: socket.socket, data: bytes) -> None:
    conn.sendall(b"Wrong." * data.count(b"?"))


def one_byte_off(conn: socket.socket, data: bytes) -> None:
    """Right but for the last byte of every answer: byte-exact means every byte."""
    answers = zen.answers([q + b"?" for q in data.split(b"?")[:-1]])
    conn.sendall(answers.replace(b".", b"!"))


def silence(_conn: socket.socket, _data: bytes) -> None:
    pass


@pytest.mark.parametrize(("reply", "kind"), [(wrong_answers, "mismatch"), (one_byte_off, "mismatch"),
                                             (silence, "timeout")])  # fmt: skip
def test_zenload_counts_what_a_bad_server_gets_wrong(
    tools: Path, reply: Callable[[socket.socket, bytes], None], kind: str
) -> None:
    with serve_badly(reply) as port:
        code, events = zenload(tools, port, "-m", "pingpong", "-c", "2", "-d", "1", "-T", "0.3")
        summary = events["summary"]
        assert code == 1
        assert summary["completed"] == 0
        assert summary["errors"] > 0
        assert summary["error_kinds"][kind] == summary["errors"]


def test_zenload_counts_refused_connections(tools: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        code, events = zenload(tools, sock.getsockname()[1], "-m", "churn", "-c", "2", "-d", "0.3")
    assert code == 1
    assert events["summary"]["error_kinds"]["connect"] > 0


def test_zenload_hold_reports_notready_at_its_limit(tools: Path) -> None:
    with serve_badly(silence) as port:
        code, events = zenload(tools, port, "-m", "hold", "-c", "5", "-d", "0.2", "-w", "0.5", "-T", "2")
        assert code == 1
        assert "ready" not in events
        assert events["notready"]["ready"] == 0


def test_zenload_rejects_bad_options(tools: Path) -> None:
    for args in (["-m", "nonsense"], ["-c", "0"], ["-d", "0"], ["-a", "localhost"]):
        proc = subprocess.run([str(tools / "zenload"), *args], capture_output=True, text=True, timeout=10, check=False)
        assert proc.returncode == 2, args
        assert "usage" in proc.stderr
