"""Silver labels from human tutors: the short acknowledgement a real reply opens with.

`fastresp data label --labeler tutor-openers` needs no LLM. Real tutors often open
their reply with a short reaction ("Close!", "Good thinking.", "That is okay!", "Oh,
nice."). When the main response of a triple does, that opener becomes the fast-response
target and is cut from the main response given to the model, so the pair stays
consistent: fast response + main response is what the tutor said.

The opener rule (`split_opener`):

1. The opening clause is the first sentence (up to ``.``, ``!``, ``?`` or ``…`` followed
   by a space or the end, or up to a spaced dash " - "). When that sentence is not an
   acknowledgement, two shorter clauses are tried, in this order: the text before a
   missing full stop ("Hm, not quite To get the area..." gives "Hm, not quite.": a
   lower-case word, then a capitalised sentence starter such as "To", "We", "Remember",
   not a name), and the text before the first comma ("Great try, but let's look
   again." gives "Great try."). A clause cut at a dash, a missing stop or a comma gets
   a full stop.
2. The clause is an acknowledgement when it
   - has at most `max_words` words (6, issue 4) and no ``?`` (a question is not a
     reaction);
   - has no digits and no number words (they are answer content: "12 is right.");
   - uses only reaction words (praise, acknowledgement, "close", "try", "thinking",
     see `service.text_checks.REACTION_WORDS`) and function words, with at least one
     acknowledgement (`ACK_WORDS`, or "not quite", "not yet", "I see"): "It's a kite."
     is content and "Think about it." an instruction, "That is okay!" is neither;
   - is not only a filler ("Okay.", "Hmm,", "Well,", "Mm-hmm."): fillers are not a warm
     reaction and would make the data canned;
   - is not a cold verdict ("No.", "That is incorrect.", "That is not correct."); a
     gentle "Not quite." or "Not yet." is kept.
3. Something must remain: a main response that is only the opener ("Great job!") gives
   no pair, since a fast response needs a main response to lead into; an empty main
   response would also read as "not known yet" (None) to the model.

The labeller then runs the text filters (`service.text_checks.failed_filters`) on the
opener against the rest of the main response and, when given, the signal filters
(``low_uptake``, ``tone_mismatch``: `adapters.labels.SignalFilters`, scored
`SIGNAL_BATCH` openers at a time); an opener that fails one (e.g. "Great job!" before
"Actually, ..." is ``no_contradiction``, the praise-before-correction filter; "Yes."
before "Yes, that's right." a duplicate; "Yay!" after "my dog died" a tone mismatch)
gives a rejected row with reason ``no_candidate_passed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from adapters.labels import (
    LabeledRow,
    LabelSummary,
    LabelWriter,
    RejectedCandidate,
    SignalFilters,
    base_fields,
)
from adapters.labels import row_id as make_row_id
from adapters.sources import Triple
from service.text_checks import (
    DEFAULT_LIMITS,
    REACTION_WORDS,
    STOPWORDS,
    FilterLimits,
    failed_filters,
    numbers,
    word_set,
)

PROMPT_VERSION = "tutor-openers-v1"
"""Recorded in every row; bump it when the opener rule changes."""

LABELER = "tutor-openers"

SIGNAL_BATCH = 64
"""Openers scored by the uptake model in one call (and rows written per batch)."""

_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)]*(?=\s|$)|\s+[-\u2013\u2014]+\s+")
_COMMA = re.compile(r",\s+")
_RUN_ON = re.compile(r"(?<=[a-z])\s+([A-Z][a-z']*)\b")
"""A missing full stop: "Hm, not quite To get the area..." (a lower-case word, then a
capitalised sentence starter)."""
_SENTENCE_STARTERS = STOPWORDS | word_set("remember take try look think let's can could")
"""Capitalised words taken to start a new sentence after a missing full stop (a name
such as "Great job Timothy" is not one)."""
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")

ACK_WORDS: frozenset[str] = word_set(
    """
    great good nice awesome excellent wonderful perfect fantastic amazing super brilliant
    cool wow ooh yay hooray terrific lovely beautiful fun funny interesting exciting right
    correct exactly close almost true sure absolutely definitely totally glad happy proud
    thank thanks sorry okay ok yes yeah yep yup alright oh ah aha fine hi hello hey
    """
)
"""Words that make a clause a reaction; an opener needs one of them or of `ACK_PHRASES`
("Think about it." and "Try it." have none: they are instructions)."""

ACK_PHRASES = re.compile(r"\b(?:not quite|not yet|i see)\b")
"""Acknowledgements without an `ACK_WORDS` word."""

_MODIFIERS = word_set("pretty nearly bit little getting answer there")
"""Other words an acknowledgement may hold ("pretty close", "almost there", "great answer")."""

FILLERS: frozenset[str] = frozenset(
    (
        "ok",
        "okay",
        "alright",
        "hmm",
        "hm",
        "mm",
        "mhm",
        "ah",
        "oh",
        "uh",
        "um",
        "huh",
        "so",
        "well",
        "now",
        "sh",
        "shh",
        "and",
        "then",
    )
)
"""Words that alone are a filler, not a reaction ("Okay.", "Mm-hmm.", "Uh-huh.")."""

_COLD = re.compile(r"\b(?:no|nope|wrong|incorrect)\b|\bnot\b(?!\s+(?:quite|yet)\b)", re.IGNORECASE)


def _is_acknowledgement(clause: str, max_words: int) -> bool:
    """True when `clause` is a short acknowledgement (the rules in the module doc)."""
    if not clause or "?" in clause or len(clause.split()) > max_words:
        return False
    if re.search(r"\d", clause) or numbers(clause):
        return False
    text = clause.lower().replace("\u2019", "'")
    text = re.sub(r"\ball right\b", "alright", text)
    if _COLD.search(text):
        return False
    words = _WORD.findall(text)
    if not words or all(word in FILLERS for word in words):
        return False
    if not any(word in ACK_WORDS for word in words) and not ACK_PHRASES.search(text):
        return False
    return all(
        w in ACK_WORDS or w in REACTION_WORDS or w in STOPWORDS or w in _MODIFIERS for w in words
    )


def _rest(text: str) -> str:
    rest = text.strip().lstrip("-\u2013\u2014,;: ").strip()
    if rest and rest[0].islower():
        rest = rest[0].upper() + rest[1:]
    return rest


def split_opener(main_response: str, *, max_words: int = 6) -> tuple[str, str] | None:
    """Split a short acknowledgement off the start of a tutor's reply.

    Args:
        main_response: the tutor's reply.
        max_words: most words of the opener (issue 4: 6).

    Returns:
        (opener, rest of the main response), e.g. "Close! The answer is 12." gives
        ("Close!", "The answer is 12."); None when the reply does not open with an
        acknowledgement (rules in the module docstring) or nothing would remain.
    """
    text = " ".join(main_response.split())
    if not text:
        return None
    end = _SENTENCE_END.search(text)
    sentence_end = end.start() if end else len(text)
    candidates: list[tuple[str, str]] = []
    if end is not None:
        sentence = text[: end.end()].strip()
        if end.group().strip() and end.group().strip()[0] in "-\u2013\u2014":
            sentence = text[: end.start()].strip().rstrip(",;:") + "."
        if "?" not in end.group():  # a question is no reaction; its comma clause may be
            candidates.append((sentence, text[end.end() :]))
    for run_on in _RUN_ON.finditer(text, 0, sentence_end):
        if run_on.group(1).lower() in _SENTENCE_STARTERS:
            candidates.append((text[: run_on.start()].strip() + ".", text[run_on.start(1) :]))
            break
    comma = _COMMA.search(text)
    if comma is not None and comma.start() < sentence_end:
        candidates.append((text[: comma.start()].strip() + ".", text[comma.end() :]))
    for opener, remainder in candidates:
        rest = _rest(remainder)
        if _is_acknowledgement(opener, max_words) and re.search(r"[^\W_]", rest):
            return opener, rest
    return None


def label_with_tutor_openers(
    triples: Iterable[Triple],
    out: Path,
    *,
    personality: str = "calm",
    limits: FilterLimits = DEFAULT_LIMITS,
    signals: SignalFilters | None = None,
    progress: Callable[[], None] | None = None,
) -> LabelSummary:
    """Label `triples` with their tutors' openers; append one row per triple to `out`.

    Each triple gives one `LabeledRow` (labeler "tutor-openers", prompt_version
    `PROMPT_VERSION`):

    - accepted: `fast_response` is the opener and `main_response` the rest of the
      tutor's reply (opener cut off);
    - rejected, reason ``no_opener``: no main response, or it does not open with a
      short acknowledgement (`split_opener`);
    - rejected, reason ``no_candidate_passed``: the opener failed a text filter against
      the rest of the reply, or (when `signals` is given) a signal filter; `rejected`
      holds it with the filter names.

    Rejected rows keep the triple's main response. The run is resumable: rows whose id
    is already in `out` are skipped (counted in `skipped_done`), and `LabelWriter`
    flushes each row and repairs a torn last line.

    Args:
        triples: the triples to label.
        out: the JSON Lines output file (appended to).
        personality: recorded in each row (the tutors' voice is not a personality's).
        limits: the filter limits; `max_words` of the opener stays 6 (issue 4).
        signals: the signal filters (loaded once by the caller); None: text filters
            only. Openers that pass the text filters are scored `SIGNAL_BATCH` at a time.
        progress: called once per triple (labelled or skipped).

    Returns:
        What this run did.
    """
    summary = LabelSummary()
    tick = progress if progress is not None else (lambda: None)
    with LabelWriter(out) as writer:
        stream = iter(triples)
        while batch := list(islice(stream, SIGNAL_BATCH)):
            todo: list[Triple] = []
            for triple in batch:
                if make_row_id(triple.id, personality) in writer.done:
                    summary.skipped_done += 1
                    tick()
                else:
                    todo.append(triple)
            for row in _label_batch(todo, personality, limits, signals):
                if row.id in writer.done:  # the same triple twice in one batch
                    summary.skipped_done += 1
                else:
                    writer.write(row)
                    summary.count(row)
                tick()
    return summary


def _label_batch(
    triples: list[Triple], personality: str, limits: FilterLimits, signals: SignalFilters | None
) -> Iterator[LabeledRow]:
    """The rows of `triples`, in order; the openers passing the text filters are checked
    by `signals` in one batch."""
    staged: list[tuple[dict[str, Any], str, str, list[str]] | LabeledRow] = []
    for triple in triples:
        fields = base_fields(triple, personality)
        fields |= {"labeler": LABELER, "prompt_version": PROMPT_VERSION}
        split = split_opener(triple.main_response) if triple.main_response else None
        if split is None:
            staged.append(
                LabeledRow(**fields, status="rejected", fast_response=None, reason="no_opener")
            )
            continue
        opener, rest = split
        failed = failed_filters(
            opener, user_turn=triple.user_turn, main_response=rest, limits=limits
        )
        staged.append((fields, opener, rest, failed))
    pending = [
        (str(item[0]["user_turn"]), item[1])
        for item in staged
        if not isinstance(item, LabeledRow) and not item[3]
    ]
    verdicts = iter(signals.check(pending) if signals is not None else [])
    for item in staged:
        if isinstance(item, LabeledRow):
            yield item
            continue
        fields, opener, rest, failed = item
        if not failed and signals is not None:
            failed = next(verdicts).failed
        if failed:
            yield LabeledRow(
                **fields,
                status="rejected",
                fast_response=None,
                rejected=[RejectedCandidate(text=opener, reasons=failed)],
                reason="no_candidate_passed",
            )
            continue
        fields["main_response"] = rest
        yield LabeledRow(**fields, status="accepted", fast_response=opener)
