"""Child-safety building blocks for the fast response (issue 8, part 3).

Pure functions, no I/O; `service.fast_response` wires them in. They reuse the project's
two maintained offline libraries, through the modules that already wrap them:

- ``glin-profanity`` via `service.text_checks.unsafe_words` (the data pipeline's
  ``kid_safe`` filter, plus its few extra words), for rude words;
- Google's libphonenumber port ``phonenumbers`` and the e-mail and name patterns of
  `service.redaction` (the request log's redaction), for personal details.

What they decide, per request:

1. `unsafe_input`: the child's turn has an unsafe word, so the fast response must be
   one of `NEUTRAL_ACKNOWLEDGEMENTS`, which echo nothing and carry no sentiment.
2. `output_safety` (or `inspect_turn` once per request, then `TurnSafety.check` per
   candidate): why a candidate fast response must not be spoken, as a bounded
   `SafetyRejection` (a metrics label): it has an unsafe word, it echoes an unsafe word
   of the child, it echoes one of the child's personal details (`personal_details`:
   e-mail, phone number, a name), or it holds an e-mail address or phone number itself.
3. `describe_turn`: a log-safe summary of a child's text (its length, never its words).
4. `strip_control_tokens`: a turn with chat-template control tokens (``<|im_start|>``,
   ``<start_of_turn>``, ``</s>``) taken out, since a tokenizer parses such a string in
   the prompt text as the control token itself (prompt injection; see the function).

Cost (``python -m service.bench_safety``, see BENCHMARKS.md): a fraction of a
millisecond per request on the Bridge validation turns, warm. The first call loads
glin-profanity's word list (about 45 ms): call `warm_up` at startup.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import phonenumbers

# The three private names are redaction's own e-mail patterns and phone rule, reused so
# that the log and the guard agree; redaction could export them (find_emails, find_phones).
from service.redaction import (
    _EMAIL,
    _SPOKEN_EMAIL,
    DEFAULT_PHONE_REGIONS,
    MIN_PHONE_DIGITS,
    NOT_NAMES,
    _looks_like_phone,
    find_names,
    record_names,
)
from service.text_checks import unsafe_words, word_tokens

NEUTRAL_ACKNOWLEDGEMENTS: tuple[str, ...] = (
    "I hear you.",
    "I see.",
    "I understand.",
    "I'm listening.",
    "All right.",
)
"""Fast responses for a child's turn with an unsafe word: short, no word of the child,
no praise (`service.text_checks.praises_answer` is false), and a VADER compound of 0.0,
so `adapters.signals.tone` rates them "neutral" energy against any child's mood. The
first is `service.fast_response.NEUTRAL_FALLBACK`. Serve them in turn (e.g.
`itertools.cycle`) so a session does not hear the same one twice running."""


class SafetyRejection(StrEnum):
    """Why a candidate fast response must not be spoken (a bounded metrics label)."""

    ECHOES_UNSAFE_INPUT = "echoes_unsafe_input"
    """It repeats an unsafe word or phrase the child said."""
    UNSAFE_WORDS = "unsafe_words"
    """The profanity filter (`service.text_checks.unsafe_words`) flags it."""
    ECHOES_PERSONAL_DETAIL = "echoes_personal_detail"
    """It repeats one of the child's personal details (`personal_details`)."""
    CONTACT_DETAILS = "contact_details"
    """It holds an e-mail address (written or spoken) or a phone number of its own."""


# ---------------------------------------------------------------------------
# Unsafe input


def unsafe_input(user_turn: str) -> bool:
    """True when the child's turn has an unsafe word or phrase (glin-profanity's English
    list or the extra words of `service.text_checks.FilterLimits`; whole words, so
    "Scunthorpe", "cockatoo" and "bass" pass). The fast response must then be one of
    `NEUTRAL_ACKNOWLEDGEMENTS`. Use `service.text_checks.unsafe_words` for the words
    themselves (to count them; never log or label them)."""
    return bool(unsafe_words(user_turn))


def _padded_tokens(text: str) -> str:
    """`text`'s lower-case word tokens joined by single spaces, with a space each side,
    so `" word "` in it is a whole-word, case-insensitive search."""
    return " " + " ".join(word_tokens(text)) + " "


