"""The uptake signal (adapters/signals/uptake.py) against the human ratings of the Uptake
data (Demszky et al., 2021) and hand-made examples.

The held-out figures come from the raters' ``uptake`` column of the shared CSV, never
from the code under test. The sentence model is loaded once per module and the held-out
split encoded once (about 10 s); the CLI refit encodes the whole file and refits 46
times (about 100 s).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapters.signals.uptake import (
    EMBEDDING_BLOCKS,
    EMBEDDING_DIM,
    FEATURES,
    LOW_UPTAKE,
    SPLIT_RULE,
    UPTAKE_WEIGHTS,
    IdfTable,
    UptakeDataError,
    UptakeEvaluation,
    UptakeScorer,
    UptakeWeightsError,
    default_scorer,
    evaluate_uptake,
    file_sha256,
    is_heldout,
    last_sentence,
    lexical_features,
    read_uptake_csv,
)
from service.cli import app

SPEARMAN_FLOOR = 0.50
"""Issue 9: the test fails below this held-out Spearman (the target, 0.55, is reported)."""


@pytest.fixture(scope="module")
def uptake_csv(shared_data: Path) -> Path:
    return shared_data / "uptake" / "uptake_data.csv"


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(UPTAKE_WEIGHTS.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="module")
def heldout(uptake_csv: Path) -> UptakeEvaluation:
    """The committed weights scored on the held-out split (once per module)."""
    return evaluate_uptake(uptake_csv)


# --- against the human ratings ---------------------------------------------------------


def test_heldout_spearman_with_human_ratings(
    heldout: UptakeEvaluation, committed: dict[str, Any]
) -> None:
    assert heldout.n == committed["split"]["n_heldout"] == 358
    assert heldout.spearman >= SPEARMAN_FLOOR, heldout
    # the same held-out rows, plain cosine similarity: the model must beat it
    assert heldout.spearman > heldout.cosine_spearman + 0.05, heldout
    assert heldout.spearman == pytest.approx(committed["heldout"]["spearman"], abs=1e-4)


def test_weights_were_fitted_on_this_csv(
    uptake_csv: Path, committed: dict[str, Any], heldout: UptakeEvaluation
) -> None:
    assert committed["data"]["sha256"] == file_sha256(uptake_csv), (
        "stale weights: refit with `fastresp signals fit-uptake`"
    )
    assert heldout.data_sha256_matches
    assert committed["split"]["rule"] == SPLIT_RULE
    assert [f["name"] for f in committed["features"]] == list(FEATURES)
    assert committed["embedding"]["blocks"] == list(EMBEDDING_BLOCKS)
    assert len(committed["embedding"]["coefficients"]) == 2 * EMBEDDING_DIM == 768
    assert committed["low_uptake"]["threshold"] == LOW_UPTAKE
    # the IDF table was counted on the train split only: one document per turn
    assert committed["idf"]["documents"] == 2 * committed["split"]["n_train"]


def test_split_is_by_transcript_and_about_a_fifth(uptake_csv: Path) -> None:
    rows = read_uptake_csv(uptake_csv)
    assert len(rows) == 1998  # the rated rows of the released file (its README)
    transcripts = {r.obs_id for r in rows}
    held = {t for t in transcripts if is_heldout(t)}
    assert 0.15 < len(held) / len(transcripts) < 0.25
    for row in rows:  # every exchange of a transcript is on the same side
        assert is_heldout(row.obs_id) == (row.obs_id in held)


def test_low_uptake_flags_mostly_low_rated_exchanges(heldout: UptakeEvaluation) -> None:
    """Held out, the flag "score < LOW_UPTAKE" against "every rater rated low": weak but
    above chance (6% of held-out exchanges are rated 0)."""
    pr = heldout.low_uptake
    assert heldout.threshold == LOW_UPTAKE
    assert pr.precision is not None and pr.recall is not None
    base_rate = (pr.true_positives + pr.false_negatives) / pr.n
    assert pr.precision > base_rate
    assert pr.recall >= 0.2


# --- features, by hand ---------------------------------------------------------------------


def test_echoed_number_and_repeated_content_word() -> None:
    echo = lexical_features("I have 12 apples.", "Twelve apples, wow!")
    assert echo["echoed_number"] == 1.0
    assert echo["content_recall"] == 1.0  # "apple" is the child's only content word
    assert echo["content_precision"] == 1.0  # ... and the reply's only one
    other = lexical_features("I have 12 apples.", "Let's sing a song.")
    assert other["echoed_number"] == 0.0
    assert other["content_recall"] == 0.0
    half = lexical_features("My truck is red.", "A truck!")
    assert half["content_recall"] == 0.5  # "truck" of {"red", "truck"}
    assert half["bigram_recall"] == 0.0  # no word pair of the child's repeated


def test_questions_probes_and_sentences() -> None:
    features = lexical_features("What is 3 times 4?", "Why do you think so?")
    assert features["child_question"] == 1.0
    assert features["response_question"] == 1.0
    assert features["probe"] == 1.0
    plain = lexical_features("It is blue.", "Blue like the sky.")
    assert (plain["child_question"], plain["response_question"], plain["probe"]) == (0, 0, 0)
    assert plain["first_sentence_repeat"] == 1.0
    assert last_sentence("I like cats. They are soft!") == "They are soft!"
    assert last_sentence("...") == "..."


def test_idf_overlap_by_hand() -> None:
    idf = IdfTable.fit(["A cat.", "a dog", "the cat sat"])
    assert idf.documents == 3
    assert idf.document_frequency == {"a": 2, "cat": 2, "dog": 1, "sat": 1, "the": 1}
    # smoothed IDF ln((N + 1) / (df + 1)) + 1, computed here by hand
    w_a = w_cat = math.log(4 / 3) + 1
    w_dog = math.log(4 / 2) + 1
    w_unseen = math.log(4 / 1) + 1
    assert idf.weight("cat") == pytest.approx(w_cat)
    assert idf.weight("zebra") == pytest.approx(w_unseen)
    recall, precision = idf.overlap("A dog, a cat!", "Cat!")
    assert recall == pytest.approx(w_cat / (w_a + w_dog + w_cat))
    assert precision == pytest.approx(1.0)
    assert idf.overlap("", "Cat!") == (0.0, 0.0)
    assert idf.overlap("zebra", "a zebra") == pytest.approx((1.0, w_unseen / (w_unseen + w_a)))


# --- scores -------------------------------------------------------------------------------


def test_scores_in_range_and_repeat_beats_unrelated() -> None:
    scorer = default_scorer()
    child = "I saw a big red fire truck!"
    pairs = [
        (child, "A big red fire truck, wow!"),
        (child, "Ooh, red like a fire truck!"),
        (child, "Okay."),
        (child, "Great job!"),
        (child, "Let's count the apples."),
        ("", ""),
    ]
    scores = scorer.score_many(pairs)
    assert all(0.0 <= s <= 1.0 for s in scores)
    repeat, revoice, okay, praise, unrelated, _ = scores
    assert min(repeat, revoice) > max(okay, praise, unrelated)
    # hand labels of the low-uptake filter: generic replies are low, repeats are not
    assert okay < LOW_UPTAKE and praise < LOW_UPTAKE and unrelated < LOW_UPTAKE
    assert repeat >= LOW_UPTAKE and revoice >= LOW_UPTAKE
    assert scorer.score(child, "Okay.") == pytest.approx(okay, abs=1e-9)
    assert scorer.score_many([]) == []


# --- errors -------------------------------------------------------------------------------


def test_bad_csv_is_refused_with_the_column_or_line(tmp_path: Path) -> None:
    no_rating = tmp_path / "no_rating.csv"
    no_rating.write_text("obs_id,exchange_idx,student_text,teacher_text\n1,1,a,b\n")
    with pytest.raises(UptakeDataError, match=r"missing column.*uptake"):
        read_uptake_csv(no_rating)
    bad_value = tmp_path / "bad_value.csv"
    bad_value.write_text(
        "obs_id,exchange_idx,student_text,teacher_text,uptake\n1,1,a,b,1.0\n1,2,c,d,high\n"
    )
    with pytest.raises(UptakeDataError, match=r"bad_value.csv:3: uptake 'high'"):
        read_uptake_csv(bad_value)
    with pytest.raises(UptakeDataError, match="cannot read"):
        read_uptake_csv(tmp_path / "missing.csv")


def test_bad_weights_are_refused(tmp_path: Path, committed: dict[str, Any]) -> None:
    with pytest.raises(UptakeWeightsError, match=r"no uptake weights file.*fit-uptake"):
        UptakeScorer.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UptakeWeightsError, match="unreadable"):
        UptakeScorer.load(broken)
    other = dict(committed, features=committed["features"][:-1])
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(other))
    with pytest.raises(UptakeWeightsError, match="fitted for features"):
        UptakeScorer.load(stale)
    short = dict(committed, embedding=dict(committed["embedding"], coefficients=[0.0] * 10))
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(UptakeWeightsError, match="must have 768 values"):
        UptakeScorer.load(tmp_path / "short.json")
    version1 = dict(committed, format="pika-uptake-weights/1")
    (tmp_path / "v1.json").write_text(json.dumps(version1))
    with pytest.raises(UptakeWeightsError, match=r"format 'pika-uptake-weights/1'"):
        UptakeScorer.load(tmp_path / "v1.json")
    no_idf = {k: v for k, v in committed.items() if k != "idf"}
    (tmp_path / "no_idf.json").write_text(json.dumps(no_idf))
    with pytest.raises(UptakeWeightsError, match="malformed"):
        UptakeScorer.load(tmp_path / "no_idf.json")


def test_cli_refuses_bad_data(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("obs_id,student_text\n1,hello\n")
    result = CliRunner().invoke(
        app, ["signals", "fit-uptake", "--data", str(bad), "--out", str(tmp_path / "w.json")]
    )
    assert result.exit_code == 2, result.output
    assert "--data" in result.output and "missing column" in result.output
    assert not (tmp_path / "w.json").exists()
    missing = CliRunner().invoke(app, ["signals", "report", "--data", str(tmp_path / "no.csv")])
    assert missing.exit_code == 2 and "--data: no such file" in missing.output
    no_folder = CliRunner().invoke(
        app, ["signals", "fit-uptake", "--out", str(tmp_path / "nope" / "w.json")]
    )
    assert no_folder.exit_code == 2 and "--out: no such folder" in no_folder.output


# --- the fit is reproducible ----------------------------------------------------------------


def test_cli_refit_reproduces_the_committed_weights(
    tmp_path: Path, uptake_csv: Path, committed: dict[str, Any]
) -> None:
    out = tmp_path / "weights.json"
    result = CliRunner().invoke(
        app, ["signals", "fit-uptake", "--data", str(uptake_csv), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "held-out Spearman: model" in result.output
    refit = json.loads(out.read_text(encoding="utf-8"))
    for mine, theirs in zip(refit["features"], committed["features"], strict=True):
        assert mine["name"] == theirs["name"]
        for key in ("mean", "scale", "coefficient"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), (mine["name"], key)
    assert refit["intercept"] == pytest.approx(committed["intercept"], abs=1e-5)
    for key in ("means", "scales", "coefficients"):
        assert refit["embedding"][key] == pytest.approx(
            committed["embedding"][key], rel=1e-4, abs=1e-5
        ), key
    assert refit["idf"] == committed["idf"]
    assert refit["heldout"] == pytest.approx(committed["heldout"], abs=1e-4)
    assert refit["low_uptake"]["threshold"] == committed["low_uptake"]["threshold"]
    assert refit["split"] == committed["split"]
