"""Personal details out of conversation text, before it is stored (issue 10, part 3).

`redact(text)` replaces what it finds with a placeholder:

- ``[EMAIL]``: an e-mail address (``tom.b+pika@example.co.uk``), also as a speech
  recogniser writes one out (``tom dot smith at gmail dot com``);
- ``[ADDRESS]``: a street address, a house number, one to four street-name words and a
  street suffix (``12 Oak Street``, ``221b baker st``, ``4 Elm Tree Ave.``);
- ``[PHONE]``: a phone number, found by Google's libphonenumber port
  (`phonenumbers.PhoneNumberMatcher`, leniency ``POSSIBLE``, so fictional 555 numbers
  are caught too) in the national formats of `DEFAULT_PHONE_REGIONS` (US and UK) and
  with a leading ``+`` in any region. A match is kept only with at least
  `MIN_PHONE_DIGITS` digits, and not when it is counting (digit groups in arithmetic
  progression: ``1 2 3 4 5 6 7 8``, ``2021 2022``) or one round number (``1000000``:
  one digit run ending in 000 without a leading 0 that libphonenumber does not take for
  a valid number, so ``2125550000`` and ``07700900000`` are still redacted);
- ``[NAME]``: the name (one to three words: a full name too) after a name cue:
  ``my name is``, ``my name's``, ``her name is``, ``my surname is`` (also ``first``,
  ``last``, ``full``, ``nick``), ``my names`` (a recogniser's spelling), ``I'm called``,
  ``I am called``, ``call me``; punctuation and fillers between the cue and the name
  are skipped (``My name is: Tom``, ``my name is, um, Tom Smith``, ``my name is...
  Tom``). A word counts as a name when it is capitalised or is not a common English
  word (`NOT_NAMES`), so ``my name is long`` or ``call me later`` stay as they are,
  while a lower-case speech transcript ``my name is tom`` is still redacted.

`redact_record(texts)` redacts several texts of one conversation moment together: a
name found in one text (the child's ``my name is Tom``, or the child's short answer to
Pika asking ``what's your name?``) is also replaced everywhere else in the record, so
Pika's ``Hi Tom!`` does not keep it (each part of a full name is replaced on its
own as well). `service.request_log` also passes the names of a session's earlier records
(`record_names`) as `names`, so ``Where do you live, Tom?`` is redacted in a later turn.

Known limits (kept rather than guessed at, so that ordinary lesson talk survives):
numbers spoken as words (``five five five one two...``), a name without a cue
(``I'm Tom``; ``I'm`` is followed by feelings far more often), and places without a
house number (``I live on Oak Street``) are not redacted. Counting (``1, 2, 3, 4, 5``),
years and small amounts are not phone numbers.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

import phonenumbers

NAME = "[NAME]"
EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
ADDRESS = "[ADDRESS]"
PLACEHOLDERS = (NAME, EMAIL, PHONE, ADDRESS)
"""Every placeholder `redact` writes."""

DEFAULT_PHONE_REGIONS: tuple[str, ...] = ("US", "GB")
"""Regions (libphonenumber region codes) whose national formats are looked for in numbers
written without a country code; numbers with a leading ``+`` are found in any region."""

MIN_PHONE_DIGITS = 7
"""Fewer digits than this is no phone number (years, scores, ``12 34 56``)."""

_NOT_NAMES_TEXT = """
    a an the and or but so if then than that this these those it its is are was were be
    been am not no yes yeah ok okay me my mine you your he him his she her they them their
    we us our i to too of on in at by for from with about as up down out over under again
    back later now soon today tomorrow tonight when what who why how where which whenever
    please maybe just only also very really so much many more most some any all every
    long short big small little tiny huge tall good bad nice funny silly cool great happy
    sad mad angry scared tired hungry sleepy new old same different secret hard easy fun
    weird strange special simple boring beautiful pretty ugly kind mean best worst
    because like love hate want can could will would should shall may might must do does
    did done have has had go goes going went gone get got say said tell told know think
    something nothing anything everything someone nobody anyone everyone thing things
    name names called call calling baby kid kids child boy girl friend buddy teacher mom
    mum dad mommy mummy daddy sister brother one two three four five six seven eight nine
    ten here there whatever um uh er hmm oh ah
