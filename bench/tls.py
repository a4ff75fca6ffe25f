"""Benchmark: TLS terminated by our server against HAProxy in front of the C reference server, in one run.

Three server sides under the same client load, one after the other, each
pinned to CPU 0:

- ``ours-tls``: ``python -m app`` (WORKERS=1) terminating TLS;
- ``haproxy+zenref``: HAProxy (one thread) terminating TLS, plain text to
  ``zenref`` (one thread) behind it;
- ``ours-plain``: ``python -m app`` without TLS (the cost of TLS itself).

The client side, pinned to CPU 1: ``zenload`` (bench/zenload.c, plain text)
through a client-side HAProxy that opens one TLS connection per zenload
connection (``ssl verify none no-ssl-reuse``: no session resumption, so every
churn connection is a full handshake).  ``ours-plain`` gets zenload directly.
TLS 1.3, X25519, an ECDSA P-256 certificate made for the run (openssl CLI,
in a temporary directory).  Server CPU per request = utime+stime of every
process of the side over the measured window / answers.  Reported: each
side's figures, the ratio ours-tls / haproxy+zenref (median of the rounds'
ratios, each measured back to back) against the goals (churn: 1.3x per
handshake; pingpong: 2x per request), and with ``--profile`` a py-spy
profile of our worker under churn (the top functions, native frames
included, so OpenSSL's share shows).

Usage: python bench/tls.py [--duration 5] [--rounds 3] [--modes pingpong,churn] [--profile] [--json FILE]

Never: sends load anywhere but loopback (of its own network namespace when
run as root, as bench/run.py), or leaves a process running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402 - bench/run.py's helpers: build, ports, CPU of a process tree, zenload

REPO = HERE.parent
#: ours-tls over haproxy+zenref, per mode: the goals of the issue.
GOALS = {"churn": 1.3, "pingpong": 2.0}
MODE_ARGS = {"pingpong": ["-m", "pingpong", "-c", "50"], "churn": ["-m", "churn", "-c", "50"]}
SIDES = ("ours-tls", "haproxy+zenref", "ours-plain")

_SERVER_CFG = """\
global
    nbthread 1
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-curves X25519
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend tls
    bind 127.0.0.1:{port} ssl crt {pem}
    default_backend ref
backend ref
    server zenref 127.0.0.1:{backend}
"""
_CLIENT_CFG = """\
global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend plain
    bind 127.0.0.1:{port}
    default_backend tls
backend tls
    server target 127.0.0.1:{target} ssl verify none no-ssl-reuse ssl-min-ver TLSv1.3
"""


@dataclass
class Result:
    side: str
    mode: str
    rps: float
    cpu_us: float
    p99_us: float
    errors: int


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 self-signed certificate: (certificate, key, both in one PEM for HAProxy)."""
    cert, key, pem = directory / "server.pem", directory / "server.key", directory / "haproxy.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, pem


