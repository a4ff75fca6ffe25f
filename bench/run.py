"""Benchmark: our server against the C reference server ``zenref``, in one run.

Builds ``zenload`` and ``zenref`` from ``../shared/bench`` (copied to a
temporary folder), then for each server runs each load mode with the server
pinned to CPU 0 and ``zenload`` pinned to CPU 1, and prints requests/s,
server CPU microseconds per request (utime+stime of the server's whole
process tree over the measured window), p99 latency, and the ratio to zenref;
then the resident memory per idle connection with 10,000 held connections.
Only ratios measured side by side mean anything on a shared machine: each
round runs zenref and then ours, and the ratio printed is the median of the
rounds' ratios, with their range.

Usage: python bench/run.py [--duration 8] [--rounds 5] [--modes pingpong,pipeline,churn] [--hold 10000]
                           [--host-network]
Extra environment for our server (e.g. ADMIN_PORT=9101) is passed through.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ZEN_SHARED_BENCH", REPO.parent / "shared" / "bench"))
TARGETS = {"pingpong": 1.35, "pipeline": 2.5, "churn": 1.5}
MODE_ARGS = {
    "pingpong": ["-m", "pingpong", "-c", "50"],
    "pipeline": ["-m", "pipeline", "-c", "50", "-D", "16"],
    "churn": ["-m", "churn", "-c", "50"],
}
#: Command prefix that runs a server or zenload in the benchmark's own network
#: namespace (set in main()).  A churn run opens 100,000 connections; on the
#: host's loopback they fill the connection-tracking table when a firewall
#: (podman's netavark, for one) has loaded it, after which the kernel drops
#: SYNs and a run measures 50 requests/s.  A new namespace has an empty
#: loopback, no conntrack, no TIME_WAIT left by earlier runs or other tests.
NETNS: list[str] = []


@dataclass
class Result:
    server: str
    mode: str
    rps: float
    cpu_us: float
    p99_us: float
    errors: int


def build_tools() -> Path:
    """Copy ../shared/bench (it may be read-only) and build zenload and zenref."""
    work = Path(tempfile.mkdtemp(prefix="zenbench-"))
    shutil.copytree(SHARED, work / "bench")
    subprocess.run(["make", "-s", "-C", str(work / "bench")], check=True)
    return work / "bench"


#: Server ports come from below the ephemeral range (32768 and up): zenload's
#: churn leaves its client ports there in TIME_WAIT, and a listener cannot
#: bind a port that a TIME_WAIT client socket without SO_REUSEADDR holds.
_ports = itertools.count(20000 + os.getpid() % 1000 * 10)


def free_port() -> int:
    """A port below the ephemeral range that binds on 127.0.0.1 here (the host or the namespace)."""
    for port in _ports:
        if port >= 32768:
            break
        if not NETNS:  # the host: something else may hold it
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port  # the namespace is ours: each run takes the next port
    raise RuntimeError("no free port below 32768")


_PROBE = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.5).close()"


def _listening(port: int) -> bool:
    if NETNS:  # connect from inside the namespace
        probe = subprocess.run([*NETNS, sys.executable, "-c", _PROBE, str(port)], check=False, capture_output=True)
        return probe.returncode == 0
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout}s")


@contextmanager
def own_netns(wanted: bool) -> Iterator[str | None]:
    """A fresh network namespace with loopback up (root only), removed afterwards; None: the host's."""
    if not wanted or os.geteuid() != 0 or shutil.which("ip") is None:
        yield None
        return
    name = f"zenbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        NETNS[:] = ["ip", "netns", "exec", name]
        yield name
    finally:
        NETNS.clear()
        subprocess.run(["ip", "netns", "delete", name], check=False)


