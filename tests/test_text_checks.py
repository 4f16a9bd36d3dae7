"""Tests of service.text_checks: every filter passes and fails on hand-written examples.

The expected outcomes were decided by reading each example against the rule in the
issue (a child's tutor should not say it, or may), not by running the code.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from service.text_checks import (
    FILTERS,
    FilterLimits,
    Selection,
    corrects_child,
    failed_filters,
    numbers,
    select_candidate,
)

CHILD = "I ate pho with my dad"
MAIN = "Pho is a noodle soup from Vietnam. Can you say noodle soup?"


def fails(
    candidate: str, *, user_turn: str = CHILD, main: str | None = MAIN, **limits: object
) -> list[str]:
    return failed_filters(
        candidate, user_turn=user_turn, main_response=main, limits=replace(FilterLimits(), **limits)
    )


def test_filter_names_and_order() -> None:
    assert FILTERS == (
        "length",
        "one_utterance",
        "english",
        "kid_safe",
        "no_leak",
        "no_contradiction",
        "no_question",
        "not_main_opening",
    )


def test_a_good_fast_response_passes_everything() -> None:
    assert fails("Ooh, pho with your dad, yum!") == []
    assert fails("Mmm, I love that!") == []


# --- length -------------------------------------------------------------------------


def test_length_words_and_characters() -> None:
    twelve = "Wow, you and your dad ate a big warm bowl of pho!"  # 12 words, 51 chars
    thirteen = "Wow, you and your dad ate a big warm bowl of pho today!"
    assert "length" not in fails(twelve)
    assert "length" in fails(thirteen)
    long_words = "Extraordinarily scrumptious, unbelievably delightful, marvellously wonderful pho!"
    assert len(long_words) > 70 and len(long_words.split()) <= 12
    assert "length" in fails(long_words)


@pytest.mark.parametrize(
    "bad",
    [{"max_words": 0}, {"max_chars": 0}, {"min_english_ratio": 1.5}, {"leak_ngram": -1}],
)
def test_limits_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        replace(FilterLimits(), **bad)


def test_length_limits_are_configurable() -> None:
    assert "length" in fails("Ooh, pho with your dad, yum!", max_words=3)
    thirteen = "Wow, you and your dad ate a big warm bowl of pho today!"
    assert "length" not in fails(thirteen, max_words=13)
    assert "length" in fails("Ooh, pho!", max_chars=5)


# --- one utterance ------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate",
    [
        "Wow!\nNice pho!",  # two lines
        "Pika: Ooh, pho!",  # role prefix
        '"Ooh, pho!"',  # wrapped in quotes
        "- Ooh, pho!",  # a list item
        "1. Ooh, pho!",
        "**Ooh**, pho!",  # markup
        "Ooh, pho! \U0001f35c",  # emoji
        "Ooh! Pho! With your dad!",  # three sentences
        "Ooh, pho! And then we",  # trailing half-sentence
    ],
)
def test_one_utterance_fails(candidate: str) -> None:
    assert "one_utterance" in fails(candidate)


def test_one_utterance_passes_and_sentence_limit_is_configurable() -> None:
    assert "one_utterance" not in fails("Ooh! Pho with your dad!")
    assert "one_utterance" not in fails("Ooh! Pho! With your dad!", max_sentences=3)


# --- english --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate", ["¡Muy bien, amigo!", "Très bien, mon ami!", "Sehr gut, danke!", "哇, 好吃!"]
)
def test_english_fails_on_other_languages(candidate: str) -> None:
    assert "english" in fails(candidate)


def test_english_passes_kid_words_and_the_childs_own_words() -> None:
    assert "english" not in fails("Yay, pho!")  # "pho" is the child's word
    assert "english" not in fails("Ooooh, yummy!")
    assert "english" in fails("Ooh, bánh mì!")  # not said by the child, not English
    assert "english" not in fails("Ooh, bánh mì!", user_turn="I ate bánh mì")


# --- kid safe -------------------------------------------------------------------------


def test_kid_safe_fails_on_profanity_from_the_library() -> None:
    assert "kid_safe" in fails("Oh shit, pho!")
    assert "kid_safe" in fails("Oh sh!t, pho!")


def test_kid_safe_fails_on_mild_unkind_words() -> None:
    assert "kid_safe" in fails("Pho is for losers!", main=None)
    assert "kid_safe" in fails("Shut up, that's cool!", main=None)


def test_kid_safe_does_not_echo_the_childs_unsafe_word() -> None:
    child = "my brother is a stupid doofus"
    assert "kid_safe" in fails("A stupid doofus? Oh no!", user_turn=child, main=None)
    assert "kid_safe" not in fails("Oh no, brothers can be tricky!", user_turn=child, main=None)
    # "doofus" is unsafe only when configured so; then echoing it is refused too.
    assert "kid_safe" not in fails("A doofus? Oh no!", user_turn=child, main=None)
    assert "kid_safe" in fails(
        "A doofus? Oh no!", user_turn=child, main=None, extra_unsafe_words=("doofus",)
    )


def test_kid_safe_ignore_list_is_configurable() -> None:
    child = "I saw a big black dog"
    assert "kid_safe" not in fails("Wow, a big black dog!", user_turn=child, main=None)
    assert "kid_safe" in fails(
        "Wow, a big black dog!", user_turn=child, main=None, profanity_ignore=()
    )


# --- no leak --------------------------------------------------------------------------

WRONG = "It's 11"
CORRECTION = "Not quite. 7 plus 5 is 12. Let's count together!"


@pytest.mark.parametrize("candidate", ["Hmm, is it 12?", "Hmm, twelve maybe!", "Ooh, it's 12!"])
def test_no_leak_fails_when_saying_the_answer_number(candidate: str) -> None:
    assert "no_leak" in fails(candidate, user_turn=WRONG, main=CORRECTION)


def test_no_leak_number_words_in_the_main_response_match_digits() -> None:
    main = "Yes! There are fifteen apples in the basket."
    assert "no_leak" in fails("Ooh, 15!", user_turn="I counted them", main=main)
    assert "no_leak" not in fails("Ooh, you counted!", user_turn="I counted them", main=main)


def test_no_leak_allows_the_childs_own_number() -> None:
    assert "no_leak" not in fails("You said eleven, hmm!", user_turn=WRONG, main=CORRECTION)
    assert "no_leak" not in fails("Let's see!", user_turn=WRONG, main=CORRECTION)


def test_no_leak_content_words_of_the_main_response() -> None:
    # a run of three content words from the main response
    assert "no_leak" in fails("A noodle soup from Vietnam!")
    # two content words the child never said
    assert "no_leak" in fails("Ooh, noodle soup!")
    assert "no_leak" not in fails("Ooh, noodle soup!", leak_novel_words=0)
    assert "no_leak" in fails("Ooh, noodle soup!", leak_novel_words=0, leak_ngram=2)
    # the child's own words are not a leak
    assert "no_leak" not in fails("Ooh, pho with your dad!")


def test_numbers_reads_digits_and_words() -> None:
    assert numbers("twenty-one") == {21.0}
    assert numbers("one hundred and five apples") == {105.0}
    assert numbers("1,000 and 3.5") == {1000.0, 3.5}
    assert numbers("one, two, three") == {1.0, 2.0, 3.0}
    assert numbers("Good one! That one is red.") == set()
    assert numbers("I have one cat") == {1.0}


# --- no contradiction -----------------------------------------------------------------

ALMOST = "Almost! Let's count the apples again together."


@pytest.mark.parametrize(
    "candidate", ["Great job!", "Correct!", "You got it!", "Yes, that's right!"]
)
def test_no_contradiction_fails_on_praise_before_a_correction(candidate: str) -> None:
    assert "no_contradiction" in fails(candidate, user_turn="ten", main=ALMOST)


def test_no_contradiction_allows_effort_praise_and_praise_before_praise() -> None:
    assert "no_contradiction" not in fails("Good try, let's see!", user_turn="ten", main=ALMOST)
    assert "no_contradiction" not in fails("Hmm, let me see!", user_turn="ten", main=ALMOST)
    assert "no_contradiction" not in fails(
        "Great job!", user_turn="ten", main="Yes! Ten apples. Now count the pears."
    )


@pytest.mark.parametrize(
    ("main", "corrects"),
    [
        ("Not quite. It is 12.", True),
        ("Close! Try counting again.", True),
        ("Actually, a whale is a mammal.", True),
        ("The answer is 12.", True),
        ("Let's try again together.", True),
        ("Yes! The answer is 12.", False),
        ("Great job! What is 3 plus 4?", False),
        ("Let's close our books now.", False),
        # review of issue 4: "isn't right" was no cue, so "Great job!" passed before it
        ("Hmm, that isn't right. What is 2 plus 2?", True),
        ("That isn\u2019t quite correct. Count again.", True),
        ("Yes, that's right! It isn't hard, is it?", False),
    ],
)
def test_correction_cues(main: str, corrects: bool) -> None:
    assert corrects_child(main) is corrects


# --- no question ----------------------------------------------------------------------


def test_no_question_when_the_main_response_asks_one() -> None:
    assert "no_question" in fails("Do you like pho?")
    assert "no_question" not in fails("Yum, pho!")
    assert "no_question" not in fails("Was it yummy?", main="Pho is a noodle soup.")


# --- not the main response's opening --------------------------------------------------


def test_not_main_opening() -> None:
    main = "Good thinking. What did you do first?"
    assert "not_main_opening" in fails("Good thinking!", user_turn="I added them", main=main)
    assert "not_main_opening" not in fails("Ooh, let me see!", user_turn="I added them", main=main)
    red = "Red is my favorite color too! What else is red?"
    assert "not_main_opening" in fails("Red is my favorite!", user_turn="red", main=red)
    # "Red is the best!" shares "red is" with the opening: half the words
    assert "not_main_opening" not in fails("Red is the best!", user_turn="red", main=red)
    assert "not_main_opening" in fails(
        "Red is the best!", user_turn="red", main=red, duplicate_ratio=0.5
    )


# --- no main response yet -------------------------------------------------------------


def test_without_a_main_response_only_the_text_filters_apply() -> None:
    assert fails("Do you like pho?", main=None) == []
    assert fails("Great job!", main=None) == []
    assert fails("Great job!\nBye", main=None) == ["one_utterance"]


def test_several_failures_are_all_named_in_order() -> None:
    assert fails("Great job! 12!", user_turn=WRONG, main="Not quite, it's 12.") == [
        "no_leak",
        "no_contradiction",
    ]


# --- select_candidate -----------------------------------------------------------------


def test_select_candidate_prefers_uptake_then_teacher_order() -> None:
    selection = select_candidate(
        [
            "Great job!",
            "Hmm, let me think!",
            "  Ooh, ten red apples!  ",
            "Hmm, let me think!",
            "Twelve?",
        ],
        user_turn="I have ten red apples",
        main_response="Almost! You have twelve apples. Can you count again?",
    )
    assert selection == Selection(
        best="Ooh, ten red apples!",
        alternatives=["Hmm, let me think!"],
        rejected=[("Great job!", ["no_contradiction"]), ("Twelve?", ["no_leak", "no_question"])],
    )


def test_select_candidate_keeps_teacher_order_without_uptake() -> None:
    selection = select_candidate(
        ["Hmm, let me see!", "Ooh, interesting!"], user_turn="blue", main_response=None
    )
    assert selection.best == "Hmm, let me see!"
    assert selection.alternatives == ["Ooh, interesting!"]


def test_select_candidate_none_passes() -> None:
    selection = select_candidate(["Great job!"], user_turn="ten", main_response=ALMOST)
    assert selection.best is None and selection.alternatives == []
    assert selection.rejected == [("Great job!", ["no_contradiction"])]


def test_importing_text_checks_does_not_load_the_word_lists() -> None:
    code = (
        "import sys, service.text_checks; "
        "print('glin_profanity' in sys.modules, 'spellchecker' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
