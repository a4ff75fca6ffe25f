"""The admin listener of a real ``python -m app``: /metrics over all workers, /healthz, /readyz."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.core import proxy, zen
from app.server import metrics
from app.server.admin import MasterStatus
from app.server.master import Master
from app.server.stats import Stats
from tests.conformance import recv_exactly, recv_until_eof
from tests.server import ServerProcess, free_port, start_server

Q1, A1 = b"Beautiful is better than?", b"Ugly."
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, bytes]:
    """GET from the admin listener; (status, body), 503 included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metrics(port: int, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until ``check`` holds (workers flush at least once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            shown = {k: v for k, v in samples.items() if k[0].startswith("zen_") and "bucket" not in k[0]}
            raise AssertionError(f"metrics never matched; last scrape: {shown}")
        time.sleep(0.1)


def wait_status(port: int, path: str, expected: int, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(port, path)
        if status == expected:
            return body
        assert time.monotonic() < deadline, f"{path} stayed {status}: {body!r}"
        time.sleep(0.05)


_DIRS: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _remove_metric_dirs() -> Iterator[None]:
    yield
    for path in _DIRS:
        shutil.rmtree(path, ignore_errors=True)


def admin_env(**extra: str) -> dict[str, str]:
    # A directory of our own: the clean-up SIGKILLs the master, which then
    # cannot remove a temporary one it made.
    _DIRS.append(tempfile.mkdtemp(prefix="zen-metrics-test-"))
    return {"ADMIN_PORT": str(free_port()), "WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": _DIRS[-1], **extra}


def test_counts_over_all_workers() -> None:
    env = admin_env(REQUEST_TIMEOUT="0.6", MAX_REQUEST_BYTES="64")
    with start_server(env) as server:
        admin = int(env["ADMIN_PORT"])
        port = server.port
        for _ in range(4):  # spread over both workers by the kernel
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(Q1 + Q1 + b"x?")
                assert recv_exactly(sock, 2 * len(A1) + len(zen.UNKNOWN)) == A1 + A1 + zen.UNKNOWN
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"y" * 100)
            assert recv_until_eof(sock) == zen.TOO_LONG
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"Beautiful is")  # never finished: the request timeout closes it
            assert recv_until_eof(sock) == b""
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        held.sendall(Q1)
        assert recv_exactly(held, len(A1)) == A1

        def settled(s: Samples) -> bool:
            return value(s, "zen_connections_total") == 7 and value(s, "zen_connections_open") == 1

        s = wait_metrics(admin, settled)
        assert value(s, "zen_questions_total", outcome="known") == 9  # 8 + the held connection's one
        assert value(s, "zen_questions_total", outcome="unknown") == 4
        assert value(s, "zen_questions_total", outcome="too_long") == 1
        assert value(s, "zen_connection_closes_total", reason="eof") == 4
        assert value(s, "zen_connection_closes_total", reason="too_long") == 1
        assert value(s, "zen_connection_closes_total", reason="request_timeout") == 1
        assert value(s, "zen_timeouts_total", kind="request") == 1
        assert value(s, "zen_timeouts_total", kind="idle") == 0
        assert value(s, "zen_connection_duration_seconds_count") == 6
        assert value(s, "zen_connection_duration_seconds_bucket", le="+Inf") == 6
        assert value(s, "zen_connection_duration_seconds_bucket", le="0.5") <= 5  # the timed-out one lived > 0.6 s
        assert value(s, "zen_event_loop_lag_seconds_count") >= 1
        assert value(s, "zen_workers", state="ready") == 2
        assert value(s, "zen_ready") == 1
        held.close()
        wait_metrics(admin, lambda s: value(s, "zen_connections_open") == 0)


def test_backpressure_pauses_are_counted() -> None:
    env = admin_env(WORKERS="1", MAX_UNSENT_BYTES="4096")
    with start_server(env) as server:
        count = 500_000  # 1 MB of "x?" asks for 12 MB of answers: more than the kernel buffers hold
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sender = threading.Thread(target=sock.sendall, args=(b"x?" * count,), daemon=True)
            sender.start()
            time.sleep(0.5)  # nobody reads yet: the server must pause reading
            want = len(zen.UNKNOWN) * count
            got = 0
            while got < want:
                chunk = sock.recv(1 << 20)
                assert chunk
                got += len(chunk)
            sender.join(10)

        def counted(s: Samples) -> bool:
            return value(s, "zen_questions_total", outcome="unknown") == count

        s = wait_metrics(int(env["ADMIN_PORT"]), counted)
        assert value(s, "zen_backpressure_pauses_total") >= 1


def test_proxy_headers_and_rejections_are_counted() -> None:
    env = admin_env(PROXY_PROTOCOL="v2")
    with start_server(env) as server:
        for header in (proxy.v2_header(None, None), proxy.v2_header(("192.0.2.1", 9), ("192.0.2.2", 1060))):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(header + Q1)
                assert recv_exactly(sock, len(A1)) == A1
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(Q1)
            assert recv_until_eof(sock) == b""

        def counted(s: Samples) -> bool:  # each worker flushes on its own tick: wait for all three
            return (
                value(s, "zen_connection_closes_total", reason="proxy_missing") == 1
                and value(s, "zen_proxy_headers_total", command="LOCAL") == 1
                and value(s, "zen_proxy_headers_total", command="PROXY") == 1
            )

        s = wait_metrics(int(env["ADMIN_PORT"]), counted)
        assert value(s, "zen_questions_total", outcome="known") == 2


def test_ready_and_healthy_then_not_ready_from_the_stop_signal() -> None:
    env = admin_env(GRACEFUL_TIMEOUT="20", DRAIN_QUIET="20")
    with start_server(env) as server:
        admin = int(env["ADMIN_PORT"])
        assert b'"ready":true' in wait_status(admin, "/readyz", 200)
        assert b'"running":2' in wait_status(admin, "/healthz", 200)
        held = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        held.sendall(Q1)
        assert recv_exactly(held, len(A1)) == A1  # an idle connection keeps the drain going
        server.signal(signal.SIGTERM)
        assert b'"stopping":true' in wait_status(admin, "/readyz", 503, timeout=2.0)
        assert get(admin, "/healthz")[0] == 200  # draining is alive
        held.sendall(Q1)  # the connection already accepted is still served
        assert recv_exactly(held, len(A1)) == A1
        held.close()
        assert server.wait(30) == 0
        with pytest.raises(OSError):
            get(admin, "/readyz")  # the admin listener went with the master


def test_readiness_drops_in_the_signal_handler_before_the_listeners_close() -> None:
    # The handler only records; the listeners close later, in the main loop
    # (_begin_stop).  Between the two, /readyz must already say 503.
    master = Master(Settings(workers=1), log=None)
    master.announced = True
    master._publish()
    assert master.status().ready
    master._record(signal.SIGTERM, None)
    assert not master.status().ready
    assert master.status().stopping
    assert not master.stopping  # nothing acted on yet: the signal is only queued
    assert list(master._signals) == [signal.SIGTERM]


def test_healthz_reflects_workers_and_the_master_loop() -> None:
    now = time.monotonic()
    assert MasterStatus(pid=1, slots=2, running=2, updated=now).live
    assert not MasterStatus(pid=1, slots=2, running=1, updated=now).live  # a worker waits for its respawn
    assert MasterStatus(pid=1, slots=2, running=1, stopping=True, updated=now).live
    assert not MasterStatus(pid=1, slots=2, running=2, updated=now - 60).live  # the master's loop is stuck
    assert not MasterStatus(pid=1, announced=False).ready


def test_worker_restarts_are_counted_and_health_recovers() -> None:
    env = admin_env()
    with start_server(env) as server:
        admin = int(env["ADMIN_PORT"])
        slot, pid = min(server.worker_pids().items())
        start = len(server.events)
        os.kill(pid, signal.SIGKILL)
        server.wait_event("worker_spawned", lambda e: e["slot"] == slot, start=start)
        s = wait_metrics(admin, lambda s: value(s, "zen_worker_restarts_total") == 1)
        assert value(s, "zen_workers", state="configured") == 2
        wait_status(admin, "/healthz", 200)
        assert not any(Path(server_dir(server)).glob(f"gauge_livesum_{pid}.db"))


def server_dir(server: ServerProcess) -> str:
    return str(server.wait_event("admin_listening")["metrics_dir"])


def test_multiproc_dir_is_cleaned_at_start_and_a_temporary_one_removed_at_exit(tmp_path: Path) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_999999.db").write_bytes(b"stale counters of an earlier run")
    (given / "README").write_text("not ours")
    with start_server(admin_env(PROMETHEUS_MULTIPROC_DIR=str(given))) as server:
        assert server_dir(server) == str(given)
        assert not (given / "counter_999999.db").exists()
        assert (given / "README").exists()
    with start_server(admin_env(PROMETHEUS_MULTIPROC_DIR="")) as server:  # "": the master makes one
        made = Path(server_dir(server))
        assert made.is_dir()
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert not made.exists()


def test_admin_port_in_use_is_a_boot_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"ADMIN_PORT": str(taken.getsockname()[1]), "WORKERS": "1"}
        with start_server(env, ready=False) as server:
            assert server.wait(30) == 3
            event = server.wait_event("bind_failed")
            assert event["listener"] == "admin"
            assert not server.find("worker_spawned")


