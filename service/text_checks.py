"""Text checks for fast responses: one rule set for the guard, the data filters and rewards.

`failed_filters` runs every filter on one candidate fast response and names the ones it
fails; `select_candidate` picks the best passing candidate of a labeller's K. The data
pipeline (`fastresp data label`) uses both; the GRPO rewards and the service's guard can
call the same functions, so a model is trained and checked against one rule.

Filters, in check order (`FILTERS`), each configurable through `FilterLimits`:

==================  ==================================================================
name                fails when
==================  ==================================================================
length              fewer than ``min_words`` or more than ``max_words`` words (12), or
                    more than ``max_chars`` characters (70)
one_utterance       not one clean spoken line: the guard (`service.guard`) would change
                    it (several lines, a role prefix such as "Pika:", wrapping quotes,
                    a trailing half-sentence, control characters), or it is a list
                    item, has markup or emoji, or has more than ``max_sentences`` (2)
english             a letter outside the Latin script, or under ``min_english_ratio``
                    (0.7) of its words are English words
kid_safe            the profanity library flags it, it has one of
                    ``extra_unsafe_words``, or it echoes an unsafe word of the child
no_leak             it states content of the main response: a number (digits or number
                    words) from the main response, a run of ``leak_ngram`` (3) content
                    words from it, or ``leak_novel_words`` (2) of its content words;
                    numbers and words the child said are not counted
no_contradiction    it praises the answer ("Great job!", "Correct!", "You got it") while
                    the main response corrects the child (`corrects_child`: "Almost",
                    "Not quite", "Let's try again", "Close", "Good try", negation such
                    as "No, that's..." or "that's not it"; weak cues "Actually", "The
                    answer is", "careful", "mistake" count when the main response
                    praises nothing; with the child's turn, a different number than
                    the child's stated as the answer, "not <the child's number>", or a
                    negation after a bare "yes"). Effort praise ("Good try", "Great
                    thinking") is fine
no_question         it asks a question ("?") while the main response asks one
not_main_opening    it is a near-duplicate (``duplicate_ratio``, 0.75) of the main
                    response's first words or first sentence
==================  ==================================================================

When `main_response` is None (not known yet), no_leak, no_contradiction, no_question and
not_main_opening pass.

Libraries (both offline, pure Python, imported lazily on the first check so that
importing this module stays cheap for the gateway):

- ``glin-profanity`` (MIT, maintained): its English word list (the LDNOOBW list) with
  word boundaries and Unicode/obfuscation handling. A few innocent multi-word entries of
  that list ("big black", "girl on", ...) are ignored by default
  (``profanity_ignore``), and a few mild words the list lacks but a children's tutor
  should not say ("stupid", "shut up", ...) are added (``extra_unsafe_words``).
- ``pyspellchecker`` (MIT, maintained): its English word-frequency list (from
  OpenSubtitles) decides which words are English. Language identifiers are unreliable
  on three-word utterances; a word list is not.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import TYPE_CHECKING, Any

from service.guard import clean_fast_response, word_count

if TYPE_CHECKING:
    from spellchecker import SpellChecker


def _wordlist(text: str) -> list[str]:
    return text.split()


def word_set(text: str) -> frozenset[str]:
    """The whitespace-separated words of `text` as a set (for word-list constants)."""
    return frozenset(text.split())


FILTERS: tuple[str, ...] = (
    "length",
    "one_utterance",
    "english",
    "kid_safe",
    "no_leak",
    "no_contradiction",
    "no_question",
    "not_main_opening",
)
"""Filter names, in check order. `failed_filters` returns a subsequence of these."""


@dataclass(frozen=True)
class FilterLimits:
    """Every limit the filters use. All have defaults; all can be changed per call."""

    max_words: int = 12
    """length: most whitespace-separated words (issue 4: 12)."""
    max_chars: int = 70
    """length: most characters after stripping (issue 4: 70)."""
    min_words: int = 1
    """length: fewest words."""
    max_sentences: int = 2
    """one_utterance: most sentences ("Oh, nice! I like that." is two)."""
    min_english_ratio: float = 0.7
    """english: least share of words that are English words (or words of the turns)."""
    leak_ngram: int = 3
    """no_leak: a shared run of this many content words (not said by the child) is a leak."""
    leak_novel_words: int = 2
    """no_leak: this many distinct content words from the main response that the child
    did not say are a leak; 0 turns the rule off."""
    duplicate_ratio: float = 0.75
    """not_main_opening: word-sequence similarity (difflib ratio, 0-1) at or above which
    the candidate duplicates the main response's first words or first sentence."""
    extra_unsafe_words: tuple[str, ...] = (
        "stupid",
        "dumb",
        "idiot",
        "shut up",
        "damn",
        "hell",
        "crap",
        "loser",
        "kill",
        "killed",
        "hate you",
    )
    """kid_safe: words and phrases unsafe for a young child beyond the library's list
    (matched on word boundaries, case-insensitive, with a plural "s")."""
    profanity_ignore: tuple[str, ...] = (
        "big black",
        "girl on",
        "hard core",
        "jelly donut",
        "tied up",
        "taste my",
        "tongue in a",
        "tight white",
    )
    """kid_safe: entries of the library's list that are innocent in a children's lesson
    ("a big black dog", "the girl on the bike")."""
    interjections: tuple[str, ...] = (
        "yay",
        "aww",
        "awww",
        "ooh",
        "oooh",
        "yum",
        "yummy",
        "whee",
        "yippee",
        "hooray",
        "uh-oh",
        "woah",
        "whoa",
        "hmm",
        "mmm",
        "wow",
        "ahh",
        "ah",
        "oh",
        "ok",
        "okay",
    )
    """english: spoken interjections counted as English although word lists lack some."""

    def __post_init__(self) -> None:
        """Refuse limits no candidate could meet or that make no sense.

        Raises:
            ValueError: naming the field.
        """
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError(f"max_words must be >= min_words >= 1, got {self.max_words}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1, got {self.max_sentences}")
        if self.leak_ngram < 0 or self.leak_novel_words < 0:
            raise ValueError("leak_ngram and leak_novel_words must be >= 0 (0 turns a rule off)")
        for name in ("min_english_ratio", "duplicate_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")


