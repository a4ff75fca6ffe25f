"""The aphorism table and ``answer(question)``.

Owns: which question gets which answer, byte for byte (docs/protocol.md).
Never: touches sockets, clocks, buffers or framing; that is ``protocol.py``.
"""

from __future__ import annotations

from typing import Final

#: The book's three aphorisms stay exactly as chapter 7 prints them; the rest
#: are further "X is better than?" lines of the Zen of Python (docs/protocol.md).
APHORISMS: Final[dict[bytes, bytes]] = {
    b"Beautiful is better than?": b"Ugly.",
    b"Explicit is better than?": b"Implicit.",
    b"Simple is better than?": b"Complex.",
    b"Complex is better than?": b"Complicated.",
    b"Flat is better than?": b"Nested.",
    b"Sparse is better than?": b"Dense.",
    b"Now is better than?": b"Never.",
}

UNKNOWN: Final = b"Error: unknown aphorism."
TOO_LONG: Final = b"Error: request too long."

#: The question every health probe asks, and the answer it expects.
PROBE_QUESTION: Final = b"Beautiful is better than?"
PROBE_ANSWER: Final = APHORISMS[PROBE_QUESTION]


def answer(question: bytes) -> bytes:
    """Return the answer to one complete question (ending in ``?``)."""
    return APHORISMS.get(question, UNKNOWN)


def answers(questions: list[bytes]) -> bytes:
    """Return the concatenated answers to ``questions``, in order (the hot path)."""
    if len(questions) == 1:
        return APHORISMS.get(questions[0], UNKNOWN)
    return b"".join([APHORISMS.get(question, UNKNOWN) for question in questions])
