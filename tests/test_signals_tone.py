"""The tone-fit signal (`adapters.signals.tone`) against a labelled set of child turns.

Provenance of `tests/data/tone_labels.jsonl`: an agent (the helper that built the
signal) wrote the 47 child turns, as a young English learner would say them, and the
101 sample fast responses, and labelled each response's expected flag with a reason,
before choosing the thresholds. They are not human ratings. The label question was:
"is this an exuberant reply to a clearly sad, scared or hurt child, or a gloomy reply
to a clearly happy child?" An empathetic reply to a sad child is labelled a fit, and
so is an excited reply to a neutral child.

Measured (`evaluate_tone()`, vaderSentiment 3.3.2): precision 0.93 (27/29), recall
0.79 (27/34), n 101. The thresholds below sit a little under those figures. The misses
are VADER's limits, left as they are: "My best friend moved away" scores +0.81 (from
"best friend"), "A big dog barked at me" 0.0, "I lost my tooth! The tooth fairy came!"
-0.44.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from adapters.signals.scoring import PrecisionRecall
from adapters.signals.tone import (
    TONE_LABELS,
    check_tone,
    evaluate_tone,
    read_tone_labels,
    tone_mismatch,
)

#: Measured 0.93 (27/29) on the labelled set; one more false flag gives 0.90.
MIN_PRECISION = 0.88
#: Measured 0.79 (27/34); one more miss gives 0.76.
MIN_RECALL = 0.74

CATEGORIES = {"sad", "scared", "proud", "neutral", "silly"}


def test_the_labelled_set_has_the_shape_the_issue_asks_for() -> None:
    rows = [json.loads(line) for line in TONE_LABELS.read_text().splitlines() if line.strip()]
    assert len(rows) >= 40
    assert len({row["id"] for row in rows}) == len(rows)
    per_category = Counter(row["category"] for row in rows)
    assert set(per_category) == CATEGORIES
    assert min(per_category.values()) >= 8
    for row in rows:
        assert set(row) == {"id", "category", "pika_turn", "user_turn", "responses"}
        assert row["user_turn"].strip()
        assert row["pika_turn"] is None or row["pika_turn"].strip()
        assert 2 <= len(row["responses"]) <= 3, row["id"]
        for response in row["responses"]:
            assert set(response) == {"text", "mismatch", "why"}
            assert isinstance(response["mismatch"], bool)
            assert response["text"].strip() and response["why"].strip()
    labels = [r["mismatch"] for row in rows for r in row["responses"]]
    assert any(labels) and not all(labels)


def test_precision_and_recall_on_the_labelled_set() -> None:
    scores = evaluate_tone()
    assert scores.n == sum(len(item.responses) for item in read_tone_labels())
    assert scores.precision is not None and scores.precision >= MIN_PRECISION, scores.describe()
    assert scores.recall is not None and scores.recall >= MIN_RECALL, scores.describe()


def _per_category() -> dict[str, PrecisionRecall]:
    pairs: dict[str, list[tuple[bool, bool]]] = {c: [] for c in CATEGORIES}
    for item in read_tone_labels():
        for response in item.responses:
            flagged = tone_mismatch(item.user_turn, response.text) is not None
            pairs[item.category].append((flagged, response.mismatch))
    return {category: PrecisionRecall.of(p) for category, p in pairs.items()}


def test_per_category_sanity() -> None:
    scores = _per_category()
    # Neutral children get no mismatch labels, and no flag may fire on them.
    assert scores["neutral"].true_positives + scores["neutral"].false_positives == 0
    # Each other category has labelled mismatches, and most of them are caught.
    for category in ("sad", "scared", "proud", "silly"):
        recall = scores[category].recall
        assert recall is not None and recall >= 0.6, (category, scores[category].describe())


def test_the_kind_of_mismatch_follows_the_category() -> None:
    for item in read_tone_labels():
        for response in item.responses:
            kind = tone_mismatch(item.user_turn, response.text)
            if kind is None or not response.mismatch:
                continue
            if item.category in ("sad", "scared"):
                assert kind == "exuberant_to_upset_child", (item.id, response.text)
            else:
                assert kind == "gloomy_to_happy_child", (item.id, response.text)


@pytest.mark.parametrize(
    ("child", "response", "expected"),
    [
        ("My dog died.", "Yay!!! Awesome!", "exuberant_to_upset_child"),
        ("My dog died.", "Oh no, I'm sorry.", None),
        ("I fell and hurt my knee.", "Woohoo!", "exuberant_to_upset_child"),
        ("I'm scared of the dark.", "It's okay. You are safe.", None),
        ("I got a sticker!", "Oh no, that's so sad.", "gloomy_to_happy_child"),
        ("I got a sticker!", "Wow, a sticker! Yay!", None),
        ("Blue.", "Yay! Awesome!", None),
        ("Blue.", "Oh no, that's so sad.", None),
    ],
)
def test_direct_cases(child: str, response: str, expected: str | None) -> None:
    assert tone_mismatch(child, response) == expected


def test_check_tone_reports_its_parts() -> None:
    check = check_tone("My dog died.", "Yay!!! Awesome!")
    assert check.child_compound < 0 < check.response_compound
    assert -1.0 <= check.child_compound <= 1.0 and -1.0 <= check.response_compound <= 1.0
    assert (check.child_mood, check.response_energy) == ("upset", "exuberant")
    calm = check_tone("My shirt is green.", "Green, like a frog.")
    assert (calm.child_mood, calm.response_energy, calm.mismatch) == ("neutral", "neutral", None)


@pytest.mark.parametrize(
    "child", ["I'm afraid of spiders.", "I had a nightmare.", "Owie, my finger."]
)
def test_lexicon_additions_read_childrens_words_as_upset(child: str) -> None:
    assert check_tone(child, "Hi.").child_mood == "upset"


def test_a_bad_label_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "labels.jsonl"
    bad.write_text(
        '{"id": "x", "category": "sad", "user_turn": "Hi", "responses": []}\n{"id": 1}\n'
    )
    with pytest.raises(ValueError, match=r"labels.jsonl:2"):
        read_tone_labels(bad)


def test_a_fire_truck_is_not_upsetting() -> None:
    """VADER scores "fire" -1.4; a child talking about a fire truck is excited, not upset."""
    check = check_tone("I saw a big red fire truck!", "Wow, how exciting!")
    assert check.child_mood != "upset" and check.mismatch is None, check


def test_only_the_first_symbols_are_scored() -> None:
    """VADER's emoji handling grows faster than the text (500 emoji took 57 ms, 10,000
    took 42 s), which the guard would spend on the event loop: a turn is scored on its
    first MAX_SCORED_SYMBOLS symbols and MAX_SCORED_CHARS characters only."""
    from adapters.signals.tone import MAX_SCORED_CHARS, MAX_SCORED_SYMBOLS, compound

    sad = "\N{CRYING FACE}"
    assert compound(sad * 500) == compound(sad * MAX_SCORED_SYMBOLS) < 0
    assert compound("I am sad. " + "la " * 400) == compound(
        ("I am sad. " + "la " * 400)[:MAX_SCORED_CHARS]
    )


def test_oh_no_way_is_not_gloomy() -> None:
    assert check_tone("I won the race!", "Oh no way, you won!").mismatch is None
    assert check_tone("I won the race!", "Oh no, that's sad.").mismatch == "gloomy_to_happy_child"