DEFAULT_LIMITS = FilterLimits()
"""The default limits, for callers that want a module-level default argument."""


# ---------------------------------------------------------------------------
# Words and numbers

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W\d_]+)*")
_DIGITS = re.compile(r"\d+(?:[.,]\d+)*")

STOPWORDS: frozenset[str] = word_set(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just let me more most my myself no nor not now of off on once
    only or other our ours ourselves out over own same she should so some such than that
    the their theirs them themselves then there these they this those through to too under
    until up very was we were what when where which while who whom why will with would you
    your yours yourself yourselves also maybe really still well yes yeah ok okay oh ah um
    uh hmm hm mm mhm like got get go going gonna say said see look let's it's that's i'm
    you're we're they're he's she's there's what's here's isn't aren't wasn't weren't don't
    doesn't didn't can't won't wouldn't couldn't shouldn't i've you've we've i'll you'll
    we'll i'd you'd we'd one thing things something anything everything
    """
)
"""Function words (and fillers) that carry no content; based on common English stop lists."""

REACTION_WORDS: frozenset[str] = word_set(
    """
    great good nice awesome excellent wonderful perfect fantastic amazing super brilliant
    cool wow ooh yay hooray terrific lovely beautiful fun funny interesting exciting
    right correct exactly close almost quite true sure absolutely definitely totally
    try tried trying job work working start started thinking think thought idea question
    effort guess point track way done love like glad happy proud thank thanks sorry okay
    alright hi hello hey fine yep yup nope no not yet again
    """
)
"""Words of a reaction (praise, acknowledgement, feelings), not of the lesson's content:
a fast response may share them with the main response without leaking anything."""

_UNITS = {
    w: i
    for i, w in enumerate(
        _wordlist(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen"
        )
    )
}
_TENS = {
    w: 10 * i
    for i, w in enumerate(_wordlist("twenty thirty forty fifty sixty seventy eighty ninety"), 2)
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}
_NUMBER_WORDS = {**_UNITS, **_TENS, **_SCALES}
_PRONOUN_ONE_AFTER = word_set(
    "that this the a good nice great which each every no any some another other right last "
    "first next big little new old only same wrong tricky hard easy fun cool"
)
"""A lone "one" after these words is a pronoun ("good one!", "that one"), not a number."""

_FOREIGN_WORDS = word_set(
    "el los las es est und der das ist ich les et je muy bien que por para hola gracias "
    "bonjour merci oui sehr gut nicht nein sí qué très amigo casa"
)
"""Frequent Spanish/French/German words that the English word list also holds (it is
built from subtitles); they do not count as English."""


def _words(text: str) -> list[str]:
    """Lower-case words of `text` (letters, inner apostrophes kept, digits dropped)."""
    return _WORD.findall(text.translate(_APOSTROPHES).lower())


def _tokens(text: str) -> list[str]:
    """Lower-case words and digit runs of `text`, for word-sequence comparisons."""
    return _TOKEN.findall(text.translate(_APOSTROPHES).lower())


def word_tokens(text: str) -> list[str]:
    """Lower-case words and digit runs of `text`, punctuation dropped ("Ooh, 12 cats!" ->
    ["ooh", "12", "cats"]): the unit of n-gram and opener statistics."""
    return _tokens(text)


def opener(text: str, words: int = 2) -> str:
    """The first `words` word tokens of `text`, lower-cased, punctuation dropped, joined by
    one space ("Great try!  Let's see" -> "great try"): what makes fast responses sound
    canned when it repeats. "" for a text without words."""
    return " ".join(_tokens(text)[:words])


def _stem(word: str) -> str:
    """A crude singular: "trucks" -> "truck", "berries" -> "berry", "'s" dropped."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def content_words(text: str) -> list[str]:
    """Stemmed words of `text` that carry content: not stop words, not reaction words.

    Number words are dropped too (numbers are compared by value, see `numbers`).
    """
    out = []
    for word in _words(text):
        if word in STOPWORDS or word in REACTION_WORDS or word in _NUMBER_WORDS:
            continue
        if len(word) < 2:
            continue
        out.append(_stem(word))
    return out


def numbers(text: str) -> set[float]:
    """The numbers `text` states, written as digits ("12", "1,000", "3.5") or words
    ("twelve", "twenty-one", "one hundred and five").

    A lone "one" after a determiner or adjective ("good one", "that one") is a pronoun
    and is not counted.
    """
    text = text.translate(_APOSTROPHES).lower()
    found: set[float] = set()
    for match in _DIGITS.finditer(text):
        raw = match.group()
        if "," in raw and re.fullmatch(r"\d{1,3}(?:,\d{3})+", raw):
            raw = raw.replace(",", "")
        for part in raw.split(","):
            try:
                found.add(float(part))
            except ValueError:
                continue
    for segment in re.split(r"[,;:.!?()\"]", text):
        found |= _number_words(re.findall(r"[a-z]+", segment))
    return found


def _number_words(words: list[str]) -> set[float]:
    """Values of the number-word runs in `words` ("twenty one" is 21, "one two" is 1 and 2)."""
    found: set[float] = set()
    total, current, started = 0, 0, False

    def flush() -> None:
        nonlocal total, current, started
        if started:
            found.add(float(total + current))
        total, current, started = 0, 0, False

    for i, word in enumerate(words):
        if word == "and" and started and i + 1 < len(words) and words[i + 1] in _NUMBER_WORDS:
            continue
        if word not in _NUMBER_WORDS:
            flush()
            continue
        pronoun = (
            word == "one"
            and not started
            and i > 0
            and words[i - 1] in _PRONOUN_ONE_AFTER
            and (i + 1 >= len(words) or words[i + 1] not in _NUMBER_WORDS)
        )
        if pronoun:
            continue  # "good one", "that one"
        if word in _UNITS:
            if started and current % 100 not in {0, 20, 30, 40, 50, 60, 70, 80, 90}:
                flush()  # "one two": two numbers
            elif started and current % 100 >= 20 and _UNITS[word] >= 10:
                flush()  # "twenty twelve"
            current += _UNITS[word]
        elif word in _TENS:
            if started and current % 100 != 0:
                flush()
            current += _TENS[word]
        elif word == "hundred":
            if started and current % 1000 >= 100:
                flush()
            current = max(current, 1) * 100
        else:
            total += max(current, 1) * _SCALES[word]
            current = 0
        started = True
    flush()
    return found


def _ngrams(seq: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)} if n > 0 else set()