def _haproxy(config: str, directory: Path, name: str, cpu: int) -> subprocess.Popen[bytes]:
    path = directory / f"{name}.cfg"
    path.write_text(config)
    cmd = [*run.NETNS, "taskset", "-c", str(cpu), "haproxy", "-db", "-f", str(path)]
    with (directory / f"{name}.log").open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def _ours(directory: Path, port: int, tls: tuple[Path, Path] | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "LOG_LEVEL": "info", "LOG_FORMAT": "json"}
    if tls is not None:
        env |= {"TLS_CERT_FILE": str(tls[0]), "TLS_KEY_FILE": str(tls[1]), "TLS_MIN_VERSION": "1.3"}
    cmd = [*run.NETNS, "taskset", "-c", "0", sys.executable, "-m", "app"]
    with (directory / "ours.log").open("ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


class Side:
    """One server side, started and stopped around one measurement; ``pids`` are what its CPU counts."""

    def __init__(self, name: str, directory: Path, tools: Path, cert: tuple[Path, Path, Path]) -> None:
        self.name, self.dir, self.tools, self.cert = name, directory, tools, cert
        self.procs: list[subprocess.Popen[bytes]] = []
        self.server_procs: list[subprocess.Popen[bytes]] = []
        self.port = 0  # where zenload connects

    def start(self) -> None:
        port = run.free_port()
        if self.name == "haproxy+zenref":
            backend = run.free_port()
            ref = subprocess.Popen(
                [*run.NETNS, "taskset", "-c", "0", str(self.tools / "zenref"), "-p", str(backend), "-t", "1"],
                stdout=subprocess.DEVNULL,
            )
            self.server_procs.append(ref)
            run.wait_port(backend, ref)
            lb = _haproxy(_SERVER_CFG.format(port=port, pem=self.cert[2], backend=backend), self.dir, "server", 0)
            self.server_procs.append(lb)
        else:
            tls = self.cert[:2] if self.name == "ours-tls" else None
            self.server_procs.append(_ours(self.dir, port, tls))  # type: ignore[arg-type]
        self.procs = list(self.server_procs)
        run.wait_port(port, self.server_procs[-1])
        self.port = port
        if self.name != "ours-plain":  # the client side's TLS: a HAProxy on CPU 1
            client_port = run.free_port()
            client = _haproxy(_CLIENT_CFG.format(port=client_port, target=port), self.dir, "client", 1)
            self.procs.append(client)
            run.wait_port(client_port, client)
            self.port = client_port

    def cpu(self) -> float:
        return sum(run.tree_cpu(p.pid) for p in self.server_procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            run.stop(proc)


def measure(side: Side, mode: str, duration: float) -> Result:
    side.start()
    try:
        run.zenload(side.tools, side.port, MODE_ARGS[mode], 1.0)  # warm up
        cpu0 = side.cpu()
        res = run.zenload(side.tools, side.port, MODE_ARGS[mode], duration)
        cpu1 = side.cpu()
    finally:
        side.stop()
    completed = int(res.get("completed", 0)) or 1
    return Result(side.name, mode, float(res.get("rps", 0)), (cpu1 - cpu0) * 1e6 / completed,
                  float(res.get("p99_us", 0)), int(res.get("errors", -1)))  # fmt: skip


def profile(directory: Path, tools: Path, cert: tuple[Path, Path, Path], duration: float) -> list[tuple[str, float]]:
    """py-spy (native frames too) on our TLS worker under churn: the functions with the most own time."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return [("py-spy is not installed (pip install py-spy)", 0.0)]
    side = Side("ours-tls", directory, tools, cert)
    side.start()
    try:
        master = side.server_procs[0]
        time.sleep(0.5)
        import psutil  # noqa: PLC0415

        worker = psutil.Process(master.pid).children(recursive=True)[0].pid
        out = directory / "profile.txt"
        spy_proc = subprocess.Popen(
            [spy, "record", "--native", "--format", "raw", "-r", "200", "-d", str(int(duration)), "-p", str(worker),
             "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        run.zenload(tools, side.port, MODE_ARGS["churn"], duration)
        spy_proc.wait(duration + 30)
    finally:
        side.stop()
    return _self_time(out)


#: Where a sample's own time is spent, by the leaf frame's library or file (first match wins).
_PLACES = (
    ("libcrypto", "OpenSSL libcrypto (handshake maths, record ciphers)"),
    ("libssl", "OpenSSL libssl (TLS state machine)"),
    ("_ssl", "CPython's ssl module"),
    ("loop.c", "uvloop (transports, its SSLProtocol)"),
    ("uvloop", "uvloop (transports, its SSLProtocol)"),
    ("libuv", "uvloop (transports, its SSLProtocol)"),
    ("app/", "this project's Python (app/)"),
    ("libc.so", "libc (system calls, malloc)"),
)
#: Frames whose inclusive share is reported too (anywhere in the stack).
_INCLUSIVE = (
    ("do_handshake", "the handshake (inclusive)"),
    ("SSLProtocol", "uvloop's SSLProtocol (inclusive)"),
    ("connection_lost", "closing: connection_lost (inclusive)"),
)


def _self_time(collapsed: Path) -> list[tuple[str, float]]:
    """Shares of samples: own time by library (``_PLACES``), then inclusive shares (``_INCLUSIVE``)."""
    own: dict[str, int] = {}
    inclusive = dict.fromkeys([label for _, label in _INCLUSIVE], 0)
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        leaf = stack.split(";")[-1]
        place = next((label for key, label in _PLACES if key in leaf), "the CPython interpreter and the rest")
        own[place] = own.get(place, 0) + count
        for key, label in _INCLUSIVE:
            if key in stack:
                inclusive[label] += count
    ranked = sorted(own.items(), key=lambda kv: -kv[1])
    return [(name, 100.0 * n / max(total, 1)) for name, n in [*ranked, *inclusive.items()]]


def summarize(results: list[Result], modes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": {}}
    for mode in modes:
        by_side = {s: [r for r in results if r.mode == mode and r.side == s] for s in SIDES}
        ratios = [a.cpu_us / b.cpu_us for a, b in zip(by_side["ours-tls"], by_side["haproxy+zenref"], strict=True)]
        out["modes"][mode] = {
            "sides": {
                s: {
                    "cpu_us": statistics.median(r.cpu_us for r in rs),
                    "rps": statistics.median(r.rps for r in rs),
                    "p99_us": statistics.median(r.p99_us for r in rs),
                    "errors": sum(r.errors for r in rs),
                }
                for s, rs in by_side.items()
            },
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "goal": GOALS[mode],
        }
    return out


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'mode':<9} {'side':<16} {'req/s':>9} {'CPU us/req':>11} {'p99 us':>8} {'errors':>6}")
    for mode, fig in summary["modes"].items():
        for side, s in fig["sides"].items():
            print(f"{mode:<9} {side:<16} {s['rps']:>9.0f} {s['cpu_us']:>11.1f} {s['p99_us']:>8.0f} {s['errors']:>6}")
        low, high = fig["ratio_range"]
        verdict = "meets" if fig["ratio"] <= fig["goal"] else "misses"
        print(f"{mode:<9} ours-tls / haproxy+zenref = {fig['ratio']:.2f}x ({low:.2f}-{high:.2f}); "
              f"goal <= {fig['goal']}x: {verdict}")  # fmt: skip
    for name, share in summary.get("profile", []):
        print(f"  {share:5.1f}%  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="pingpong,churn")
    parser.add_argument("--profile", action="store_true", help="py-spy our TLS worker under churn")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--host-network", action="store_true", help="do not use a network namespace of its own")
    args = parser.parse_args()
    if shutil.which("haproxy") is None:
        print("haproxy is not installed (apt-get install haproxy)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    tools = run.build_tools()
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, run.own_netns(not args.host_network):
        directory = Path(tmp)
        cert = make_certificate(directory)
        for _round in range(args.rounds):
            for mode in modes:
                for name in SIDES:
                    result = measure(Side(name, directory, tools, cert), mode, args.duration)
                    results.append(result)
                    print(json.dumps(asdict(result)), file=sys.stderr)
        summary = summarize(results, modes) if results else {"modes": {}}
        if args.profile:
            summary["profile"] = profile(directory, tools, cert, args.duration)
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
