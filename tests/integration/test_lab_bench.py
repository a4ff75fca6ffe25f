"""Smoke tests of ``python -m app bench`` and ``python -m app compare`` with tiny durations.

Real servers, real sockets, the real command line: the JSON line is there
and sane (answers, zero errors against correct servers), failures are
counted (a wrong server, an unserved client), and compare writes its
report and PNG plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.tools.process import RunningServer, running_server
from tests.server import serve_badly

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def good_server() -> Iterator[RunningServer]:
    with running_server("asyncio-protocol-uvloop") as server:
        yield server


def run_app(*argv: str, timeout: float = 120) -> tuple[int, str, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "app", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr}"
    return proc.returncode, proc.stdout, json.loads(lines[-1])


@pytest.mark.parametrize("mode", ["pingpong", "pipeline", "churn", "hold"])
def test_bench_json_line_against_a_correct_server(good_server: RunningServer, mode: str) -> None:
    code, _out, result = run_app(
        "bench", "--port", str(good_server.port), "--mode", mode, "-t", "0.5", "-c", "4", "-p", "2", "--json"
    )
    assert code == 0, result
    assert result["mode"] == mode
    assert result["errors"] == 0
    assert result["answers"] > 0
    assert result["rps"] > 0
    assert result["served"] >= 4
    if mode == "hold":
        assert result["held"] == 4
        assert result["answers"] == 8  # one question when opened, one after idling
    if mode == "churn":
        assert result["connects"] > 4
        assert result["answers"] >= 3 * result["served"]


def test_bench_prints_a_table_then_the_json_line(good_server: RunningServer) -> None:
    code, out, result = run_app("bench", "--port", str(good_server.port), "-t", "0.3", "-c", "2", "-p", "1")
    assert code == 0
    assert "answers/s" in out
    assert "p99 ms" in out
    assert result["connections"] == 2


def test_bench_rejects_bad_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app", "bench", "-c", "0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    assert "--connections must be at least 1" in proc.stderr


@pytest.fixture
def wrong_server() -> Iterator[int]:
    """A server on loopback that answers every read with the wrong answer."""
    with serve_badly(lambda conn, _data: conn.sendall(b"Wrong.")) as port:
        yield port


def test_bench_counts_wrong_answers(wrong_server: int) -> None:
    code, _out, result = run_app("bench", "--port", str(wrong_server), "-t", "0.5", "-c", "2", "-p", "1", "--json")
    assert code == 1
    assert result["errors"] > 0
    assert result["error_kinds"].get("mismatch", 0) == result["errors"]
    assert result["served"] == 0


def test_bench_counts_clients_a_server_does_not_serve() -> None:
    with running_server("single") as server:
        code, _out, result = run_app(
            "bench", "--port", str(server.port), "-t", "1.0", "-c", "3", "-p", "1", "--timeout", "0.3", "--json"
        )
    assert code == 1
    assert result["served"] == 1, "the single-threaded server serves one connection at a time"
    assert result["error_kinds"].get("timeout", 0) >= 2


def test_compare_writes_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, table, summary = run_app(
        "compare", "--servers", "single,poll,percore", "-t", "0.4", "-c", "4", "--hold", "20", "--pool", "2",
        "--workers", "2", "-p", "1", "-o", str(out), timeout=240,
    )  # fmt: skip
    assert code == 0, summary
    assert summary["servers"] == 3
    assert summary["failed"] == []
    for name in ("throughput.png", "latency.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5000
    assert "percore: pipeline" in table
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    for name in ("poll", "percore"):
        for load in results[name]["loads"]:
            assert load["errors"] == 0, (name, load)
            assert load["answers"] > 0
        assert results[name]["scenarios"]["second_client_while_one_idles"] is True
        assert results[name]["scenarios"]["held_answered"] == 20
    assert results["single"]["scenarios"]["second_client_while_one_idles"] is False
    report = (out / "report.md").read_text()
    assert "| percore |" in report
    assert "![answers per second](throughput.png)" in report