def _echoes_words(candidate_tokens: str, phrases: Iterable[str]) -> bool:
    for phrase in phrases:
        needle = " ".join(word_tokens(phrase))
        if needle and f" {needle} " in candidate_tokens:
            return True
    return False


# ---------------------------------------------------------------------------
# Personal details

_DIGIT = re.compile(r"\d")
_DIGIT_RUN = re.compile(r"\d(?:[\s().+/-]*\d)*")
_NAME_SPLIT = re.compile(r"[\s\-]+")
_LOCAL_PART_WORD = re.compile(r"[^\W\d_]{2,}")
_SPOKEN_DOT = re.compile(r"\s+dot\s+", re.IGNORECASE)
_SPOKEN_AT = re.compile(r"\s+at\s+", re.IGNORECASE)
_POSSESSIVE = re.compile(r"'s$")


@dataclass(frozen=True, slots=True)
class PersonalDetails:
    """The child's personal details in one turn. Holds the child's words: never log it.

    An empty instance is falsy.
    """

    names: frozenset[str] = frozenset()
    """Lower-case single words: each part of a name after a name cue ("my name is Anna
    Lopez" gives "anna" and "lopez"), of a name given as the answer to "what's your
    name?", and the name-like words of an e-mail's local part ("tom.smith@..." gives
    "tom" and "smith"; common words such as "cool" are not taken, `NOT_NAMES`)."""
    emails: frozenset[str] = frozenset()
    """Lower-case addresses, spoken ones rewritten ("tom dot smith at gmail dot com" is
    "tom.smith@gmail.com")."""
    phones: frozenset[str] = frozenset()
    """Digit strings of each phone number as said ("07700 900123" is "07700900123") and
    its national number without the trunk prefix ("7700900123")."""

    def __bool__(self) -> bool:
        return bool(self.names or self.emails or self.phones)


def _name_parts(names: Iterable[str]) -> set[str]:
    return {
        part.lower()
        for name in names
        for part in _NAME_SPLIT.split(name)
        if len(part) >= 2 and part.lower() not in NOT_NAMES
    }


def _emails(text: str) -> set[str]:
    found = {m.group().lower() for m in _EMAIL.finditer(text)}
    for match in _SPOKEN_EMAIL.finditer(text):
        written = _SPOKEN_AT.sub("@", _SPOKEN_DOT.sub(".", match.group()))
        found.add("".join(written.split()).lower())
    return found


def _phones(text: str) -> set[str]:
    """Digit strings of the phone numbers in `text`; libphonenumber runs only when the
    text has at least MIN_PHONE_DIGITS digits (it costs about 0.1 ms a region)."""
    if len(_DIGIT.findall(text)) < MIN_PHONE_DIGITS:
        return set()
    found: set[str] = set()
    for region in dict.fromkeys((*DEFAULT_PHONE_REGIONS, "ZZ")):  # "ZZ": numbers with "+"
        for match in phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.POSSIBLE
        ):
            if _looks_like_phone(match.raw_string, match.number):
                found.add("".join(_DIGIT.findall(match.raw_string)))
                found.add(str(match.number.national_number))
    return {digits for digits in found if len(digits) >= MIN_PHONE_DIGITS}


def personal_details(pika_turn: str | None, user_turn: str) -> PersonalDetails:
    """The child's personal details in `user_turn` (see `PersonalDetails`).

    Names come from `service.redaction`: the one to three name words after a cue ("my
    name is", "call me", "I'm called", ...) in the child's turn, and the child's whole
    answer when `pika_turn` asks "what's your name?" ("It's Anna Lopez."). A name cue
    in Pika's own turn ("My name is Pika!") is not the child's. Phone numbers are found
    by libphonenumber in the US and UK formats and with a "+" in any region; counting
    ("1 2 3 4 5 6 7") and short numbers are not phone numbers.

    Args:
        pika_turn: what Pika said before, or None.
        user_turn: what the child said.

    Returns:
        The details found; falsy when there are none.
    """
    names = Counter(record_names({"pika_turn": pika_turn, "user_turn": user_turn}))
    if pika_turn:
        names -= Counter(find_names(pika_turn))  # Pika's own "my name is Pika"
    emails = _emails(user_turn)
    words = _name_parts(names)
    for email in emails:
        local = email.split("@", 1)[0]
        words |= {w for w in _LOCAL_PART_WORD.findall(local) if w not in NOT_NAMES}
    return PersonalDetails(frozenset(words), frozenset(emails), frozenset(_phones(user_turn)))


