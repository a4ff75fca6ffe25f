"""The measured comparison: every lab server under the same loads, plus the weakness scenarios.

Owns: ``python -m app compare``: for each server of ``app.lab`` in turn,
start it (``app.tools.process``), run the same loads with ``app.tools.bench``
(pingpong, pipeline, churn), measure the CPU its process tree used, run the
scenarios of ``app.tools.scenarios`` (a second client while one idles; client
N+1 of a fixed pool; memory, threads and processes at N held connections),
stop it; then print the table and write ``report.md``, ``results.json`` and
three PNG plots (matplotlib) into the output directory.

Never: sends load anywhere but the servers it started on loopback, or
leaves one running: each server is stopped before the next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from app.config import Settings
from app.lab import BY_NAME, SERVERS
from app.tools import bench
from app.tools.process import RunningServer, Tree, running_server
from app.tools.scenarios import memory_at, probe_while_idle

#: The loads every server gets: (mode, share of --connections).  The deep
#: pipeline is the load where the server, not the client, does most work:
#: it shows how many cores an architecture can use.
LOADS: Final = (("pingpong", 1.0), ("pipeline", 0.25), ("churn", 0.25))
#: A fixed pool's client N+1 waits; every other architecture answers it at once.
PROBE_WAIT: Final = 1.0


@dataclass
class ServerResult:
    """Everything measured for one server."""

    name: str
    description: str
    loads: list[dict[str, Any]] = field(default_factory=list)
    scenarios: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _measured_load(server: RunningServer, spec: bench.LoadSpec) -> dict[str, Any]:
    """Run one load; add the server's CPU (cores) and how many of its processes did work."""
    marks: list[tuple[float, Tree]] = []

    def started() -> None:
        marks.append((time.monotonic(), server.tree()))

    def progress(elapsed: float, _answers: int) -> None:
        # Half-way, while per-connection children are still alive to be seen.
        if len(marks) == 1 and elapsed >= spec.duration / 2:
            marks.append((time.monotonic(), server.tree()))

    tally = bench.run_load(spec, on_progress=progress, on_start=started)
    start, before = marks[0]
    elapsed = time.monotonic() - start
    after = server.tree()
    row = bench.summarize(spec, tally)
    row["cores"] = round((after.cpu - before.cpu) / elapsed, 2) if elapsed > 0 else 0.0
    mid_time, mid = marks[-1]
    floor = 0.05 * (mid_time - start)
    row["busy_processes"] = sum(cpu - before.cpu_by_pid.get(pid, 0.0) > floor for pid, cpu in mid.cpu_by_pid.items())
    return row


def _scenarios(server: RunningServer, pool: int, hold: int) -> dict[str, Any]:
    one = probe_while_idle(server, 1, wait=PROBE_WAIT)
    full = probe_while_idle(server, pool, wait=PROBE_WAIT)
    # fork() per connection manages a few hundred a second: give it the time.
    mem = memory_at(server, hold, wait=max(10.0, hold / 40))
    return {
        "second_client_while_one_idles": one.answered_while_idle,
        "client_after_pool_of_idle": full.answered_while_idle,
        "pool_size": pool,
        "hold": hold,
        "held_answered": mem.answered,
        "uss_per_connection": round(mem.uss_per_connection),
        "rss_per_connection": round(mem.rss_per_connection),
        "uss_mb_at_hold": round(mem.uss_after / 1e6, 1),
        "processes": [mem.processes_before, mem.processes_after],
        "threads": [mem.threads_before, mem.threads_after],
    }


