"""The output guard: turns raw model text into one short utterance, or rejects it.

This module holds the text rules, so the data pipeline's filters and the GRPO
rewards can call the same functions that serving enforces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

#: Speaker labels a model may put before its answer ("Pika's quick reaction:" is the
#: prompt's own label, `service.prompts.REACTION_LABEL`).
_ROLE_NAMES = r"pika(?:'s)?(?:\s+quick)?(?:\s+reaction)?|assistant|tutor|teacher|ai|bot|model"
_ROLE_PREFIX = re.compile(rf"^\s*(?:{_ROLE_NAMES})\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"  # straight, curly and angle quotes
_ROLE_SO_FAR = re.compile(rf"[\s{_QUOTES}]*(?:{_ROLE_NAMES})\s*", re.IGNORECASE)


def may_become_role_prefix(text: str) -> bool:
    """Whether `text` (the start of a generation, whole words) is, so far, only a
    speaker label without its colon ("Pika's quick", "Teacher"): a streaming guard
    holds such words back until the next ones show whether a colon follows."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return _ROLE_SO_FAR.fullmatch(first) is not None


_SENTENCE = re.compile("[^.!?\u2026]*[.!?\u2026]+[\"'\u201d\u2019)]*")
_LETTER = re.compile(r"[^\W\d_]")


class GuardRejection(StrEnum):
    """Why the guard refused a model output (a bounded metrics label)."""

    EMPTY = "empty"
    TRUNCATED = "truncated"
    TOO_LONG = "too_long"
    TONE_MISMATCH = "tone_mismatch"


@dataclass(frozen=True, slots=True)
class GuardResult:
    """`text` is the cleaned utterance, or None with the `rejection` reason."""

    text: str | None
    rejection: GuardRejection | None = None


def word_count(text: str) -> int:
    """Whitespace-separated words in `text`."""
    return len(text.split())


def clean_fast_response(raw: str, max_words: int, truncated: bool = False) -> GuardResult:
    """Clean a raw model output into one short utterance.

    Steps: keep the first non-empty line; strip role prefixes ("Pika:",
    "Assistant:") and surrounding quotes; keep whole sentences up to `max_words`
    words; drop a trailing half-sentence when a whole one precedes it.

    Args:
        raw: the model's text.
        max_words: the personality's word limit.
        truncated: the model stopped on its token limit (vLLM finish_reason
            "length"), so unterminated text is a cut-off half-sentence.

    Returns:
        GuardResult with the text, or with a rejection: EMPTY (no letters left),
        TRUNCATED (only a cut-off half-sentence), TOO_LONG (the first sentence
        alone is over `max_words`).
    """
    # Nothing unspeakable reaches text-to-speech: control and format characters and
    # U+FFFD (a broken byte sequence) are removed first.
    raw = "".join(ch for ch in raw if ch in "\n\t" or (ch.isprintable() and ch != "\ufffd"))
    line = next((ln for ln in raw.splitlines() if ln.strip()), "")
    previous = None
    while previous != line:  # prefixes and quotes can nest: '"Pika: "Wow!""'
        previous = line
        line = _ROLE_PREFIX.sub("", line).strip().strip(_QUOTES).strip()
    line = " ".join(line.split())
    if not _LETTER.search(line):
        return GuardResult(None, GuardRejection.EMPTY)

    # Whole sentences only; a trailing half-sentence after them is dropped.
    sentences = [s.strip() for s in _SENTENCE.findall(line)]
    if not sentences:
        if truncated:
            return GuardResult(None, GuardRejection.TRUNCATED)
        sentences = [line]  # one unterminated line that ended on a stop string

    kept: list[str] = []
    for sentence in sentences:
        if word_count(" ".join([*kept, sentence])) > max_words:
            break
        kept.append(sentence)
    if not kept:
        return GuardResult(None, GuardRejection.TOO_LONG)
    text = " ".join(kept).strip(_QUOTES + " ")
    if not _LETTER.search(text):
        return GuardResult(None, GuardRejection.EMPTY)
    return GuardResult(text)


def check_tone_fit(text: str, user_turn: str) -> GuardResult:
    """The optional tone guard (setting `tone_guard`): refuse a tone that clashes.

    Runs `adapters.signals.tone.tone_mismatch` (VADER sentiment of the child's turn and
    of `text`): an exuberant reply to a sad, scared or hurt child, or a gloomy reply to
    a happy one, is refused. Adds 0.03 ms per call at P95 (`python -m service.bench_tone`).

    Args:
        text: the cleaned utterance (`clean_fast_response(...).text`).
        user_turn: what the child said.

    Returns:
        GuardResult with `text` unchanged, or None with rejection TONE_MISMATCH.
    """
    # Imported here: `adapters.signals` measures `service.text_checks`, which imports this
    # module, so a module-level import could close an import cycle.
    from adapters.signals.tone import tone_mismatch

    if tone_mismatch(user_turn, text) is not None:
        return GuardResult(None, GuardRejection.TONE_MISMATCH)
    return GuardResult(text)