def echoes_personal_details(candidate: str, details: PersonalDetails) -> bool:
    """True when `candidate` repeats any of `details`: a name word (whole words, any
    case, "Anna's" too), an e-mail address, or a phone number's digits however they are
    spaced or punctuated ("077 009 00123", "(0)7700-900-123")."""
    if not details:
        return False
    if details.names:
        tokens = {_POSSESSIVE.sub("", t) for t in word_tokens(candidate)}
        if not tokens.isdisjoint(details.names):
            return True
    if details.emails:
        lowered = candidate.lower()
        if any(email in lowered for email in details.emails):
            return True
        if not _emails(candidate).isdisjoint(details.emails):
            return True
    if details.phones and len(_DIGIT.findall(candidate)) >= MIN_PHONE_DIGITS:
        runs = ["".join(_DIGIT.findall(run)) for run in _DIGIT_RUN.findall(candidate)]
        return any(phone in run for run in runs for phone in details.phones)
    return False


def contains_contact(text: str) -> bool:
    """True when `text` has an e-mail address (written, or spoken "x at y dot com") or a
    phone number (`personal_details`'s rules) of its own."""
    return bool(_EMAIL.search(text) or _SPOKEN_EMAIL.search(text) or _phones(text))


# ---------------------------------------------------------------------------
# The output check


@dataclass(frozen=True, slots=True)
class TurnSafety:
    """What one request's turns hold that matters for safety: computed once per request
    by `inspect_turn`, then `check` runs per candidate. Holds the child's words: never
    log it or use it as a label."""

    unsafe_words: tuple[str, ...] = ()
    """The unsafe words and phrases of the child's turn, lower-case."""
    details: PersonalDetails = field(default_factory=PersonalDetails)
    """The child's personal details."""

    @property
    def unsafe_input(self) -> bool:
        """The child said an unsafe word: answer with `NEUTRAL_ACKNOWLEDGEMENTS`."""
        return bool(self.unsafe_words)

    def check(self, candidate: str) -> SafetyRejection | None:
        """Why `candidate` (a cleaned fast response) must not be spoken, or None.

        Checks, first failing one named: ECHOES_UNSAFE_INPUT (a child's unsafe word or
        phrase, whole words, any case), UNSAFE_WORDS (the profanity filter flags it),
        ECHOES_PERSONAL_DETAIL (`echoes_personal_details`), CONTACT_DETAILS
        (`contains_contact`). The candidate is NFKC-normalised first, as the turn was
        (`inspect_turn`), so full-width or compatibility letters match plain ones.
        """
        candidate = unicodedata.normalize("NFKC", candidate)
        if self.unsafe_words and _echoes_words(_padded_tokens(candidate), self.unsafe_words):
            return SafetyRejection.ECHOES_UNSAFE_INPUT
        if unsafe_words(candidate):
            return SafetyRejection.UNSAFE_WORDS
        if echoes_personal_details(candidate, self.details):
            return SafetyRejection.ECHOES_PERSONAL_DETAIL
        if contains_contact(candidate):
            return SafetyRejection.CONTACT_DETAILS
        return None


def inspect_turn(pika_turn: str | None, user_turn: str) -> TurnSafety:
    """The child's unsafe words and personal details, for `TurnSafety.check`. Both turns
    are NFKC-normalised first ("my name is \uff21\uff2e\uff2e\uff21", full-width, is
    "ANNA")."""
    user_turn = unicodedata.normalize("NFKC", user_turn)
    if pika_turn is not None:
        pika_turn = unicodedata.normalize("NFKC", pika_turn)
    return TurnSafety(tuple(unsafe_words(user_turn)), personal_details(pika_turn, user_turn))


