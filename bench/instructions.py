"""Instruction counts of the server's hot path per unit of work, under callgrind.

Wall-clock CPU on a shared 2-core machine cannot resolve a few percent;
instructions executed can, and other processes do not disturb them.  This
counts the instructions of the production worker's per-connection code,
driven the way uvloop drives it, in one process with no socket and no event
loop turn: the real ``Worker`` as ``build_worker`` builds it (its
``ConnectionContext``, its ``Connections``, its batched close-line logger
writing to /dev/null through the log sink), and a fake transport whose
methods are C builtins (writes go to a ``deque(maxlen=0)``), so no Python
frame of the fake is counted.  The units:

``pingpong``
    one lone question per ``data_received`` on an open connection (the
    fast path that answers without a reader);
``pipeline``
    one ``data_received`` with 16 questions (the reader's path); also
    given per request;
``churn``
    one connection's whole life: the worker's protocol factory,
    ``connection_made``, one question, ``eof_received``, ``connection_lost``
    with the worker's bookkeeping and its ``connection_closed`` line.

The calls of the first two are made from C (``map`` over the bound method,
consumed by a ``deque``), as uvloop's Cython calls them; the churn unit is
one small Python function making the five calls, whose own frame (a few
hundred instructions) is in its count.  The kernel's and libuv's share of
a request is not counted: it is the same for every build of our code.

Start-up (the interpreter, imports, building the worker) and what surrounds
the units cancel out: the child runs under ``valgrind --tool=callgrind``
twice, once with N units of each mode and once with 2N, each mode after the
same warm-up, and a mode's figure is (I(2N) - I(N)) / N.  To make the runs
quick, callgrind instruments only the units: a three-line C helper (built
here with gcc and valgrind's ``callgrind.h``, loaded with ctypes) starts its
instrumentation before a mode's units, dumps their count (named after the
mode) and stops it after them.  The close-line logger's clock is made to
step per line (``LOG_CLOCK_STEP``) so that the wall clock under callgrind
does not change the count: a repeated run gives the same figures within
0.1 %.  Unrelated changes (to this script, or to code off the measured
path) still move them by about 1 %, up to 3.5 % in the pure build:
the interpreter's caches and allocator start from another state.  Smaller
differences between two builds mean nothing.

The measured part runs as a child process of ``--python`` (default: this
interpreter), with ``PYTHONSAFEPATH=1`` so that the source tree never
shadows what that interpreter's environment installed (a compiled wheel),
and ``PYTHONHASHSEED=0``.  So one script measures a pure venv, a compiled
venv, or another checkout's venv; this process never imports ``app``.

Usage: python bench/instructions.py [--python VENV/bin/python] [--modes pingpong,pipeline,churn]
                                    [--units N[,N,N]] [--jobs 1] [--json-only]
Prints a table and, last, one JSON line.  Needs valgrind and gcc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import Any, Final

MODES: Final = ("pingpong", "pipeline", "churn")
#: Questions per ``data_received`` in the pipeline mode.
PIPELINE_DEPTH: Final = 16
#: Units per run (N) by mode, when --units is not given: about 10^8 instructions in the pure build.
DEFAULT_UNITS: Final = {"pingpong": 20000, "pipeline": 4000, "churn": 4000}
#: Units run before the measured ones in both runs: first-call costs (caches, the logger's
#: rendered suffix, the connection list's growth) fall outside the difference.
WARMUP: Final = 200
#: The close-line logger's clock advances this much a line (as at 50,000 closes a second), not
#: with the wall clock: under callgrind time runs about 50 times slower, so the wall clock would
#: re-render the timestamp (a new millisecond) every few lines, and a varying number of times.
LOG_CLOCK_STEP: Final = 20e-6
#: In a callgrind dump: what triggered it (our dumps are named after their mode), and its total Ir.
_TRIGGER: Final = re.compile(r"^desc: Trigger: Client Request: (\w+)$", re.MULTILINE)
_TOTALS: Final = re.compile(r"^totals: (\d+)$", re.MULTILINE)  # (summary: wrong after a toggle)
#: The helper that turns callgrind's instrumentation on and off (client requests are machine code).
_HELPER_C: Final = """#include <valgrind/callgrind.h>
void zen_instrument_on(void) { CALLGRIND_START_INSTRUMENTATION; }
void zen_instrument_off(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void zen_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


@dataclass(frozen=True)
class ChildResult:
    """What one measured child reports besides its instruction count."""

    build: str  # "compiled" when app.server.connection is an extension module, else "pure"
    module: str  # where app.server.connection was loaded from
    python_version: str
    answered: int  # answers the worker counted over warm-up and units (checked against the units)


@dataclass(frozen=True)
class ModeResult:
    """A mode's figure: instructions per unit from the runs with ``units`` and ``2 * units``."""

    mode: str
    units: int
    instructions_n: int
    instructions_2n: int
    per_unit: float
    per_request: float


# -- the child: runs under callgrind, with the measured interpreter -------------------------------


class FakeTransport:
    """What a ``Connection`` calls on uvloop's transport, every method a C builtin (no Python frame)."""

    def __init__(self) -> None:
        sink: deque[bytes] = deque(maxlen=0)  # takes everything, keeps nothing
        self.write: Callable[[bytes], None] = sink.append
        self.close: Callable[[], None] = sink.clear
        self.abort: Callable[[], None] = sink.clear
        self.write_eof: Callable[[], None] = sink.clear
        self.pause_reading: Callable[[], None] = sink.clear
        self.resume_reading: Callable[[], None] = sink.clear
        self.set_write_buffer_limits: Callable[[int, int], int] = max
        self.get_write_buffer_size: Callable[[], int] = int  # 0: every answer sent
        self.get_extra_info: Callable[[str], Any] = {"peername": ("127.0.0.1", 40000)}.get


def _drive(mode: str, count: int, worker: Any, questions: list[bytes]) -> None:
    """Run ``count`` units of ``mode`` on ``worker``'s connections."""
    transport = FakeTransport()
    if mode == "churn":
        question = questions[0]
        factory = worker.new_connection

        def life() -> None:
            conn = factory()
            conn.connection_made(transport)
            conn.data_received(question)
            conn.eof_received()
            conn.connection_lost(None)

        for _ in range(count):
            life()
        return
    conn = worker.new_connection()
    conn.connection_made(transport)
    pipelined = b"".join(questions[i % len(questions)] for i in range(PIPELINE_DEPTH))  # every aphorism
    chunk = questions[0] if mode == "pingpong" else pipelined
    deque(map(conn.data_received, repeat(chunk, count)), maxlen=0)  # called from C, as uvloop calls it
    conn.eof_received()
    conn.connection_lost(None)


def child(modes: list[str], units: dict[str, int], warmup: int, out: Path, helper: str) -> None:
    """Build a production worker; for each mode, ``warmup`` units, then ``units`` instrumented ones and a dump.

    ``helper``: the library that switches callgrind's instrumentation on for the units only and
    dumps their count (the dump is named after the mode).  The report goes to ``out``.
    """
    import asyncio  # noqa: PLC0415
    import ctypes  # noqa: PLC0415
    import itertools  # noqa: PLC0415
    import platform  # noqa: PLC0415
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    from app import logs  # noqa: PLC0415
    from app.config import Settings  # noqa: PLC0415
    from app.core import zen  # noqa: PLC0415
    from app.server import connection  # noqa: PLC0415
    from app.server.worker import build_worker  # noqa: PLC0415

    settings = Settings(log_format="json")  # stdout is /dev/null: the close lines go there
    logs.configure(settings)
    logs._time = itertools.count(time.time(), LOG_CLOCK_STEP).__next__  # noqa: SLF001 - see LOG_CLOCK_STEP
    # Never bound or listened on: the acceptor only reads its family until started.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    worker = build_worker(settings, sock, slot=0)
    questions = list(zen.APHORISMS)
    switch = ctypes.CDLL(helper)
    switch.zen_dump.argtypes = [ctypes.c_char_p]
    dumps = {mode: mode.encode() for mode in modes}  # made before: nothing of ours in the dumps but the units

    async def main() -> None:  # in a running loop, as the worker's logger batches its lines there
        for mode in modes:
            _drive(mode, warmup, worker, questions)
            switch.zen_instrument_on()
            _drive(mode, units[mode], worker, questions)
            switch.zen_dump(dumps[mode])  # (switching off first would drop the counts)
            switch.zen_instrument_off()

    try:
        import uvloop  # noqa: PLC0415

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    logs.flush_batches()
    sock.close()
    module = str(connection.__file__)
    result = ChildResult(
        build="compiled" if module.endswith((".so", ".pyd")) else "pure",
        module=module,
        python_version=platform.python_version(),
        answered=worker.stats.answered,
    )
    out.write_text(json.dumps(asdict(result)))


# -- the parent: runs the children under callgrind ------------------------------------------------


def _expected_answers(mode: str, count: int) -> int:
    """Answers the worker counts for ``count`` units of ``mode``."""
    return count * PIPELINE_DEPTH if mode == "pipeline" else count


def build_helper(work: Path) -> Path:
    """The instrumentation switch as a shared library in ``work`` (gcc and valgrind's headers)."""
    source, library = work / "zen_callgrind.c", work / "zen_callgrind.so"
    source.write_text(_HELPER_C)
    compiler = os.environ.get("CC", "gcc")
    done = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source)], capture_output=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot build the callgrind switch with {compiler}:\n{done.stderr.decode()}")
    return library


