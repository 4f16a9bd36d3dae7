"""Tone fit: does a fast response's tone fit the child's mood?

VADER (Hutto and Gilbert, 2014, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text", ICWSM; the PyPI package `vaderSentiment`) rates the
child's turn and the response with its compound score in [-1, 1]. Two kinds of
mismatch are flagged (issue 9, part 2):

- ``exuberant_to_upset_child``: the child is clearly negative (sad, scared, hurt) and
  the response is exuberant ("Yay!!! Awesome!" to "My dog died").
- ``gloomy_to_happy_child``: the child is clearly happy (proud, excited, laughing) and
  the response is gloomy ("Oh no, that's so sad" to "I got a gold star!").

Everything else fits. In particular an empathetic reply to a sad child ("Oh no, I'm
sorry") is the right tone, not a gloomy mismatch, and an excited reply to a neutral
child ("Ooh, blue!") is Pika's style, not a clash.

Besides VADER's compound score, three small documented additions:

- `LEXICON_ADDITIONS`: six words children say that VADER 3.3.2's lexicon lacks
  ("afraid", "nightmare", "ouch", "owie", "hehe", "yippee"), each valued like a close
  word VADER already has, and "fire" made neutral ("fire truck").
- `SYMPATHY_CUES`: "oh no", "oh dear", "sorry", "poor" make a response gloomy when it is
  not exuberant; VADER reads "Oh dear, I'm sorry" as positive (+0.32, from "dear").
- An exclamation mark with no clear polarity makes a child's turn excited ("I can
  count to ten!" scores 0.0): see `CHILD_HAPPY_MIN`.

Checked against `tests/data/tone_labels.jsonl` (`evaluate_tone`): 47 child turns and
101 sample fast responses with the expected flag. An agent (the helper that wrote this
module) wrote and labelled that set before choosing the thresholds, not human raters;
the thresholds were then chosen on the same set, so its precision and recall are
optimistic for unseen text.

Pure Python and fast: one cached analyzer; a check is two VADER calls (about 0.1 ms
on the project's 2-core machine).
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from adapters.signals.scoring import PrecisionRecall

#: The labelled set: child turns, sample fast responses and the expected flag.
TONE_LABELS: Path = Path(__file__).parents[2] / "tests" / "data" / "tone_labels.jsonl"

#: A child's turn with a VADER compound score at or below this is "upset" (sad, scared,
#: hurt). VADER's own convention calls a compound <= -0.05 negative (vaderSentiment
#: README); "clearly" negative needs more than one mild word: "I miss my grandma"
#: scores -0.15 and "No, I don't like it" -0.28, while "I lost my teddy bear" scores
#: -0.32 and "I'm scared of the dark" -0.44. -0.3 sits between those, chosen on the
#: labelled set; a dislike of broccoli is not an upset child.
CHILD_UPSET_MAX = -0.3

#: A child's turn with a compound at or above this is "happy". On the labelled set happy
#: turns score 0.48 ("I ate a hundred ice creams! Lol.") to 0.65; on the Bridge
#: validation turns a bare "yes" scores 0.40 and "like a kite." 0.36 (VADER reads the
#: answer "yes" and the preposition "like" as positive), and those are answers, not joy.
#: 0.45 needs more than one such mild word. A turn with an exclamation mark and no
#: clear polarity (compound strictly between VADER's -0.05 neutral bound and this) also
#: counts as happy: children announce what they are proud of with "!" and VADER has no
#: words for it ("I can ride my bike now!" scores 0.0). Transcripts without punctuation
#: lose that cue.
CHILD_HAPPY_MIN = 0.45

#: VADER's neutral band (vaderSentiment README): a compound above this is not negative.
VADER_NEUTRAL_MIN = -0.05

#: A response with a compound at or above this, and an exclamation mark or a
#: celebratory word (`CELEBRATORY_WORDS`), is "exuberant". On the labelled set the
#: celebratory replies score 0.49 ("Hmm, good one!") to 0.91, and calm warm replies
#: without "!" up to 0.44 ("Thunder can be very loud. You are safe."); 0.45 is between
#: them, chosen on the labelled set. Requiring "!" or a celebratory word keeps calm
#: reassurance out.
RESPONSE_EXUBERANT_MIN = 0.45

#: A response with a compound at or below this is "gloomy" (as is a non-exuberant one
#: with a `SYMPATHY_CUES` phrase). The mirror of CHILD_UPSET_MAX: "Oh no, that's sad"
#: scores -0.48, "Oh no, that's so sad" -0.61.
RESPONSE_GLOOMY_MAX = -0.3

#: Interjections and words of celebration; with a high compound they mark an
#: exuberant response even without "!".
CELEBRATORY_WORDS = frozenset(
    {"yay", "woohoo", "hooray", "hurray", "yippee", "awesome", "amazing", "wow", "whoo"}
)

#: Phrases of sympathy or dismay. A response with one and no exuberance is gloomy: the
#: right tone for a sad child, the wrong one for a proud one ("Oh dear, I'm sorry" to
#: "I won the race!"). VADER alone misses these: it reads "dear" as positive and
#: "oh no" as neutral.
SYMPATHY_CUES = ("oh no", "oh dear", "sorry", "poor")

#: Words added to VADER's lexicon (valence on VADER's -4..+4 scale). Each is a word
#: young children use that vaderSentiment 3.3.2 lacks, valued like its nearest entry:
#: "afraid" like "scared" (-1.9) and "scary" (-2.2); "nightmare" like "scary";
#: "ouch"/"owie" (pain) like "hurt" (-2.4) softened to "worried" (-1.2) and
#: "lonely" (-1.5); "hehe" like "lol" (1.8); "yippee" like "woohoo" (2.3).
#: One entry is neutralised: "fire" (-1.4 in VADER, from "fired") is what children say
#: in "fire truck" and "fire engine", which made "I saw a big red fire truck!" upset.
LEXICON_ADDITIONS: dict[str, float] = {
    "fire": 0.0,
    "afraid": -2.0,
    "nightmare": -2.2,
    "ouch": -1.5,
    "owie": -1.5,
    "hehe": 1.8,
    "yippee": 2.3,
}

Mismatch = Literal["exuberant_to_upset_child", "gloomy_to_happy_child"]

_WORD = re.compile(r"[a-z']+")
_SYMPATHY = re.compile(r"\b(?:" + "|".join(re.escape(c) for c in SYMPATHY_CUES) + r")\b")
_NOT_SYMPATHY = re.compile(r"\boh no,?\s+(?:way|problem|worries)\b")
"""Cheerful uses of "oh no": "Oh no way, you won!", "Oh no problem"."""


@dataclass(frozen=True)
class ToneCheck:
    """The tone of a child's turn and of a fast response, and whether they clash."""

    child_compound: float
    """VADER compound of the child's turn, in [-1, 1]."""
    response_compound: float
    """VADER compound of the response, in [-1, 1]."""
    child_mood: str
    """"upset" (sad, scared, hurt), "happy", or "neutral"."""
    response_energy: str
    """"exuberant", "gloomy", or "neutral"."""
    mismatch: str | None
    """None when the tone fits; "exuberant_to_upset_child" or "gloomy_to_happy_child"."""


