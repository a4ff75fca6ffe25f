"""Benchmark: our server, pure and compiled, against the C reference ``zenref`` and a minimal uvloop peer.

Builds ``zenref`` and ``zenload`` from this folder (``make -C bench``, into
``bench/build``), then for each load mode and round runs every server, one
after the other, with the server pinned to CPU 0 and ``zenload`` pinned to
CPU 1, and prints requests/s, server CPU microseconds per request
(utime+stime of the server's whole process tree over the measured window),
p99 latency, and the ratio to zenref; then the resident memory per idle
connection with 10,000 held connections.  Only ratios measured side by side
mean anything on a shared machine: the ratio printed is the median of the
rounds' ratios (zenref and the server ran back to back), with their range.

The servers, in every round: ``zenref``; ``minimal`` (``bench/minimal.py``,
the best a featureless uvloop Protocol server does); ``ours`` (this
checkout, pure Python, run by the interpreter running this script); and
``compiled`` (the wheel install in ``.venv-compiled``, ``make
.venv-compiled/.installed``, when it exists; ``--compiled VENV`` names
another, ``--compiled ''`` skips it).  ``--also NAME=PATH`` measures another
checkout of this project (a folder holding ``app/``, run as ``python -m app``
from there) or another install (a venv: PATH holds ``bin/python``) in the
same rounds, e.g. the code before and after a change.  ``--write-docs [FILE]`` puts the
run's table between the figures markers of FILE (docs/performance.md) and
its results beside it (FILE with ``.json``) and a plot of CPU per request by
mode (FILE with ``.png``).

Usage: python bench/run.py [--duration 8] [--rounds 5] [--modes pingpong,pipeline,churn] [--hold 10000]
                           [--compiled VENV] [--also NAME=PATH ...] [--write-docs [FILE]] [--host-network]
Extra environment for the Python servers (e.g. ADMIN_PORT=9101) is passed through.

Never: sends load anywhere but loopback (of the benchmark's own network
namespace when run as root), or leaves a server running.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
#: Ours over zenref's CPU per request that the project aims for, per mode.
TARGETS = {"pingpong": 1.10, "pipeline": 1.5, "churn": 1.10}
#: The RSS per idle connection the project aims for, in bytes.
RSS_TARGET = 1300
#: Names the script gives its own servers (--also takes others).
RESERVED = {"zenref", "minimal", "ours", "compiled"}
DEFAULT_COMPILED = REPO / ".venv-compiled"
MODE_ARGS = {
    "pingpong": ["-m", "pingpong", "-c", "50"],
    "pipeline": ["-m", "pipeline", "-c", "50", "-D", "16"],
    "churn": ["-m", "churn", "-c", "50"],
}
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
#: Command prefix that runs a server or zenload in the benchmark's own network
#: namespace (set in main()).  A churn run opens 100,000 connections; on the
#: host's loopback they fill the connection-tracking table when a firewall
#: (podman's netavark, for one) has loaded it, after which the kernel drops
#: SYNs and a run measures 50 requests/s.  A new namespace has an empty
#: loopback, no conntrack, no TIME_WAIT left by earlier runs or other tests.
NETNS: list[str] = []


@dataclass(frozen=True)
class Server:
    """A server to measure: zenref, the minimal peer, a checkout (``app`` in ``path``) or a venv holding the package."""

    name: str
    path: Path | None = None  # None: zenref or the minimal peer
    venv: bool = False  # path is a venv with the package installed (run from outside any source tree)


@dataclass
class Result:
    server: str
    mode: str
    rps: float
    cpu_us: float
    p99_us: float
    errors: int


@dataclass
class Run:
    """Everything measured: every round of every (server, mode), and the memory figures."""

    servers: list[Server]
    rounds: dict[tuple[str, str], list[Result]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)


def build_tools(out: Path = BUILD) -> Path:
    """Build zenref and zenload with bench/Makefile into ``out`` (make keeps it up to date)."""
    subprocess.run(["make", "-s", "-C", str(HERE), f"OUT={out}"], check=True)
    return out


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


def start_server(server: Server, tools: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``server`` on CPU 0 and wait until it listens on ``port``."""
    if server.name == "zenref":
        cmd = [*NETNS, "taskset", "-c", "0", str(tools / "zenref"), "-p", str(port), "-t", "1"]
        cwd, env = REPO, dict(os.environ)
    elif server.path is None:  # the minimal peer
        cmd = [*NETNS, "taskset", "-c", "0", sys.executable, str(HERE / "minimal.py"), str(port)]
        cwd, env = REPO, dict(os.environ)
    elif server.venv:
        # Its own interpreter, from a folder with no app/ and with PYTHONSAFEPATH: the installed package runs.
        cmd = [*NETNS, "taskset", "-c", "0", str(server.path / "bin" / "python"), "-m", "app"]
        cwd = server.path
        env = {**os.environ, "PYTHONSAFEPATH": "1", "PORT": str(port), "WORKERS": "1",
               "LOG_LEVEL": "info", "LOG_FORMAT": "json"}  # fmt: skip
    else:
        # The checkout's folder is the working directory: ``python -m`` puts it
        # first on sys.path, ahead of the editable install of this checkout.
        cmd = [*NETNS, "taskset", "-c", "0", sys.executable, "-m", "app"]
        cwd = server.path
        path = os.pathsep.join(p for p in (str(server.path), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PORT": str(port), "WORKERS": "1",
               "LOG_LEVEL": "info", "LOG_FORMAT": "json"}  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def zenload_cmd(tools: Path, port: int, args: list[str]) -> list[str]:
    return [*NETNS, "taskset", "-c", "1", str(tools / "zenload"), "-p", str(port), *args]


def parse_events(text: str) -> dict[str, dict[str, Any]]:
    """The JSON lines of zenload's stdout, by event name (the last of each kind)."""
    events: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events[event.get("event", "")] = event
    return events


def zenload(tools: Path, port: int, args: list[str], duration: float) -> dict[str, Any]:
    """Run one load for ``duration`` seconds; its summary (empty if it printed none)."""
    cmd = zenload_cmd(tools, port, [*args, "-d", str(duration)])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False).stdout
    return parse_events(out).get("summary", {})


