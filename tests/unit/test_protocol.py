"""The sans-I/O core: docs/protocol.md's rules as pure byte tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import zen
from app.core.protocol import AnswerReader, QuestionReader, printable, whole_questions

Q1, Q2, Q3 = b"Beautiful is better than?", b"Explicit is better than?", b"Simple is better than?"


def feed(chunks: list[bytes], max_size: int = 1024) -> tuple[list[bytes], QuestionReader]:
    reader = QuestionReader(max_size)
    out: list[bytes] = []
    for chunk in chunks:
        if not chunk:
            continue  # b"" would mean EOF; recv() never returns it otherwise
        reader.receive_data(chunk)
        out += reader.next_questions()
    return out, reader


def test_the_books_table() -> None:
    assert zen.answer(Q1) == b"Ugly."
    assert zen.answer(Q2) == b"Implicit."
    assert zen.answer(Q3) == b"Complex."
    assert zen.answer(b"beautiful is better than?") == zen.UNKNOWN  # exact, case counts
    assert zen.answer(b"Beautiful is better than ?") == zen.UNKNOWN


def test_every_answer_ends_in_one_dot() -> None:
    for answer in [*zen.APHORISMS.values(), zen.UNKNOWN, zen.TOO_LONG]:
        assert answer.endswith(b".")
        assert answer.count(b".") == 1


@pytest.mark.parametrize(
    ("chunks", "questions"),
    [
        ([Q1], [Q1]),
        ([Q1 + Q2 + Q3], [Q1, Q2, Q3]),
        ([bytes([b]) for b in Q2], [Q2]),
        ([Q1 + b"Simp", b"le is better than?"], [Q1, Q3]),
        ([b"\x00\x01?\xff\xfe?", Q3], [b"\x00\x01?", b"\xff\xfe?", Q3]),
        ([b"\r\n" + Q3], [Q3]),
        ([b" \t\r\n", b"\n" + Q1 + b"\r\n"], [Q1]),
        ([b"a b\tc\r\nd?"], [b"a b\tc\r\nd?"]),  # bytes inside a question are never altered
        ([b"?"], [b"?"]),
        ([b"??"], [b"?", b"?"]),
    ],
)
def test_framing_table(chunks: list[bytes], questions: list[bytes]) -> None:
    assert feed(chunks)[0] == questions


def test_answers_before_the_rest_arrives() -> None:
    reader = QuestionReader()
    reader.receive_data(Q1 + b"Simp")
    assert reader.next_questions() == [Q1]
    assert reader.partial == b"Simp"
    assert reader.started
    reader.receive_data(b"le is better than?")
    assert reader.next_questions() == [Q3]
    assert not reader.started


STREAM = Q1 + b"\r\n" + Q2 + b"x?" + b"  " + Q3


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_every_split_point(cut: int) -> None:
    assert feed([STREAM[:cut], STREAM[cut:]])[0] == [Q1, Q2, b"x?", Q3]


@pytest.mark.parametrize("cut", range(1, 60))
def test_every_two_split_points(cut: int) -> None:
    other = (cut * 7) % len(STREAM)
    a, b = sorted((cut, other))
    assert feed([STREAM[:a], STREAM[a:b], STREAM[b:]])[0] == [Q1, Q2, b"x?", Q3]


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=400), max_size=20))
@settings(max_examples=300, deadline=None)
def test_any_chunking_gives_the_same_questions(stream: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    whole, whole_reader = feed([stream], max_size=64)
    pieces, pieces_reader = feed(chunks, max_size=64)
    assert pieces == whole
    assert pieces_reader.too_long == whole_reader.too_long


@given(
    st.lists(st.sampled_from([Q1, Q2, Q3, b"\r\n", b" ", b"zz?", b"Q1", b"x" * 70 + b"?"]), max_size=20),
    st.lists(st.integers(0, 400), max_size=6),
    st.integers(1, 3),
)
@settings(max_examples=300, deadline=None)
def test_feed_is_receive_data_then_next_questions(parts: list[bytes], cuts: list[int], limit: int) -> None:
    """The hot path's one call (and its shortcut for reads of whole questions) changes nothing."""
    stream = b"".join(parts)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True) if b > a]
    fed, reference = QuestionReader(64), QuestionReader(64)
    for chunk in [*chunks, b""]:  # then end of stream
        got = fed.feed(chunk, limit)
        reference.receive_data(chunk)
        assert got == reference.next_questions(limit)
        assert len(got) <= limit
        while got:  # what the limit held back
            got = fed.next_questions(limit)
            assert got == reference.next_questions(limit)
        assert (fed.buffered, fed.partial, fed.eof, fed.too_long) == (
            reference.buffered, reference.partial, reference.eof, reference.too_long,
        )  # fmt: skip


_PIECES = [b"?", b" ", b"\t", b"\r", b"\n", b"a", b"Q", b"\x00", b"\x0b", b"x" * 30, Q1, Q2]