@functools.cache
def _analyzer() -> SentimentIntensityAnalyzer:
    """One VADER analyzer (reading its lexicon takes ~30 ms), with LEXICON_ADDITIONS."""
    analyzer = SentimentIntensityAnalyzer()
    analyzer.lexicon.update(LEXICON_ADDITIONS)
    return analyzer


MAX_SCORED_CHARS = 280
"""Only the first 280 characters of a text are scored (a fast response is at most 70,
a child's turn rarely passes 280)."""

MAX_SCORED_SYMBOLS = 8
"""Only the first 8 symbols (Unicode category So: emoji and the like) are scored; the
rest are dropped. VADER's emoji handling grows faster than the text: 500 emoji took
57 ms and 10,000 took 42 s on the 2-core machine."""


def _scored_part(text: str) -> str:
    kept: list[str] = []
    symbols = 0
    for ch in text[:MAX_SCORED_CHARS]:
        if unicodedata.category(ch) == "So":
            symbols += 1
            if symbols > MAX_SCORED_SYMBOLS:
                continue
        kept.append(ch)
    return "".join(kept)


@functools.lru_cache(maxsize=4096)
def compound(text: str) -> float:
    """VADER's compound score of `text` (its first MAX_SCORED_CHARS characters and
    MAX_SCORED_SYMBOLS symbols), in [-1, 1], with LEXICON_ADDITIONS. Cached: the guard
    scores one child's turn against several candidate and fallback phrases."""
    return float(_analyzer().polarity_scores(_scored_part(text))["compound"])