# ---------------------------------------------------------------------------
# Cues

_PRAISE = re.compile(
    r"""
    \b(?:great|good|awesome|nice|excellent|amazing|fantastic|super|wonderful|terrific|
         brilliant)\s+(?:job|work|answer)\b
    | \bwell\s+done\b | \byou\s+got\s+it\b | \byou\s+did\s+it\b | \bnailed\s+it\b
    | \bspot\s+on\b | \bbingo\b | \bexactly\b | \bperfect\b | \byay\b | \bhooray\b
    | (?<!not\s)(?<!isn't\s)\bcorrect\b | \bthat's\s+it\b | \bthat\s+is\s+it\b
    | \b(?:that's|that\s+is|you're|you\s+are|it's|it\s+is)\s+(?:so\s+|exactly\s+|totally\s+|
         absolutely\s+|all\s+)?right\b
    | \bright\s+answer\b | ^\W*right\b | ^\W*yes\b | \byes\s*[!.]
    | \b(?:great|awesome|excellent|amazing|wonderful|fantastic|brilliant|terrific|good|nice)
         \b(?!\s+(?:try|first\s+try|thinking|question|idea|effort|start|guess|thought|
            work\s+on|to\s+))
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""Praise of the child's answer. Effort praise ("Good try", "Great thinking", "Nice
question") is not here: it is kind whether or not the answer was right."""

_STRONG_CORRECTION = re.compile(
    r"""
    \balmost\b | \bnot\s+quite\b | \bnot\s+yet\b | \btry\s+(?:it\s+|that\s+)?again\b
    | \bnot\s+exactly\b | \bincorrect\b | \bnot\s+(?:be\s+)?(?:the\s+)?(?:correct|right)\b
    | \b(?:isn't|aren't|wasn't)\s+(?:quite\s+)?(?:the\s+)?(?:correct|right)\b
    | (?<!not\s)\bwrong\b | \boops\b | \bnope\b
    | ^\W*no\b(?![,.!]?\s+(?:problem|worries|doubt|kidding|no\b|yes\b
         |(?:that's|that\s+is|you're|you\s+are)\s+(?:right|correct|true|it)\b))
    | \b(?:so|very|really|pretty|super)\s+close\b
    | \b(?:you're|you\s+are|that's|that\s+is|it's|it\s+is|you\s+were|was)\s+
         (?:so\s+|very\s+|really\s+)?close\b
    | ^\W*(?:\w+\s+)?close\b
    | \b(?:nice|good|great)\s+(?:first\s+)?try\b
    | \blet's\s+(?:check|double[\s-]check|recheck|look\s+again|review)\b
    | \bdouble[\s-]check\b | \bare\s+you\s+sure\b | \bwould\s+be\s+correct\s+if\b
    | (?<!\boh\s)(?<!\boh,\s)\bno[,.!]?\s+(?:that\s+isn't|not)\b
    | (?<!\boh\s)(?<!\boh,\s)\bno[,.!]?\s+(?:that's|that\s+is)\s+
         (?!(?:right|correct|true|it|fine|okay|ok|good|great|perfect)\b)
    | \b(?:that's|that\s+is|it's|it\s+is)\s+not\s+(?:quite\s+)?(?:it|right|correct|true)\b
    | \b(?:that|this|it)\s+(?:isn't|is\s+not)\s+it\b
    | \bdon't\s+think\s+so\b
    | \b(?:but|however),?\s+(?:we're|we\s+are)\s+looking\s+for\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""Correction cues that count whatever else the main response says."""
_WEAK_CORRECTION = re.compile(
    r"\bactually\b|\bthe\s+(?:correct\s+|right\s+)?answer\s+is\b|\bmistake\b|\bcareful\b",
    re.IGNORECASE,
)
"""Correction cues that count only when the main response praises nothing."""

_NUMBER_TOKEN = (
    r"(?:\d+(?:[.,/]\d+)*"
    r"|(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|"
    r"fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|"
    r"seventy|eighty|ninety|hundred|thousand|million)(?:[\s-]+(?:and\s+)?(?:one|two|three|"
    r"four|five|six|seven|eight|nine|hundred|thousand|million))*)"
)
_STATED_NUMBER = re.compile(
    rf"""
    (?:\b(?:is|are|was|were|be|equals?|makes?)\s+|=\s*|\bthere\s+(?:is|are)\s+)
        (?:about\s+|only\s+|just\s+|exactly\s+|also\s+)?(?P<after>{_NUMBER_TOKEN})\b
    | \b(?P<before>{_NUMBER_TOKEN})\s+(?:is|are)\b
    """,
    re.IGNORECASE | re.VERBOSE,
)
"""A number in an answer position: "an hour is 60 minutes", "there are 3 groups", "9 x 9
= 81", "3.14 is the value of pi"."""
_NOT_NUMBER = re.compile(rf"\bnot\s+(?P<number>{_NUMBER_TOKEN})\b", re.IGNORECASE)
"""A number rejected by name: "1/4 of 200 is 50, not 5"."""
_BARE_YES = re.compile(
    r"^\W*(?:y+e+s+|yea+h*|yep|yup|ya+|sure|ok(?:ay)?)(?:\s+(?:sir|ma'?a?m|mam))?\W*$",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"\b(?:not|no|never)\b|n't\b", re.IGNORECASE)
_QUESTION = re.compile(
    r"^\W*(?:how|what|why|when|where|which|who|do|does|did|can|could|should|would|will|are)\b"
    r".*\?\W*$",
    re.IGNORECASE | re.DOTALL,
)
"""A question of the child's ("How are you going to get one half?"), not an answer; a
tentative answer ("9?", "is it 8?") is not one."""


def _sentences(text: str) -> list[str]:
    """`text` split after each run of ., ! or ? (each piece keeps its end mark)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def _stated_numbers(text: str) -> set[float]:
    """Numbers `text` states in an answer position (`_STATED_NUMBER`) outside questions."""
    found: set[float] = set()
    for sentence in _sentences(text):
        if sentence.endswith("?"):
            continue
        for match in _STATED_NUMBER.finditer(sentence):
            found |= numbers(match.group("after") or match.group("before"))
    return found


def _corrects_by_user_turn(text: str, user_turn: str, praised: bool) -> bool:
    """The cues that need the child's turn (see `corrects_child`)."""
    said = set() if _QUESTION.match(user_turn) else numbers(user_turn)
    if said:
        # the child's number rejected by name; not when the child said "not N" too
        said_not = {n for m in _NOT_NUMBER.finditer(user_turn) for n in numbers(m.group("number"))}
        if any(numbers(m.group("number")) & (said - said_not) for m in _NOT_NUMBER.finditer(text)):
            return True  # "50, not 5"
        if not praised and not (numbers(text) & said) and _stated_numbers(text):
            return True  # "There are 60 minutes in an hour." after "44"
    if not praised and _BARE_YES.match(user_turn):
        first = _sentences(text)[:1]
        return bool(first and _NEGATION.search(first[0]))  # "yes" -> "They do not ..."
    return False


def corrects_child(main_response: str, user_turn: str | None = None) -> bool:
    """True when `main_response` tells the child their answer is wrong or not finished.

    Cues (case-insensitive, curly apostrophes read as straight ones):

    - strong, always a correction: "almost", "not quite", "not yet", "try again",
      "incorrect", "not (be) the correct/right", "wrong", "oops", a leading "No" (not
      "No problem/worries/doubt/kidding", "No, no", "No! Yes", "No, you're right"),
      "nope", "so/very close", "you're close", "good/great/nice (first) try",
      "let's check", "double-check", "are you sure", "would be correct if", negation
      ("no, that's ...", "that's not it/right/correct/true", "that isn't it",
      "don't think so") and "but we're looking for";
    - weak, a correction only when the main response praises nothing (`praises_answer`)
      and, with `user_turn`, names no number but the child's: "actually", "the
      (correct) answer is", "mistake", "careful" - so "Yes! The answer is 12." and "The
      answer is 120." after "120" are not corrections;
    - with `user_turn` only:
        - the child's number rejected by name ("50, not 5" after "5"), always;
        - a different number than the child's: the child said a number, the main
          response states another in an answer position outside a question ("There
          are 60 minutes in an hour." after "44"; "is N", "are N", "= N", "there are
          N", "N is"), never repeats any of the child's numbers, and praises nothing.
          "30? Let's count: 10, 20, 30" repeats the child's 30, so it is no
          correction; numbers asked about ("What is 7 x 5?") do not count;
        - negation of a bare "yes": the child said only "yes" (or "yeah", "ok", ...)
          and the first sentence of the main response, which praises nothing, has
          "not", "no", "never" or "n't" ("These shapes do not have symmetry.").

    Args:
        main_response: Pika's main answer.
        user_turn: what the child said; None keeps to the cues of the main response
            alone (the call of the first version).

    Returns:
        Whether the main response corrects the child. Measured against 59
        hand-labelled Bridge items (`adapters.signals.contradiction`).
    """
    text = main_response.translate(_APOSTROPHES)
    if _STRONG_CORRECTION.search(text):
        return True
    praised = bool(_PRAISE.search(text))
    if _WEAK_CORRECTION.search(text) and not praised:
        # "The answer is 120." after "120" confirms the child's number
        said = numbers(user_turn) if user_turn is not None else set()
        named = numbers(text)
        if not (said and named and named <= said):
            return True
    if user_turn is None:
        return False
    return _corrects_by_user_turn(text, user_turn.translate(_APOSTROPHES), praised)


def praises_answer(text: str) -> bool:
    """True when `text` praises the answer ("Great job!", "Correct!", "You got it")."""
    return bool(_PRAISE.search(text.translate(_APOSTROPHES)))


# ---------------------------------------------------------------------------
# Libraries (lazy, cached)


@functools.lru_cache(maxsize=8)
def _profanity_filter(ignore: tuple[str, ...]) -> Any:
    """glin-profanity's English filter. Its leetspeak mode stays off: it reads "85" as
    "bs", and lessons are full of numbers."""
    from glin_profanity import Filter  # type: ignore[import-untyped]

    return Filter({"languages": ["english"], "ignore_words": list(ignore)})


@functools.lru_cache(maxsize=1)
def _english() -> SpellChecker:
    from spellchecker import SpellChecker

    return SpellChecker(language="en", distance=1)


@functools.lru_cache(maxsize=8)
def _extra_unsafe_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    if not words:
        return None
    alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)
    return re.compile(rf"\b(?:{alternatives})s?\b", re.IGNORECASE)


def unsafe_words(text: str, limits: FilterLimits = FilterLimits()) -> list[str]:
    """The unsafe words and phrases in `text`, lower-cased (empty when it is kid-safe)."""
    found: list[str] = []
    result = _profanity_filter(limits.profanity_ignore).check_profanity(text)
    found.extend(str(w).lower() for w in result.get("profane_words", []))
    pattern = _extra_unsafe_pattern(limits.extra_unsafe_words)
    if pattern is not None:
        found.extend(m.group().lower() for m in pattern.finditer(text))
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------
# Filters

_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022+]\s|\d+[.)]\s|[a-z][.)]\s)", re.IGNORECASE)
_MARKUP = re.compile(r"[*#_`\[\]{}<>|~\\/@=^]")
_SENTENCE_END = re.compile(r"[.!?\u2026]+(?=\s|$)")


