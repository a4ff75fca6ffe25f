"""The load generator's pure parts: answer verification, percentiles, splitting, options."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.tools import bench


def test_verifier_counts_answers_split_anywhere() -> None:
    v = bench.Verifier()
    v.expect(b"Ugly.Implicit.")
    assert v.feed(b"Ug") == 0
    assert v.feed(b"ly.Impl") == 1
    assert not v.done
    assert v.feed(b"icit.") == 1
    assert v.done


@pytest.mark.parametrize("data", [b"Ugly!", b"ugly.", b"Ugly.X", b"Error: unknown aphorism."])
def test_verifier_rejects_any_other_byte(data: bytes) -> None:
    v = bench.Verifier()
    v.expect(b"Ugly.")
    with pytest.raises(bench.AnswerMismatchError):
        v.feed(data)


def test_batch_is_the_questions_and_their_exact_answers() -> None:
    payload, answers = bench.batch([b"Beautiful is better than?", b"Simple is better than?"])
    assert payload == b"Beautiful is better than?Simple is better than?"
    assert answers == b"Ugly.Complex."


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert bench.percentile(values, 0.5) == 50.0
    assert bench.percentile(values, 0.99) == 99.0
    assert bench.percentile(values, 1.0) == 100.0
    assert bench.percentile([], 0.5) == 0.0


def test_split_spreads_connections_and_never_gives_a_process_none() -> None:
    assert bench._split(10, 4) == [3, 3, 2, 2]
    assert bench._split(2, 4) == [1, 1]
    assert sum(bench._split(1001, 3)) == 1001


def test_tally_merge_and_reservoir_bound() -> None:
    a, b = bench.Tally(), bench.Tally()
    for i in range(bench.SAMPLES + 100):
        a.latency(i / 1e6)
    assert len(a.latencies) == bench.SAMPLES
    b.error("timeout")
    b.answers = 5
    a.merge(b)
    assert (a.answers, a.errors, a.error_kinds) == (5, 1, {"timeout": 1})


def parse(*argv: str) -> argparse.Namespace:
    return bench.build_parser(Settings(port=4242)).parse_args(list(argv))


def test_options_default_to_the_configured_port() -> None:
    spec = bench.spec_from_args(parse("--mode", "churn"))
    assert (spec.host, spec.port, spec.mode) == ("127.0.0.1", 4242, "churn")


@pytest.mark.parametrize("argv", [("-c", "0"), ("-d", "0"), ("-p", "0"), ("-t", "0"), ("--timeout", "-1")])
def test_options_out_of_range_are_rejected(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="must"):
        bench.spec_from_args(parse(*argv))


def test_summary_has_the_fields_of_the_json_line() -> None:
    spec = bench.LoadSpec("127.0.0.1", 1, duration=2.0)
    tally = bench.Tally(answers=100, connects=4, served=4, elapsed=2.0, latencies=[0.001, 0.002])
    summary = bench.summarize(spec, tally)
    assert summary["rps"] == 50.0
    assert summary["latency_ms"]["max"] == 2.0
    assert {"errors", "error_kinds", "held", "served", "connections", "mode"} <= set(summary)


# -- bench/run.py: the figures page ------------------------------------------------------


def load_run_script() -> Any:
    """bench/run.py is a script, not a package module: load it from its path."""
    path = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run_script = load_run_script()

SUMMARY: dict[str, Any] = {
    "date": "2025-01-02 03:04 UTC",
    "machine": {"cores": 2, "load_average": [0.5, 0.25, 0.1], "python": "3.11.7", "uvloop": "0.21.0", "kernel": "6.1"},
    "settings": {"duration": 8.0, "rounds": 5, "hold": 10000, "network": "own network namespace"},
    "modes": {
        "pingpong": {
            "target": 1.35,
            "servers": {
                "zenref": {"cpu_us": 11.6, "rps": 40038, "p99_us": 2100.0, "errors": 0},
                "ours": {"cpu_us": 15.1, "rps": 39350, "p99_us": 2500.0, "errors": 0, "ratio": 1.302,
                         "ratio_min": 1.25, "ratio_max": 1.4, "round_ratios": [1.25, 1.302, 1.4]},
                "before": {"cpu_us": 17.0, "rps": 35000, "p99_us": 2900.0, "errors": 0, "ratio": 1.466,
                           "ratio_min": 1.4, "ratio_max": 1.5, "round_ratios": [1.4, 1.466, 1.5]},
            },
        }
    },
    "rss_per_idle_connection": {"zenref": 120, "ours": 1444, "before": 1988},
    "rss_target": 1536,
}  # fmt: skip

PAGE = "# Performance\n\nProse before.\n\n<!-- figures:begin -->\nold figures\n<!-- figures:end -->\n\nProse after.\n"


def test_figures_replace_only_the_text_between_the_markers() -> None:
    page = run_script.replace_figures(PAGE, "new | table")
    assert page == PAGE.replace("old figures", "new | table")
    assert run_script.replace_figures(page, "again") == PAGE.replace("old figures", "again")


@pytest.mark.parametrize("text", ["no markers", "<!-- figures:begin --> only", PAGE + PAGE])
def test_figures_need_exactly_one_pair_of_markers(text: str) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        run_script.replace_figures(text, "x")


def test_figures_table_has_every_server_ratio_and_the_machine() -> None:
    table = run_script.figures_markdown(SUMMARY)
    assert "| pingpong | ours | 11.60 us | 15.10 us | 1.30 | 1.25-1.40 | 1.35 | 39,350 | 2,500 us | 0 |" in table
    assert "| pingpong | before | 11.60 us | 17.00 us | 1.47 | 1.40-1.50 |" in table
    assert "| pingpong | zenref |" not in table  # zenref is the yardstick column, not a row
    assert "2 cores" in table
    assert "load average 0.5 / 0.25 / 0.1" in table
    assert "Python 3.11.7" in table
    assert "uvloop 0.21.0" in table
    assert "| ours | 1,444 |" in table
    assert "<!--" not in table


def test_write_docs_fills_the_page_and_writes_the_results_beside_it(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    run_script.write_docs(page, SUMMARY)
    text = page.read_text()
    assert text.startswith("# Performance\n\nProse before.\n\n<!-- figures:begin -->\nMeasured 2025-01-02")
    assert text.endswith("<!-- figures:end -->\n\nProse after.\n")
    assert "old figures" not in text
    assert json.loads((tmp_path / "performance.json").read_text()) == SUMMARY


def test_also_takes_name_equals_a_checkout(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    [server] = run_script.parse_also([f"before={tmp_path}"])
    assert (server.name, server.path) == ("before", tmp_path.resolve())
    for bad in ("before", f"={tmp_path}", f"ours={tmp_path}", f"x={tmp_path / 'nowhere'}"):
        with pytest.raises(ValueError, match="NAME=PATH"):
            run_script.parse_also([bad])
    with pytest.raises(ValueError, match="differ"):
        run_script.parse_also([f"a={tmp_path}", f"a={tmp_path}"])


def test_also_takes_an_installed_venv_and_reserves_the_scripts_own_names(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    [server] = run_script.parse_also([f"wheel={tmp_path}"])
    assert (server.name, server.path, server.venv) == ("wheel", tmp_path.resolve(), True)
    for reserved in ("minimal", "compiled", "zenref"):
        with pytest.raises(ValueError, match="NAME=PATH"):
            run_script.parse_also([f"{reserved}={tmp_path}"])


def test_figures_show_the_plot_and_the_ratio_to_the_minimal_peer() -> None:
    summary = json.loads(json.dumps(SUMMARY))
    summary["modes"]["pingpong"]["servers"]["ours"]["vs_minimal"] = 0.93
    table = run_script.figures_markdown(summary, "performance.png")
    assert "![Server CPU per request by mode and server](performance.png)" in table
    assert "| 2,500 us | 0 | 0.93 |" in table


def test_the_plot_is_written(tmp_path: Path) -> None:
    run_script.write_plot(tmp_path / "plot.png", SUMMARY)
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
