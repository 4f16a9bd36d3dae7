"""The output guard, on hand-written model outputs."""

from __future__ import annotations

import pytest

from service.guard import GuardRejection, clean_fast_response


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ooh, red like a fire truck!", "Ooh, red like a fire truck!"),
        # role prefixes and quotes, nested
        ('Pika: "Wow, pho!"', "Wow, pho!"),
        ("Assistant: 'Great job!'", "Great job!"),
        ("Pika's quick reaction: \u201cYay, an elephant!\u201d", "Yay, an elephant!"),
        # only the first non-empty line
        ("\n  Nice try!\nChild said: more", "Nice try!"),
        # a trailing half-sentence after a whole one is dropped
        ("Wow, pho! Pho is a noodle soup that", "Wow, pho!"),
        # an unterminated line that ended on a stop string is one utterance
        ("Yummy, elephants", "Yummy, elephants"),
        # whole sentences up to the word limit (12)
        ("Wow! I love it. Pho is a noodle soup from Vietnam with herbs.", "Wow! I love it."),
        ("  Ooh,   red!  ", "Ooh, red!"),
        # control characters and U+FFFD never reach text-to-speech
        ("Wow\x18, red\ufffd!\u200b", "Wow, red!"),
    ],
)
def test_cleans_to_one_short_utterance(raw: str, expected: str) -> None:
    assert clean_fast_response(raw, max_words=12).text == expected


@pytest.mark.parametrize(
    ("raw", "truncated", "reason"),
    [
        ("", False, GuardRejection.EMPTY),
        ("  ...  ", False, GuardRejection.EMPTY),
        ('Pika: ""', False, GuardRejection.EMPTY),
        ("\ufffd\ufffd\x00", False, GuardRejection.EMPTY),
        ("Pho is a noodle soup that people in", True, GuardRejection.TRUNCATED),
        (
            "One two three four five six seven eight nine ten eleven twelve thirteen.",
            False,
            GuardRejection.TOO_LONG,
        ),
        (
            "one two three four five six seven eight nine ten eleven twelve thirteen",
            False,
            GuardRejection.TOO_LONG,
        ),
    ],
)
def test_rejects_with_reason(raw: str, truncated: bool, reason: GuardRejection) -> None:
    result = clean_fast_response(raw, max_words=12, truncated=truncated)
    assert result.text is None
    assert result.rejection is reason


def test_truncated_output_keeps_its_whole_sentences() -> None:
    result = clean_fast_response("Nice! Pho is a noodle soup that", max_words=12, truncated=True)
    assert result.text == "Nice!"