def _is_emoji_or_symbol(ch: str) -> bool:
    return unicodedata.category(ch) in {"So", "Sk", "Cs", "Co"} or ord(ch) > 0xFFFF


def _check_length(candidate: str, limits: FilterLimits) -> bool:
    text = candidate.strip()
    words = word_count(text)
    return limits.min_words <= words <= limits.max_words and len(text) <= limits.max_chars


def _check_one_utterance(candidate: str, limits: FilterLimits) -> bool:
    text = candidate.strip()
    if not text or "\n" in text or "\r" in text:
        return False
    if _LIST_ITEM.match(text) or _MARKUP.search(text):
        return False
    if any(_is_emoji_or_symbol(ch) for ch in text):
        return False
    cleaned = clean_fast_response(text, max_words=10**6).text
    if cleaned is None or cleaned != " ".join(text.split()):
        return False
    sentences = len(_SENTENCE_END.findall(text))
    return max(sentences, 1) <= limits.max_sentences


def _is_latin(ch: str) -> bool:
    return not ch.isalpha() or unicodedata.name(ch, "").startswith("LATIN")


def _check_english(
    candidate: str, user_turn: str, main_response: str | None, limits: FilterLimits
) -> bool:
    if not all(_is_latin(ch) for ch in candidate):
        return False
    words = _words(candidate)
    if not words:
        return False
    context = set(_words(user_turn)) | set(_words(main_response or ""))
    interjections = set(limits.interjections)
    vocabulary = _english()
    known = 0
    for word in words:
        if word in _FOREIGN_WORDS:
            continue
        squeezed = re.sub(r"(.)\1{2,}", r"\1\1", word)  # "ooooh" -> "ooh"
        parts = [p for p in word.split("'") if p]
        if (
            word in context
            or word in interjections
            or squeezed in interjections
            or word in vocabulary
            or squeezed in vocabulary
            or (parts and parts[0] in vocabulary)  # "dino's"
        ):
            known += 1
    return known / len(words) >= limits.min_english_ratio


