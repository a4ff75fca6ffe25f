"""bench/instructions.py: callgrind counts of the hot path, on the build this suite runs on.

Run with small counts on this interpreter (the pure build under ``make
test-pure``, the compiled one under ``make test-compiled``): every mode must
report a positive, plausible count per unit, and the build it measured must
be the one expected.  Skipped only without valgrind (.ci/apt-packages.txt
installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "instructions.py"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_counts_every_mode_per_unit() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--units", "300", "--jobs", "2", "--json-only"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = os.environ.get("ZEN_EXPECT_BUILD")
    if expected:
        assert report["build"] == expected, report["module"]
    modes = report["modes"]
    assert set(modes) == {"pingpong", "pipeline", "churn"}
    for mode in modes.values():
        assert mode["units"] == 300
        assert mode["instructions_2n"] > mode["instructions_n"] > 0
    # Plausible: today a lone question costs about 4,000 (compiled) to 9,000 (pure) instructions.
    pingpong, pipeline, churn = (modes[m]["per_unit"] for m in ("pingpong", "pipeline", "churn"))
    assert 500 < pingpong < 50_000
    assert 500 < modes["pipeline"]["per_request"] < pingpong  # a question in a batch costs less
    assert pipeline > pingpong  # but 16 of them more than one
    assert pingpong < churn < 500_000  # a connection's life: one question, its open, close and log line


def test_rejects_an_unknown_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--modes", "pingpong,flood"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown mode(s): flood" in proc.stderr