def output_safety(candidate: str, pika_turn: str | None, user_turn: str) -> SafetyRejection | None:
    """Why `candidate` must not be spoken after this turn, or None when it may be.

    One call: `inspect_turn(pika_turn, user_turn).check(candidate)`. With several
    candidates per request, call `inspect_turn` once and `check` per candidate.

    Args:
        candidate: the cleaned fast response (`service.guard.clean_fast_response`).
        pika_turn: what Pika said before, or None.
        user_turn: what the child said.

    Returns:
        The first failing check (`TurnSafety.check`), or None.
    """
    return inspect_turn(pika_turn, user_turn).check(candidate)


def warm_up() -> None:
    """Load glin-profanity's word list and libphonenumber's metadata now (about 50 ms
    together), so the first request does not pay for it."""
    output_safety("Call 020 7946 0000, Bob.", "What's your name?", "my name is Bob, shit")


# ---------------------------------------------------------------------------
# Logs


def describe_turn(text: str | None) -> str:
    """A log-safe summary of a child's text: ``"42 chars, 9 words"`` (characters of the
    text as sent, whitespace-separated words), or ``"none"``. It never holds the words:
    logs hold ids and lengths unless a debug flag is set (issue 8)."""
    if text is None:
        return "none"
    return f"{len(text)} chars, {len(text.split())} words"


# ---------------------------------------------------------------------------
# Prompt injection

_CONTROL_TOKEN = re.compile(
    r"<\|[^<>|\s]{1,40}\|>"  # ChatML, Qwen, Llama 3, Phi: <|im_start|>, <|eot_id|>
    r"|</?s>|<(?:bos|eos|pad|unk|mask|start_of_turn|end_of_turn|/?think)>"  # Llama 2, gemma
    r"|\[/?INST\]|<</?SYS>>",  # Llama 2 chat
    re.IGNORECASE,
)
_ANGLE_TOKEN = re.compile(r"<[^<>\s]{1,64}>")


def special_tokens(tokenizer: Any) -> frozenset[str]:
    """The strings a Hugging Face tokenizer turns into special (control) tokens wherever
    they appear in a prompt text: its added tokens marked special (``<|im_start|>``;
    gemma-3's ``<start_of_turn>``, ``<eos>`` and its ``<unusedN>`` tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    return frozenset(str(tok.content) for tok in decoder.values() if getattr(tok, "special", False))


@functools.lru_cache(maxsize=8)
def _other_tokens_pattern(tokens: frozenset[str]) -> re.Pattern[str] | None:
    others = sorted((t for t in tokens if not _ANGLE_TOKEN.fullmatch(t)), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in others)) if others else None


def strip_control_tokens(text: str, tokens: frozenset[str] = frozenset()) -> str:
    """`text` with chat-template control tokens replaced by a space.

    Why: the prompt is a string, and vLLM tokenizes it with special tokens parsed, so a
    turn holding ``<|im_end|><|im_start|>system`` (Qwen) or ``<end_of_turn>`` (gemma)
    becomes the real control token, and the child's text could close its own message
    and open a new system one. Removed: the common chat-template tokens (ChatML
    ``<|...|>``, ``<s>``/``</s>``, ``<bos>``, ``<eos>``, ``<start_of_turn>``,
    ``<end_of_turn>``, ``<think>``, ``[INST]``, ``<<SYS>>``) and every string in
    `tokens` (pass `special_tokens(tokenizer)` for the served model's own). Text such as
    "<3" or "a < b > c" stays.

    Args:
        text: a turn's text (the child's, Pika's, or the main response).
        tokens: exact control-token strings to remove as well.

    Returns:
        The text, unchanged when it holds no control token.
    """
    other = _other_tokens_pattern(tokens) if tokens else None
    if "<" in text or "[" in text:
        text = _CONTROL_TOKEN.sub(" ", text)
        if tokens:
            text = _ANGLE_TOKEN.sub(lambda m: " " if m.group() in tokens else m.group(), text)
    if other is not None:
        text = other.sub(" ", text)
    return text