def measure(server: Server, tools: Path, mode: str, duration: float, log: Path) -> Result:
    port = free_port()
    proc = start_server(server, tools, port, log)
    try:
        zenload(tools, port, MODE_ARGS[mode], 1.0)  # warm up: caches, allocator, branch predictors
        cpu0 = tree_cpu(proc.pid)
        res = zenload(tools, port, MODE_ARGS[mode], duration)
        cpu1 = tree_cpu(proc.pid)
    finally:
        stop(proc)
    completed = int(res.get("completed", 0)) or 1
    return Result(
        server.name, mode, float(res.get("rps", 0)), (cpu1 - cpu0) * 1e6 / completed,
        float(res.get("p99_us", 0)), int(res.get("errors", -1)),
    )  # fmt: skip


def _wait_ready(hold: subprocess.Popen[str]) -> str:
    """The first event zenload's hold mode prints: ``ready``, or ``notready`` at its limit."""
    assert hold.stdout is not None
    for line in hold.stdout:
        event = parse_events(line)
        if "ready" in event or "notready" in event:
            return next(iter(event))
    return "none"


def hold_rss(server: Server, tools: Path, conns: int, log: Path) -> float:
    """Bytes of server RSS per idle connection, with ``conns`` connections held."""
    port = free_port()
    proc = start_server(server, tools, port, log)
    try:
        zenload(tools, port, MODE_ARGS["pingpong"], 0.5)  # touch the code paths first
        time.sleep(0.5)
        before = tree_rss(proc.pid)
        cmd = zenload_cmd(tools, port, ["-m", "hold", "-c", str(conns), "-d", "3", "-w", "20"])
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as hold:
            ready = _wait_ready(hold)
            time.sleep(1.0)
            after = tree_rss(proc.pid)
            hold.communicate(timeout=30)
    finally:
        stop(proc)
    if ready != "ready":
        raise RuntimeError(f"hold did not get ready: {ready}")
    return (after - before) / conns


def pair_ratios(refs: list[Result], others: list[Result]) -> list[float]:
    """A server's over zenref's CPU per request, round by round (the two ran back to back)."""
    return [o.cpu_us / r.cpu_us if r.cpu_us else float("nan") for r, o in zip(refs, others, strict=True)]