def test_admin_is_off_by_default_and_unknown_paths_are_404() -> None:
    with start_server({"WORKERS": "1"}) as server:
        assert not server.find("admin_listening")
    env = admin_env(WORKERS="1")
    with start_server(env):
        status, body = get(int(env["ADMIN_PORT"]), "/nope")
        assert status == 404
        assert b"/metrics" in body


@given(st.lists(st.sampled_from([*zen.APHORISMS, b"x?", b"?", zen.UNKNOWN + b"?", b"Ugly.?"]), max_size=40))
def test_counting_answers_counts_exactly_the_unknown(questions: list[bytes]) -> None:
    stats = Stats()
    answers = metrics.WorkerMetrics.counting_answers(stats)
    assert answers(questions) == zen.answers(questions)
    assert stats.unknown == sum(q not in zen.APHORISMS for q in questions)


def test_bulk_histogram_flush_equals_observe() -> None:
    # WorkerMetrics adds pre-bucketed counts to prometheus-client's own bucket
    # values; the exposition must be what observe() gives for the same values.
    durations = [0.0005, 0.001, 0.003, 0.2, 7.0, 400.0, 0.2]
    wm = metrics.WorkerMetrics(Settings(prometheus_multiproc_dir="unused-in-this-process"))
    for d in durations:
        wm.connection_closed(d)
    wm._flush_durations()
    reference = Histogram("ref_seconds", "x", buckets=metrics.DURATION_BUCKETS, registry=CollectorRegistry())
    for d in durations:
        reference.observe(d)

    def samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        family = next(iter(h.collect()))
        return [
            (s.name.rsplit("_seconds", 1)[1], s.labels, round(s.value, 9))
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples(wm.duration) == samples(reference)