def run_server(name: str, args: argparse.Namespace) -> ServerResult:
    """Start ``name``, run every load and scenario against it, stop it."""
    result = ServerResult(name, BY_NAME[name].description)
    env = {"LAB_POOL_SIZE": str(args.pool), "WORKERS": str(args.workers)}
    try:
        with running_server(name, env=env) as server:
            # Scenarios first: memory is measured on a fresh server, before
            # the loads leave freed-but-kept allocator arenas behind.
            if not args.no_scenarios:
                result.scenarios = _scenarios(server, args.pool, args.hold)
            for mode, share in LOADS:
                spec = bench.LoadSpec(
                    host=server.host,
                    port=server.port,
                    mode=mode,
                    connections=max(1, round(args.connections * share)),
                    depth=args.depth,
                    duration=args.duration,
                    timeout=args.timeout,
                    processes=args.processes,
                )
                result.loads.append(_measured_load(server, spec))
    except (OSError, RuntimeError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# -- output --------------------------------------------------------------------------


def machine_note() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, memory, kernel, Python."""
    import psutil  # noqa: PLC0415

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": round(os.getloadavg()[0], 1),  # other work on the machine skews the numbers
    }


def _yes(value: object) -> str:
    if value is None or value == "":
        return "-"
    return "yes" if value else "**no**"


def _per_connection(scenarios: dict[str, Any]) -> str:
    """KiB per served connection, or n/a when too few were served for the number to mean anything."""
    if scenarios["held_answered"] * 10 < scenarios["hold"]:
        return "n/a"
    return f"{scenarios['uss_per_connection'] / 1024:.1f}"


def report_markdown(results: Sequence[ServerResult], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    """The Markdown report: the machine, the loads, the scenarios, the plots."""
    return "\n".join(
        [
            *_report_head(args, machine),
            *_loads_table(results),
            *_weaknesses_table(results),
            "",
            "![answers per second](throughput.png)",
            "",
            "![latency](latency.png)",
            "",
            "![memory per connection](memory.png)",
            "",
            "## Servers",
            "",
            *[f"- `{r.name}`: {r.description}" for r in results],
            "",
        ]
    )


def _report_head(args: argparse.Namespace, machine: dict[str, Any]) -> list[str]:
    """The title, the command line and the machine."""
    return [
        "# The architecture lab: measured",
        "",
        (
            "Generated by `python -m app compare` "
            f"(`--duration {args.duration} --connections {args.connections} --hold {args.hold} --pool {args.pool}"
            f" --workers {args.workers} --processes {args.processes}`)."
        ),
        "",
        (
            f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
            f"Linux {machine['kernel']}, Python {machine['python']}, {machine['date']}, "
            f"load average {machine.get('load_average', '?')} before the run. "
            "The load generator runs on the same cores as the server, so absolute numbers are modest; "
            "compare the rows, not the machines."
        ),
        "",
    ]


def _loads_table(results: Sequence[ServerResult]) -> list[str]:
    """One row per server: the three loads, errors, latency, cores used."""
    lines = [
        "## Loads",
        "",
        (
            "answers/s; served = connections opened that got answers (a stuck one times out and reconnects); "
            "errors = answers not received within the timeout, or wrong; cores = CPU seconds of the server's "
            "process tree per wall second, busy = its processes that did work (both at the heaviest load)"
        ),
        "",
        "| server | pingpong/s | served | pipeline/s | churn conns/s | errors | p50 ms | p99 ms | cores | busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error or not r.loads:
            lines.append(f"| {r.name} | failed: {r.error} | | | | | | | | |")
            continue
        by = {row["mode"]: row for row in r.loads}
        ping, pipe, churn = by["pingpong"], by["pipeline"], by["churn"]
        errors = sum(row["errors"] for row in r.loads)
        cores = max(row["cores"] for row in r.loads)
        busy = max(row["busy_processes"] for row in r.loads)
        lines.append(
            f"| {r.name} | {ping['rps']:,.0f} | {ping['served']}/{ping['connections']} | "
            f"{pipe['rps']:,.0f} | {churn['cps']:,.0f} | {errors} | "
            f"{ping['latency_ms']['p50']:.2f} | {ping['latency_ms']['p99']:.2f} | {cores:.2f} | {busy} |"
        )
    return lines


def _weaknesses_table(results: Sequence[ServerResult]) -> list[str]:
    """One row per server that ran the scenarios."""
    lines = [
        "",
        "## The weaknesses, shown",
        "",
        (
            "| server | 2nd client answered while 1st idles | client N+1 answered (pool N) | held / asked | "
            "private KiB per connection | processes | threads |"
        ),
        "|---|---|---|---|---:|---|---|",
    ]
    for r in results:
        s = r.scenarios
        if not s:
            continue
        lines.append(
            f"| {r.name} | {_yes(s['second_client_while_one_idles'])} | {_yes(s['client_after_pool_of_idle'])} | "
            f"{s['held_answered']} / {s['hold']} | {_per_connection(s)} | "
            f"{s['processes'][0]} -> {s['processes'][1]} | {s['threads'][0]} -> {s['threads'][1]} |"
        )
    return lines


def write_plots(results: Sequence[ServerResult], out: Path) -> list[Path]:
    """Three PNGs: answers/s per server and mode, pingpong latency, memory per held connection."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    ok = [r for r in results if r.loads and not r.error]
    paths = [_plot_throughput(ok, out / "throughput.png"), _plot_latency(ok, out / "latency.png")]
    mem = [r for r in ok if r.scenarios and _per_connection(r.scenarios) != "n/a"]
    if mem:
        paths.append(_plot_memory(mem, out / "memory.png"))
    return paths


def _plot_throughput(ok: Sequence[ServerResult], path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    y = list(range(len(ok)))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5), layout="constrained")
    for i, (mode, _share) in enumerate(LOADS):
        key = "cps" if mode == "churn" else "rps"
        values = [max(1.0, next(row[key] for row in r.loads if row["mode"] == mode)) for r in ok]
        label = "churn (connections/s)" if mode == "churn" else f"{mode} (answers/s)"
        ax.barh([v + (i - 1) * 0.27 for v in y], values, height=0.27, label=label)
    _finish(ax, [r.name for r in ok], "per second (log scale)", "Throughput per architecture and load")
    ax.set_xscale("log")
    return _save(fig, path)