def _check_kid_safe(candidate: str, user_turn: str, limits: FilterLimits) -> bool:
    if unsafe_words(candidate, limits):
        return False
    candidate_words = " " + " ".join(_tokens(candidate)) + " "
    for word in unsafe_words(user_turn, limits):
        needle = " ".join(_tokens(word))
        if needle and f" {needle} " in candidate_words:
            return False
    return True


def _check_no_leak(candidate: str, user_turn: str, main: str, limits: FilterLimits) -> bool:
    if (numbers(candidate) & numbers(main)) - numbers(user_turn):
        return False
    cand, said, answer = content_words(candidate), content_words(user_turn), content_words(main)
    n = limits.leak_ngram
    if n > 0 and (_ngrams(cand, n) & _ngrams(answer, n)) - _ngrams(said, n):
        return False
    novel = (set(cand) & set(answer)) - set(said)
    return not (limits.leak_novel_words > 0 and len(novel) >= limits.leak_novel_words)


def _check_no_contradiction(candidate: str, main: str, user_turn: str) -> bool:
    return not (praises_answer(candidate) and corrects_child(main, user_turn))


def _check_no_question(candidate: str, main: str) -> bool:
    return not ("?" in main and "?" in candidate)


def _first_sentence(text: str) -> str:
    match = _SENTENCE_END.search(text)
    return text[: match.end()] if match else text