def parse_also(values: list[str]) -> list[Server]:
    """``NAME=PATH`` options as servers; raises ValueError on a bad one."""
    servers = []
    for value in values:
        name, sep, path = value.partition("=")
        folder = Path(path).expanduser().resolve()
        venv = (folder / "bin" / "python").exists()
        if not sep or not name or name in RESERVED or not ((folder / "app").is_dir() or venv):
            raise ValueError(
                f"--also {value!r}: want NAME=PATH, PATH a folder holding app/ or a venv, NAME not {sorted(RESERVED)}"
            )
        servers.append(Server(name, folder, venv=venv))
    if len({s.name for s in servers}) < len(servers):
        raise ValueError("--also names must differ")
    return servers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured window (shorter: noisier)")
    parser.add_argument("--modes", default="pingpong,pipeline,churn")
    parser.add_argument("--hold", type=int, default=10000, help="idle connections for the RSS figure (0: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="alternate the servers this many times; medians are kept")
    also = "also measure the checkout at PATH (a folder holding app/) as NAME; repeatable"
    parser.add_argument("--also", action="append", default=[], metavar="NAME=PATH", help=also)
    compiled = "the venv of the compiled build, measured as 'compiled' ('': skip it)"
    parser.add_argument("--compiled", type=Path, default=DEFAULT_COMPILED, metavar="VENV", help=compiled)
    docs = "put the figures between the markers of FILE (default docs/performance.md), the results beside it"
    page = REPO / "docs" / "performance.md"
    parser.add_argument("--write-docs", nargs="?", const=page, type=Path, metavar="FILE", help=docs)
    parser.add_argument("--host-network", action="store_true", help="use the host's loopback, not a new netns")
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    try:
        args.servers = [Server("zenref"), Server("minimal"), Server("ours", REPO), *parse_also(args.also)]
    except ValueError as exc:
        parser.error(str(exc))
    if str(args.compiled) not in {"", "."}:
        if not (args.compiled / "bin" / "python").exists():
            parser.error(f"no compiled build in {args.compiled}: make .venv-compiled/.installed, or --compiled ''")
        args.servers.insert(3, Server("compiled", args.compiled.resolve(), venv=True))
    unknown = set(args.modes.split(",")) - set(MODE_ARGS)
    if unknown or args.rounds < 1:
        parser.error(f"unknown modes {sorted(unknown)} (or --rounds below 1)")
    if args.write_docs is not None and BEGIN not in args.write_docs.read_text():
        parser.error(f"{args.write_docs} has no {BEGIN} marker")
    with own_netns(not args.host_network) as netns:
        args.network = "own network namespace" if netns else "host loopback"
        print(f"network: {f'namespace {netns}' if netns else 'the host loopback'}", flush=True)
        return run(args)


def run(args: argparse.Namespace) -> int:
    tools = build_tools()
    log = Path(tempfile.mkdtemp(prefix="zenbench-log-")) / "server.log"
    print(f"server logs: {log}", flush=True)
    modes = args.modes.split(",")
    result = Run(args.servers)
    # The machine's speed drifts by tens of percent over a minute (a shared
    # 2-core VM), in step for every server; so each round runs them back to
    # back, the ratio is taken within the round, and its median is kept.
    for mode in modes:
        for _ in range(args.rounds):
            for server in args.servers:
                result.rounds.setdefault((server.name, mode), []).append(
                    measure(server, tools, mode, args.duration, log)
                )
    if args.hold:
        result.rss = {s.name: hold_rss(s, tools, args.hold, log) for s in args.servers}
    summary = summarize(result, modes, args)
    print_table(summary)
    print("BENCH " + json.dumps(summary, sort_keys=True))
    if args.write_docs is not None:
        write_docs(args.write_docs, summary)
        print(f"figures written to {args.write_docs} and {args.write_docs.with_suffix('.json')}")
    return 0


# -- the results -----------------------------------------------------------------------


def machine_note() -> dict[str, Any]:
    """What the figures depend on: cores, other load, the Python and uvloop versions."""
    try:
        uvloop = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop = "none"
    return {
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "uvloop": uvloop,
        "kernel": platform.release(),
    }


def server_figures(
    rounds: list[Result], ratios: list[float] | None, to_minimal: list[float] | None = None
) -> dict[str, Any]:
    """One server's figures in one mode: the median round's, its ratios to zenref and to the minimal peer."""
    median = sorted(rounds, key=lambda r: r.cpu_us)[len(rounds) // 2]
    figures: dict[str, Any] = {"cpu_us": round(median.cpu_us, 2), "rps": round(median.rps),
                               "p99_us": median.p99_us, "errors": sum(r.errors for r in rounds)}  # fmt: skip
    if ratios is not None:
        figures |= {"ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
                    "ratio_max": round(max(ratios), 3), "round_ratios": [round(x, 3) for x in ratios]}  # fmt: skip
    if to_minimal is not None:
        figures["vs_minimal"] = round(statistics.median(to_minimal), 3)
    return figures


def summarize(result: Run, modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The run as one JSON-ready dict (the BENCH line, the results file, the docs table)."""
    per_mode: dict[str, Any] = {}
    for mode in modes:
        refs = result.rounds[("zenref", mode)]
        minimal = result.rounds.get(("minimal", mode))
        servers = {}
        for server in result.servers:
            rounds = result.rounds[(server.name, mode)]
            ours = server.path is not None
            servers[server.name] = server_figures(
                rounds,
                None if server.name == "zenref" else pair_ratios(refs, rounds),
                pair_ratios(minimal, rounds) if ours and minimal else None,
            )
        per_mode[mode] = {"target": TARGETS[mode], "servers": servers}
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_note(),
        "settings": {"duration": args.duration, "rounds": args.rounds, "hold": args.hold, "network": args.network},
        "modes": per_mode,
        "rss_per_idle_connection": {name: round(b) for name, b in result.rss.items()},
        "rss_target": RSS_TARGET,
    }


def print_table(summary: dict[str, Any]) -> None:
    head = ("mode", "server", "req/s", "cpu us/req", "p99 us", "errors", "ratio", "target", "rounds", "vs minimal")
    print("{:<9} {:<10} {:>10} {:>11} {:>8} {:>6} {:>6} {:>6}  {:<9}  {}".format(*head))
    for mode, entry in summary["modes"].items():
        for name, f in entry["servers"].items():
            tail = ""
            if "ratio" in f:
                tail = f"{f['ratio']:>6.2f} {entry['target']:>6.2f}  {f['ratio_min']:.2f}-{f['ratio_max']:.2f}"
                tail += f"  {f['vs_minimal']:>9.2f}" if "vs_minimal" in f else ""
            print(f"{mode:<9} {name:<10} {f['rps']:>10.0f} {f['cpu_us']:>11.2f} {f['p99_us']:>8.0f} "
                  f"{f['errors']:>6} {tail}")  # fmt: skip
    rss = summary["rss_per_idle_connection"]
    if rss:
        figures = ", ".join(f"{name} {b} B" for name, b in rss.items())
        print(f"idle connections: {summary['settings']['hold']}; RSS per connection: {figures} "
              f"(target <= {summary['rss_target']} B)")  # fmt: skip


# -- the docs page --------------------------------------------------------------------------


def figures_markdown(summary: dict[str, Any], plot: str | None = None) -> str:
    """The run as Markdown: how it was made, CPU per request and ratios, memory per idle connection."""
    m, s = summary["machine"], summary["settings"]
    lines = [
        (
            f"Measured {summary['date']} by `make bench` (`python bench/run.py --duration {s['duration']:g} "
            f"--rounds {s['rounds']}"
            f" --hold {s['hold']}`, {s['network']}): {m['cores']} cores, load average "
            f"{' / '.join(f'{x:g}' for x in m['load_average'])} before the run, Python {m['python']}, "
            f"uvloop {m['uvloop']}, Linux {m['kernel']}. Server on CPU 0, zenload on CPU 1; ratio: the server's "
            "CPU per request over zenref's, median of the rounds, each round measuring every server back to back; "
            "vs minimal: the same over the minimal uvloop peer's (below 1: cheaper than it)."
        ),
        "",
        *([f"![Server CPU per request by mode and server]({plot})", ""] if plot else []),
        (
            "| mode | server | zenref CPU/req | server CPU/req | ratio | rounds' range | target | req/s | p99 | errors "
            "| vs minimal |"
        ),
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for mode, entry in summary["modes"].items():
        ref = entry["servers"]["zenref"]
        for name, f in entry["servers"].items():
            if "ratio" not in f:
                continue
            lines.append(
                f"| {mode} | {name} | {ref['cpu_us']:.2f} us | {f['cpu_us']:.2f} us | {f['ratio']:.2f} | "
                f"{f['ratio_min']:.2f}-{f['ratio_max']:.2f} | {entry['target']:.2f} | {f['rps']:,} | "
                f"{f['p99_us']:,.0f} us | {f['errors']} | {f.get('vs_minimal', '')} |"
            )
    rss = summary["rss_per_idle_connection"]
    if rss:
        lines += ["", f"RSS per idle connection ({s['hold']:,} held, target <= {summary['rss_target']:,} B):", ""]
        lines += ["| server | bytes |", "|---|---:|", *[f"| {name} | {b:,} |" for name, b in rss.items()]]
    return "\n".join(lines)


def replace_figures(text: str, figures: str) -> str:
    """``text`` with everything between the figures markers replaced; raises ValueError without them."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"want exactly one {BEGIN} ... {END} pair")
    return pattern.sub(lambda _m: f"{BEGIN}\n{figures}\n{END}", text)


def write_docs(page: Path, summary: dict[str, Any]) -> None:
    """Put the figures into ``page``, the results JSON (``.json``) and the plot (``.png``) beside it."""
    plot = page.with_suffix(".png")
    write_plot(plot, summary)
    page.write_text(replace_figures(page.read_text(), figures_markdown(summary, plot.name)))
    page.with_suffix(".json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")


def write_plot(path: Path, summary: dict[str, Any]) -> None:
    """Grouped bars: server CPU microseconds per request, by mode, one bar per server."""
    import matplotlib as mpl  # noqa: PLC0415 - only --write-docs needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    modes = list(summary["modes"])
    names = list(summary["modes"][modes[0]]["servers"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for i, name in enumerate(names):
        values = [summary["modes"][mode]["servers"][name]["cpu_us"] for mode in modes]
        bars = ax.bar([m + (i - (len(names) - 1) / 2) * width for m in range(len(modes))], values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylabel("server CPU per request (us)")
    ax.set_title(f"CPU per request, median round ({summary['date']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