def child_mood(text: str, score: float) -> str:
    """ "upset", "happy" or "neutral" for a child's turn with compound `score`."""
    if score <= CHILD_UPSET_MAX:
        return "upset"
    if score >= CHILD_HAPPY_MIN or (score > VADER_NEUTRAL_MIN and "!" in text):
        return "happy"
    return "neutral"


def response_energy(text: str, score: float) -> str:
    """ "exuberant", "gloomy" or "neutral" for a response with compound `score`."""
    lowered = text.lower()
    if score >= RESPONSE_EXUBERANT_MIN and (
        "!" in text or not CELEBRATORY_WORDS.isdisjoint(_WORD.findall(lowered))
    ):
        return "exuberant"
    if score <= RESPONSE_GLOOMY_MAX or _SYMPATHY.search(_NOT_SYMPATHY.sub("", lowered)):
        return "gloomy"
    return "neutral"


def check_tone(user_turn: str, response: str) -> ToneCheck:
    """Rate the child's turn and the response, and name a tone mismatch.

    Args:
        user_turn: what the child said.
        response: the fast response.

    Returns:
        The two compounds, the child's mood, the response's energy, and the mismatch:
        "exuberant_to_upset_child" (upset child, exuberant response),
        "gloomy_to_happy_child" (happy child, gloomy response), or None.
    """
    child_score = compound(user_turn)
    response_score = compound(response)
    mood = child_mood(user_turn, child_score)
    energy = response_energy(response, response_score)
    mismatch: Mismatch | None = None
    if mood == "upset" and energy == "exuberant":
        mismatch = "exuberant_to_upset_child"
    elif mood == "happy" and energy == "gloomy":
        mismatch = "gloomy_to_happy_child"
    return ToneCheck(child_score, response_score, mood, energy, mismatch)


def tone_mismatch(user_turn: str, response: str) -> str | None:
    """The mismatch `check_tone` names, or None when the tone fits."""
    return check_tone(user_turn, response).mismatch


@dataclass(frozen=True)
class LabelledResponse:
    """One sample fast response and its expected flag."""

    text: str
    mismatch: bool
    why: str


@dataclass(frozen=True)
class ToneItem:
    """One child turn of the labelled set, with its sample responses."""

    id: str
    category: str
    """"sad", "scared", "proud", "neutral" or "silly"."""
    pika_turn: str | None
    user_turn: str
    responses: tuple[LabelledResponse, ...]


def read_tone_labels(labels: Path | None = None) -> list[ToneItem]:
    """Read the labelled set (JSON Lines, one child turn per line).

    Args:
        labels: the file; None for TONE_LABELS.

    Raises:
        OSError: the file cannot be read.
        ValueError: a line is not JSON or lacks a field (KeyError and TypeError are
            reported as ValueError with the line number).
    """
    path = TONE_LABELS if labels is None else labels
    items: list[ToneItem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(
                ToneItem(
                    id=str(row["id"]),
                    category=str(row["category"]),
                    pika_turn=row.get("pika_turn"),
                    user_turn=str(row["user_turn"]),
                    responses=tuple(
                        LabelledResponse(str(r["text"]), bool(r["mismatch"]), str(r["why"]))
                        for r in row["responses"]
                    ),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: bad tone label line: {exc!r}") from None
    return items


def evaluate_tone(labels: Path | None = None) -> PrecisionRecall:
    """Precision and recall of the mismatch flag over every labelled response.

    Args:
        labels: the labelled set; None for TONE_LABELS.

    Returns:
        Counts of (flagged, expected) over all sample responses of all child turns.
    """
    return PrecisionRecall.of(
        (tone_mismatch(item.user_turn, r.text) is not None, r.mismatch)
        for item in read_tone_labels(labels)
        for r in item.responses
    )
