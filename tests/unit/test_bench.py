"""The load generator's pure parts: answer verification, percentiles, splitting, options."""

from __future__ import annotations

import argparse

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