def _check_not_main_opening(candidate: str, main: str, limits: FilterLimits) -> bool:
    cand = _tokens(candidate)
    if not cand:
        return True
    main_tokens = _tokens(main)
    for other in (main_tokens[: len(cand)], _tokens(_first_sentence(main.strip()))):
        if other and SequenceMatcher(None, cand, other).ratio() >= limits.duplicate_ratio:
            return False
    return True


def failed_filters(
    candidate: str,
    *,
    user_turn: str,
    main_response: str | None,
    limits: FilterLimits = FilterLimits(),
) -> list[str]:
    """The names of the filters `candidate` fails, in `FILTERS` order; [] when it passes.

    Args:
        candidate: one proposed fast response, as the labeller gave it.
        user_turn: what the child said.
        main_response: Pika's main answer, or None when it is not known yet (then
            no_leak, no_contradiction, no_question and not_main_opening pass).
        limits: the limits (see `FilterLimits`).

    The first call loads the profanity list and the English word list (about half a
    second); later calls take about a millisecond.
    """
    checks: dict[str, Callable[[], bool]] = {
        "length": lambda: _check_length(candidate, limits),
        "one_utterance": lambda: _check_one_utterance(candidate, limits),
        "english": lambda: _check_english(candidate, user_turn, main_response, limits),
        "kid_safe": lambda: _check_kid_safe(candidate, user_turn, limits),
    }
    if main_response is not None:
        main = main_response
        checks |= {
            "no_leak": lambda: _check_no_leak(candidate, user_turn, main, limits),
            "no_contradiction": lambda: _check_no_contradiction(candidate, main, user_turn),
            "no_question": lambda: _check_no_question(candidate, main),
            "not_main_opening": lambda: _check_not_main_opening(candidate, main, limits),
        }
    return [name for name in FILTERS if name in checks and not checks[name]()]