"""
NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())
"""Lower-case words that end a name after a cue: ``call me later``, ``my name is not
Tom`` (here nothing is redacted, as the first word is no name). A capitalised word is
always taken as a name, so ``My name is May`` is redacted but ``call me maybe`` is not."""

_LETTER = r"[^\W\d_]"
_APOS = "['\u2019]"  # straight or typographic apostrophe
_WORD = rf"{_LETTER}(?:{_LETTER}|(?:{_APOS}|-){_LETTER})*"

_PAUSE = r"[:,.;\u2026-]"  # what a transcript puts between a cue and the name
_FILLER = r"(?:um+|uh+|erm?|hmm+)"
_NAME_CUE = re.compile(
    rf"\b(?:(?:sur|first|last|full|nick)?name(?:{_APOS}s|\s+is)|my\s+names"
    rf"|(?:i{_APOS}m|i\s+am|im)\s+called|call\s+me)"
    rf"(?:{_PAUSE}*\s+|{_PAUSE}+)(?:{_FILLER}{_PAUSE}*\s+)*",
    re.IGNORECASE,
)
_NAME_WORDS = re.compile(rf"({_WORD})(?:[ \t]+({_WORD}))?(?:[ \t]+({_WORD}))?")

_EMAIL = re.compile(r"[\w.+%-]+@[\w-]+(?:\.[\w-]+)+", re.UNICODE)
_SPOKEN_EMAIL = re.compile(
    r"\b[\w.+-]+(?:\s+dot\s+[\w+-]+)*\s+at\s+[\w-]+(?:\s+dot\s+[\w-]+)*\s+dot\s+"
    r"(?:com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|au|ca|us|info|me)\b",
    re.IGNORECASE,
)
_STREET_SUFFIX = (
    r"street|st|road|rd|avenue|ave|av|lane|ln|drive|dr|boulevard|blvd|court|ct|place|pl|"
    r"way|terrace|close|crescent|cres|highway|hwy|parkway|pkwy|square|sq|circle|cir|"
    r"trail|row|grove|gardens|mews|hill|walk"
)
_NOT_STREET_WORD = (
    r"(?!(?:the|a|an|on|in|at|to|into|down|up|by|of|and|or|my|your|his|her|our|their|"
    r"is|are|was|were|with|for|from|near|over|under|across|along)\b)"
)
_ADDRESS = re.compile(
    rf"\b\d{{1,6}}[a-z]?,?\s+(?:{_NOT_STREET_WORD}{_WORD}\.?\s+){{1,4}}"
    rf"(?:{_STREET_SUFFIX})\b\.?",
    re.IGNORECASE,
)
_ASKS_NAME = re.compile(
    rf"\bwhat(?:{_APOS}s|\s+is)\s+your\s+name\b|\byour\s+name\s*\?|\bwho\s+are\s+you\b",
    re.IGNORECASE,
)
_ANSWER_LEAD = re.compile(
    rf"^\s*(?:(?:it{_APOS}s|it\s+is|i{_APOS}m|i\s+am|my\s+name\s+is|me|um|uh)[\s,]+)*",
    re.IGNORECASE,
)


def _is_name_word(word: str) -> bool:
    return word[:1].isupper() or word.lower() not in NOT_NAMES


def _cue_names(text: str) -> list[str]:
    """The names after the name cues of `text`, e.g. ``["Anna Lopez"]``."""
    names: list[str] = []
    for cue in _NAME_CUE.finditer(text):
        words = _NAME_WORDS.match(text, cue.end())
        if words is None:
            continue
        kept: list[str] = []
        for word in words.groups():
            if word is None or not _is_name_word(word):
                break
            kept.append(word)
        if kept:
            names.append(" ".join(kept))
    return names


def _answer_names(question: str, answer: str) -> list[str]:
    """The child's name when `question` asks for it and `answer` is one to three name
    words (``Tom``, ``It's Anna Lopez.``); else nothing."""
    if not _ASKS_NAME.search(question):
        return []
    rest = _ANSWER_LEAD.sub("", answer).strip().rstrip(".!?").strip()
    words = rest.split()
    if not 1 <= len(words) <= 3:
        return []
    if all(re.fullmatch(_WORD, w) and _is_name_word(w) for w in words):
        return [" ".join(words)]
    return []


def find_names(text: str) -> list[str]:
    """Names `redact` would replace in `text` (after a name cue), in text order."""
    return _cue_names(text)


def _looks_like_phone(raw: str, number: phonenumbers.PhoneNumber) -> bool:
    """False for what libphonenumber's lenient matcher takes for a number but a child
    says in a lesson: short numbers, counting, one round number (``1000000``: one digit
    run ending in 000, no leading 0, and not a valid number of its region, so
    ``2125550000`` is a phone number)."""
    groups = re.findall(r"\d+", raw)
    if sum(len(g) for g in groups) < MIN_PHONE_DIGITS:
        return False
    values = [int(g) for g in groups]
    if (len(groups) >= 2 and len({len(g) for g in groups}) == 1) or len(groups) >= 3:
        steps = {b - a for a, b in itertools.pairwise(values)}
        if len(steps) == 1 and steps != {0}:
            return False  # counting: 1 2 3 4 5 6 7, 10 20 30 40, 2021 2022
    round_number = len(groups) == 1 and values[0] % 1000 == 0 and not groups[0].startswith("0")
    return not (round_number and not phonenumbers.is_valid_number(number))


def _replace_phones(text: str, regions: Sequence[str]) -> str:
    spans: set[tuple[int, int]] = set()
    for region in dict.fromkeys((*regions, "ZZ")):  # "ZZ": only numbers with "+"
        for match in phonenumbers.PhoneNumberMatcher(
            text, region, leniency=phonenumbers.Leniency.POSSIBLE
        ):
            if _looks_like_phone(match.raw_string, match.number):
                spans.add((match.start, match.end))
    # Overlapping matches of several regions: replace their union, right to left.
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in reversed(merged):
        text = text[:start] + PHONE + text[end:]
    return text


def _replace_names(text: str, names: Iterable[str]) -> str:
    # A full name's parts too ("Hi Anna!" after "my name is Anna Lopez"); longest first,
    # so "Anna Lopez" goes before "Anna"; whole words only.
    variants = {part for name in names for part in (name, *name.split())}
    for name in sorted(variants, key=len, reverse=True):
        pattern = r"\s+".join(re.escape(part) for part in name.split())
        text = re.sub(rf"(?<!\w){pattern}(?!\w)", NAME, text, flags=re.IGNORECASE)
    return text


def redact(
    text: str,
    *,
    names: Iterable[str] = (),
    phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
) -> str:
    """`text` with personal details replaced by placeholders (see the module docstring).

    Args:
        text: Any text, e.g. a child's turn.
        names: Names known from elsewhere in the same record, also replaced (whole words,
            any case).
        phone_regions: libphonenumber regions (``US``, ``GB``...) whose national formats
            are looked for; numbers with a ``+`` are found whatever these are.

    Returns:
        The redacted text; unchanged when nothing personal is found.
    """
    found = [*names, *_cue_names(text)]
    text = _EMAIL.sub(EMAIL, text)
    text = _SPOKEN_EMAIL.sub(EMAIL, text)
    text = _ADDRESS.sub(ADDRESS, text)
    text = _replace_phones(text, phone_regions)
    return _replace_names(text, found)


def record_names(
    texts: Mapping[str, str | None],
    *,
    question_field: str | None = "pika_turn",
    answer_field: str | None = "user_turn",
) -> list[str]:
    """The names `redact_record` finds in one record's texts (see there), in order."""
    names: list[str] = []
    for value in texts.values():
        if value:
            names.extend(_cue_names(value))
    question = texts.get(question_field) if question_field else None
    answer = texts.get(answer_field) if answer_field else None
    if question and answer:
        names.extend(_answer_names(question, answer))
    return names


def redact_record(
    texts: Mapping[str, str | None],
    *,
    names: Iterable[str] = (),
    question_field: str | None = "pika_turn",
    answer_field: str | None = "user_turn",
    phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
) -> dict[str, str | None]:
    """Redact the texts of one record together (None stays None).

    A name found in any of them, after a name cue, or as the whole answer in
    `answer_field` to a name question in `question_field` (Pika: "What's your name?",
    child: "Tom"), is replaced in all of them.

    Args:
        texts: Field name to text, e.g. ``{"user_turn": ..., "fast_response": ...}``.
        names: Names known from elsewhere (earlier records of the session), also replaced.
        question_field: The field holding Pika's question, or None.
        answer_field: The field holding the child's answer, or None.
        phone_regions: See `redact`.

    Returns:
        The same keys with redacted texts.
    """
    found = [
        *names,
        *record_names(texts, question_field=question_field, answer_field=answer_field),
    ]
    return {
        key: None if value is None else redact(value, names=found, phone_regions=phone_regions)
        for key, value in texts.items()
    }
