"""The sans-I/O core: docs/protocol.md's rules as pure byte tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import zen
from app.core.protocol import LONE_QUESTION, AnswerReader, QuestionReader, printable

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
    """The hot path's one call (and its shortcut for exactly one question) changes nothing."""
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


@given(
    st.one_of(
        st.binary(max_size=80),
        st.lists(st.sampled_from([b"?", b" ", b"\t", b"\n", b"a", b"Q", b"\x00", Q1]), max_size=8).map(b"".join),
    ),
    st.integers(1, 40),
)
@settings(max_examples=500, deadline=None)
def test_lone_question_is_what_feed_hands_back_whole(chunk: bytes, max_size: int) -> None:
    """LONE_QUESTION plus the size check is exactly feed() answering the chunk whole and keeping nothing."""
    reader = QuestionReader(max_size)
    whole = reader.feed(chunk) == [chunk] and not reader.buffered and not reader.too_long
    assert whole == (LONE_QUESTION.fullmatch(chunk) is not None and len(chunk) <= max_size)


def test_lone_question_examples() -> None:
    for lone in (Q1, b"?", b"x?", b"a b?", b"\x00?"):
        assert LONE_QUESTION.fullmatch(lone), lone
    for other in (b"", b" x?", b"\nx?", b"x", b"x?y", b"x??", Q1 + Q2, b"?" * 2):
        assert not LONE_QUESTION.fullmatch(other), other


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