@dataclass(frozen=True)
class Selection:
    """The outcome of `select_candidate`."""

    best: str | None
    """The chosen candidate (stripped), or None when none passed."""
    alternatives: list[str]
    """The other passing candidates, best first (duplicates of a kept one dropped)."""
    rejected: list[tuple[str, list[str]]]
    """(candidate text, names of the filters it failed), in input order."""


def picks_up_child(candidate: str, user_turn: str) -> bool:
    """True when `candidate` reuses a content word of the child's turn (uptake)."""
    return bool(set(content_words(candidate)) & set(content_words(user_turn)))


def select_candidate(
    candidates: Sequence[str],
    *,
    user_turn: str,
    main_response: str | None,
    limits: FilterLimits = FilterLimits(),
) -> Selection:
    """Filter `candidates` and choose the best one that passes.

    Rule: among the passing candidates, those that pick up a content word of the
    child's turn (`picks_up_child`, e.g. "Red, like a fire truck!" after "red") come
    first, since reacting to what the child actually said is the point of a fast
    response; ties keep the labeller's order. The first is `best`, the rest are
    `alternatives`. Candidates are stripped of surrounding whitespace; a passing
    candidate equal (ignoring case and whitespace) to an earlier one is dropped.
    """
    passing: list[str] = []
    rejected: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for raw in candidates:
        text = raw.strip()
        failed = failed_filters(
            text, user_turn=user_turn, main_response=main_response, limits=limits
        )
        if failed:
            rejected.append((text, failed))
            continue
        key = " ".join(text.lower().split())
        if key in seen:
            continue
        seen.add(key)
        passing.append(text)
    ranked = sorted(passing, key=lambda c: not picks_up_child(c, user_turn))
    return Selection(best=ranked[0] if ranked else None, alternatives=ranked[1:], rejected=rejected)