@given(
    st.one_of(st.binary(max_size=120), st.lists(st.sampled_from(_PIECES), max_size=24).map(b"".join)),
    st.integers(1, 64),
    st.integers(1, 6),
)
@settings(max_examples=1000, deadline=None)
def test_whole_questions_is_what_the_general_path_hands_back(chunk: bytes, max_size: int, limit: int) -> None:
    """whole_questions() answers a read only when a reader's general path would give the same and keep nothing."""
    reference = QuestionReader(max_size)
    reference.receive_data(chunk)  # the general path: receive_data, then next_questions (no shortcut)
    expected = reference.next_questions(limit)
    got = whole_questions(chunk, max_size, limit)
    if got is not None:
        assert got == expected
        assert not reference.buffered
        assert not reference.too_long


def test_whole_questions_takes_the_usual_reads() -> None:
    """The reads an honest client sends (one question, a pipelined batch, whitespace between) skip the reader."""
    assert whole_questions(Q1, 1024, 256) == [Q1]
    assert whole_questions(Q1 + Q2 + b"zz?" + Q3, 1024, 256) == [Q1, Q2, b"zz?", Q3]
    assert whole_questions(b" \r\n" + Q1 + b"\r\n" + Q2 + b"\t??", 1024, 256) == [Q1, Q2, b"?", b"?"]
    assert whole_questions(Q1 * 40 + Q2, 1024, 256) == [Q1] * 40 + [Q2]  # longer than max_size, each fits
    assert whole_questions(b"\x0b" + Q1, 1024, 256) == [b"\x0b" + Q1]  # not the protocol's whitespace


def test_whole_questions_leaves_the_rest_to_the_reader() -> None:
    for data, max_size, limit in (
        (b"", 1024, 256),
        (Q1[:-1], 1024, 256),  # unfinished
        (Q1 + b"\r\n", 1024, 256),  # whitespace held after the question
        (Q1 + Q2[:5], 1024, 256),
        (Q1 + Q2, 1024, 1),  # more than one batch
        (Q1, 10, 256),  # too long
        (Q2 + Q1, 24, 256),  # the second is too long
        (Q1, 1024, 0),
    ):
        assert whole_questions(data, max_size, limit) is None, data


@given(st.lists(st.sampled_from([Q1, Q2, Q3, b"\r\n", b" ", b"zz?", b"\x00?"]), max_size=30), st.integers(1, 9))
@settings(max_examples=200, deadline=None)
def test_limited_batches_lose_nothing(parts: list[bytes], limit: int) -> None:
    stream = b"".join(parts)
    reader = QuestionReader()
    reader.receive_data(stream)
    got: list[bytes] = []
    while batch := reader.next_questions(limit):
        assert len(batch) <= limit
        got += batch
    assert got == feed([stream])[0]


def test_size_limit_counts_the_question_mark() -> None:
    ok = b"x" * 15 + b"?"
    assert feed([ok], max_size=16)[0] == [ok]
    questions, reader = feed([b"x" * 16 + b"?"], max_size=16)
    assert questions == []
    assert reader.too_long


def test_oversize_without_question_mark_is_never_buffered_past_the_limit() -> None:
    reader = QuestionReader(1024)
    for _ in range(1024):  # 1 MiB in 1 KiB pieces
        reader.receive_data(b"x" * 1024)
        assert reader.next_questions() == []
        assert len(reader.partial) <= 1024
        if reader.too_long:
            break
    assert reader.too_long
    assert reader.partial == b""
    reader.receive_data(Q1)  # everything after the oversize question is dropped
    assert reader.next_questions() == []


def test_questions_before_an_oversize_one_are_still_answered() -> None:
    questions, reader = feed([Q1 + b"y" * 2000], max_size=1024)
    assert questions == [Q1]
    assert reader.too_long


def test_whitespace_is_not_a_started_question_and_is_not_buffered() -> None:
    reader = QuestionReader(8)
    reader.receive_data(b" \r\n\t" * 1000)
    assert reader.next_questions() == []
    assert not reader.started
    assert not reader.too_long
    assert reader.partial == b""


def test_end_of_stream() -> None:
    reader = QuestionReader()
    reader.receive_data(Q1 + b"Beautiful is")
    reader.receive_data(b"")
    assert reader.eof
    assert reader.next_questions() == [Q1]
    assert reader.partial == b"Beautiful is"  # unfinished: no answer
    assert reader.finished
    reader.receive_data(Q2)  # nothing after EOF
    assert reader.next_questions() == []


def test_has_complete() -> None:
    reader = QuestionReader()
    reader.receive_data(Q1 + Q2)
    assert reader.has_complete
    reader.next_questions(2)
    assert not reader.has_complete


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        QuestionReader(0)


def test_answer_reader_splits_on_dots() -> None:
    reader = AnswerReader()
    assert reader.receive_data(b"Ug") == []
    assert reader.receive_data(b"ly.Impl") == [b"Ugly."]
    assert reader.receive_data(b"icit.Complex.") == [b"Implicit.", b"Complex."]
    assert reader.receive_data(b"") == []
    assert reader.eof


def test_answer_reader_bounds_an_endless_answer() -> None:
    reader = AnswerReader(max_size=10)
    with pytest.raises(ValueError):
        reader.receive_data(b"x" * 11)


def test_printable_escapes_control_bytes() -> None:
    text = printable(b'line\n{"event": "forged"}\r\x1b[2J\x00\xff')
    assert "\n" not in text
    assert "\r" not in text
    assert "\x1b" not in text
    assert text.startswith("line\\n")
    assert printable(b"x" * 100, limit=10) == "x" * 10 + "..."