def tree_cpu(pid: int) -> float:
    """utime+stime (seconds) of ``pid`` and its live children."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def start_server(name: str, tools: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    if name == "zenref":
        cmd = [*NETNS, "taskset", "-c", "0", str(tools / "zenref"), "-p", str(port), "-w", "1"]
        env = dict(os.environ)
    else:
        cmd = [*NETNS, "taskset", "-c", "0", sys.executable, "-m", "app"]
        env = {**os.environ, "PORT": str(port), "WORKERS": "1", "LOG_LEVEL": "info", "LOG_FORMAT": "json"}
    out = log.open("ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def zenload(tools: Path, port: int, args: list[str], duration: float, warmup: float) -> dict[str, str]:
    cmd = [*NETNS, "taskset", "-c", "1", str(tools / "zenload"), "-p", str(port), "-d", str(duration)]
    cmd += ["-w", str(warmup), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 30, check=False).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT")), "")
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def measure(server: str, tools: Path, mode: str, duration: float, log: Path) -> Result:
    port = free_port()
    proc = start_server(server, tools, port, log)
    try:
        zenload(tools, port, MODE_ARGS[mode], 1.0, 0)  # warm up: caches, allocator, branch predictors
        cpu0 = tree_cpu(proc.pid)
        res = zenload(tools, port, MODE_ARGS[mode], duration, 0)
        cpu1 = tree_cpu(proc.pid)
    finally:
        stop(proc)
    completed = int(res.get("completed", "0")) or 1
    return Result(
        server, mode, float(res.get("rps", 0)), (cpu1 - cpu0) * 1e6 / completed,
        float(res.get("p99_us", 0)), int(res.get("errors", -1)),
    )  # fmt: skip


def hold_rss(server: str, tools: Path, conns: int, log: Path) -> float:
    """Bytes of server RSS per idle connection, with ``conns`` connections held."""
    port = free_port()
    proc = start_server(server, tools, port, log)
    try:
        zenload(tools, port, MODE_ARGS["pingpong"], 0.5, 0)  # touch the code paths first
        time.sleep(0.5)
        before = tree_rss(proc.pid)
        cmd = [*NETNS, "taskset", "-c", "1", str(tools / "zenload"), "-p", str(port), "-m", "hold", "-c", str(conns)]
        hold = subprocess.Popen([*cmd, "-d", "3", "-w", "20"], stdout=subprocess.PIPE, text=True)
        assert hold.stdout is not None
        for line in hold.stdout:
            if line.startswith(("READY", "NOTREADY")):
                ready = line
                break
        else:
            ready = "none"
        time.sleep(1.0)
        after = tree_rss(proc.pid)
        hold.wait(30)
    finally:
        stop(proc)
    if not ready.startswith("READY"):
        raise RuntimeError(f"hold did not get ready: {ready}")
    return (after - before) / conns


def pair_ratios(refs: list[Result], ours: list[Result]) -> list[float]:
    """Ours over zenref's CPU per request, round by round (the two ran back to back)."""
    return [o.cpu_us / r.cpu_us if r.cpu_us else float("nan") for r, o in zip(refs, ours, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window (shorter: noisier)")
    parser.add_argument("--modes", default="pingpong,pipeline,churn")
    parser.add_argument("--hold", type=int, default=10000, help="idle connections for the RSS figure (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="alternate the servers this many times; medians are kept")
    parser.add_argument("--host-network", action="store_true", help="use the host's loopback, not a new netns")
    args = parser.parse_args()
    with own_netns(not args.host_network) as netns:
        print(f"network: {'namespace ' + netns if netns else 'the host loopback'}", flush=True)
        return run(args)


def run(args: argparse.Namespace) -> int:
    tools = build_tools()
    log = Path(tempfile.mkdtemp(prefix="zenbench-log-")) / "server.log"
    runs: dict[tuple[str, str], list[Result]] = {}
    for mode in args.modes.split(","):
        for _ in range(args.rounds):
            for server in ("zenref", "ours"):
                runs.setdefault((server, mode), []).append(measure(server, tools, mode, args.duration, log))
    # The machine's speed drifts by tens of percent over a minute (a shared
    # 2-core VM), in step for both servers; so the ratio is taken within each
    # round (zenref and ours run back to back) and its median is kept, and
    # the spread of the rounds' ratios is shown.  CPU figures: each server's median.
    results = {key: sorted(rs, key=lambda r: r.cpu_us)[len(rs) // 2] for key, rs in runs.items()}
    head = ("mode", "server", "req/s", "cpu us/req", "p99 us", "errors", "ratio", "target", "rounds")
    print("{:<9} {:<7} {:>10} {:>11} {:>8} {:>6} {:>6} {:>6}  {}".format(*head))
    summary: dict[str, object] = {}
    for mode in args.modes.split(","):
        ref, ours = results[("zenref", mode)], results[("ours", mode)]
        ratios = pair_ratios(runs[("zenref", mode)], runs[("ours", mode)])
        ratio = statistics.median(ratios)
        for r in (ref, ours):
            tail = f"{ratio:>6.2f} {TARGETS[mode]:>6.2f}  {min(ratios):.2f}-{max(ratios):.2f}" if r is ours else ""
            print(f"{mode:<9} {r.server:<7} {r.rps:>10.0f} {r.cpu_us:>11.2f} {r.p99_us:>8.0f} {r.errors:>6} {tail}")
        summary[mode] = {"zenref_cpu_us": round(ref.cpu_us, 2), "ours_cpu_us": round(ours.cpu_us, 2),
                         "ratio": round(ratio, 3), "round_ratios": [round(x, 3) for x in ratios],
                         "target": TARGETS[mode], "ours_rps": round(ours.rps),
                         "zenref_rps": round(ref.rps), "ours_p99_us": ours.p99_us, "errors": ours.errors}  # fmt: skip
    if args.hold:
        ref_b, ours_b = hold_rss("zenref", tools, args.hold, log), hold_rss("ours", tools, args.hold, log)
        print(f"idle connections: {args.hold}; RSS per connection: zenref {ref_b:.0f} B, ours {ours_b:.0f} B "
              f"(target <= 1536 B)")  # fmt: skip
        summary["rss_per_idle_connection"] = {"zenref_bytes": round(ref_b), "ours_bytes": round(ours_b)}
    print("BENCH " + json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