def _run_child(python: str, modes: list[str], units: dict[str, int], work: Path, helper: Path) -> dict[str, Any]:
    """One callgrind run of the child over ``modes``: each mode's instruction count, and the child's report."""
    tag = "-".join(f"{mode}{units[mode]}" for mode in modes)
    out, log, counts = work / f"{tag}.json", work / f"{tag}.log", work / f"{tag}.callgrind"
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONPATH", None)
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={counts}",
        f"--log-file={log}",
        python,
        str(Path(__file__).resolve()),
        "--child",
        "--modes",
        ",".join(modes),
        "--units",
        ",".join(str(units[mode]) for mode in modes),
        "--warmup",
        str(WARMUP),
        "--out",
        str(out),
        "--helper",
        str(helper),
    ]
    done = subprocess.run(command, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if done.returncode != 0 or not out.exists():
        text = log.read_text() if log.exists() else ""
        raise RuntimeError(f"the run {tag} failed (exit {done.returncode}):\n{done.stderr.decode()}{text}")
    found: dict[str, int] = {}
    for dump in work.glob(f"{tag}.callgrind.*"):
        text = dump.read_text()
        trigger, totals = _TRIGGER.search(text), _TOTALS.search(text)
        if trigger is not None and totals is not None:
            found[trigger.group(1)] = int(totals.group(1))
    missing = [mode for mode in modes if mode not in found]
    if missing:
        raise RuntimeError(f"no callgrind dump of {', '.join(missing)} in the run {tag}")
    report = ChildResult(**json.loads(out.read_text()))
    expected = sum(_expected_answers(mode, WARMUP + units[mode]) for mode in modes)
    if report.answered != expected:
        raise RuntimeError(f"the run {tag}: the worker counted {report.answered} answers, not {expected}")
    return {"report": report, "counts": found}


def measure(python: str, modes: list[str], units: dict[str, int], jobs: int) -> tuple[ChildResult, list[ModeResult]]:
    """Each mode's instructions per unit under ``python``, and what its children reported."""
    doubled = {mode: 2 * n for mode, n in units.items()}
    with tempfile.TemporaryDirectory(prefix="zen-instructions-") as tmp:
        work = Path(tmp)
        helper = build_helper(work)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            once, twice = pool.map(lambda n: _run_child(python, modes, n, work, helper), [units, doubled])
    results = []
    for mode in modes:
        n = units[mode]
        one, two = once["counts"][mode], twice["counts"][mode]
        per_unit = (two - one) / n
        depth = PIPELINE_DEPTH if mode == "pipeline" else 1
        results.append(ModeResult(mode, n, one, two, round(per_unit, 1), round(per_unit / depth, 1)))
    report: ChildResult = once["report"]
    return report, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the interpreter to measure (a venv's bin/python)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument(
        "--units", default="", help="N: units per run, one count or one per mode (default: about 10^8 Ir a run)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="callgrind runs at once (counts do not depend on it)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--helper", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"unknown mode(s): {', '.join(unknown)}" if unknown else "no mode given")
    counts = [int(n) for n in args.units.split(",") if n] or [DEFAULT_UNITS[m] for m in modes]
    if len(counts) == 1:
        counts *= len(modes)
    if len(counts) != len(modes) or min(counts) < 1 or args.jobs < 1:
        parser.error("--units: one positive count, or one per mode; --jobs: at least 1")
    units = dict(zip(modes, counts, strict=True))
    if args.child:
        child(modes, units, args.warmup, args.out, args.helper)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    python = str(Path(args.python).absolute())  # not resolved: a venv's python is a symlink that makes it the venv's
    report, results = measure(python, modes, units, args.jobs)
    if not args.json_only:
        print(f"{python}: {report.build} build, Python {report.python_version} ({report.module})")
        print(f"{'mode':<10} {'N':>7} {'Ir/unit':>10} {'Ir/request':>11}")
        for r in results:
            print(f"{r.mode:<10} {r.units:>7} {r.per_unit:>10.0f} {r.per_request:>11.0f}")
    summary = {"python": python, **asdict(report), "modes": {r.mode: asdict(r) for r in results}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