def _plot_latency(ok: Sequence[ServerResult], path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    y = list(range(len(ok)))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5), layout="constrained")
    for i, pct in enumerate(("p50", "p99")):
        values = [max(0.001, next(row for row in r.loads if row["mode"] == "pingpong")["latency_ms"][pct]) for r in ok]
        ax.barh([v + (i - 0.5) * 0.4 for v in y], values, height=0.4, label=f"pingpong {pct}")
    _finish(ax, [r.name for r in ok], "milliseconds (log scale)", "Latency under the pingpong load")
    ax.set_xscale("log")
    return _save(fig, path)


def _plot_memory(mem: Sequence[ServerResult], path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(mem) + 1.5), layout="constrained")
    values = [max(0.1, r.scenarios["uss_per_connection"] / 1024) for r in mem]
    ax.barh(list(range(len(mem))), values, height=0.6, color="tab:red")
    for i, r in enumerate(mem):
        s = r.scenarios
        text = f" {s['uss_per_connection'] / 1024:.1f} KiB; {s['held_answered']}/{s['hold']} served"
        ax.text(values[i], i, text, va="center", fontsize=8)
    _finish(ax, [r.name for r in mem], "KiB of private memory per served connection (log scale)", "Memory")
    ax.set_xscale("log")
    ax.set_xlim(0.1, max(values) * 30)
    return _save(fig, path)


def _finish(ax: Any, names: list[str], xlabel: str, title: str) -> None:
    ax.set_yticks(list(range(len(names))), names)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.figure.legend(loc="outside lower center", ncol=3, fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_results(results: Sequence[ServerResult]) -> None:
    """The loads as a table on stdout, one row per server and load."""
    rows = [{**row, "mode": f"{r.name}: {row['mode']}"} for r in results for row in r.loads]
    bench.print_table(rows, title="python -m app compare")
    for r in results:
        if r.error:
            print(f"{r.name}: FAILED {r.error}")


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m app compare``."""
    p = argparse.ArgumentParser(prog="python -m app compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default=",".join(s.name for s in SERVERS), help="comma-separated (default: all)")
    p.add_argument("-t", "--duration", type=float, default=3.0, help="seconds per load (default: 3)")
    p.add_argument("-c", "--connections", type=int, default=32, help="pingpong connections (others: a quarter)")
    p.add_argument("-d", "--depth", type=int, default=64, help="pipeline depth (default: 64)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds before an answer counts as an error")
    p.add_argument("--hold", type=int, default=1000, help="connections held for the memory scenario (1000)")
    p.add_argument("--pool", type=int, default=8, help="LAB_POOL_SIZE for threadpool and prefork (8)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="WORKERS of percore (cores)")
    p.add_argument("-p", "--processes", type=int, default=min(4, os.cpu_count() or 1), help="load processes")
    p.add_argument("--no-scenarios", action="store_true", help="loads only")
    p.add_argument("--no-plots", action="store_true", help="no PNG files")
    p.add_argument("-o", "--out", type=Path, default=Path("lab-report"), help="output directory (lab-report)")
    return p


def main(argv: Sequence[str], settings: Settings) -> int:
    """``python -m app compare``: measure, print, write the report; 1 if a server failed."""
    del settings  # each server reads the environment itself; compare sets only PORT and the pool sizes
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown servers: {', '.join(unknown)} (see python -m app lab --list)")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_note()
    results = []
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(run_server(name, args))
    print_results(results)
    (args.out / "results.json").write_text(
        json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                    "results": [asdict(r) for r in results]}, indent=1) + "\n"
    )  # fmt: skip
    plots = [] if args.no_plots else write_plots(results, args.out)
    (args.out / "report.md").write_text(report_markdown(results, args, machine))
    summary = {
        "report": str(args.out / "report.md"),
        "plots": [str(p) for p in plots],
        "servers": len(results),
        "failed": [r.name for r in results if r.error],
    }
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 1 if summary["failed"] else 0
