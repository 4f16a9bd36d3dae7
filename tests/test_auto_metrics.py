"""Automatic metrics (adapters/auto_metrics.py) against values counted by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.auto_metrics import ServedResponse, compute_metrics, distinct_n, read_replay
from service.cli import app

CORRECTION_MAIN = "Not quite! 2 plus 2 is 4."

RESPONSES = [
    # a: passes every filter
    ServedResponse(
        "Red!",
        "Red is a warm colour. Can you name something red?",
        "Ooh, red like a fire truck!",
        "model",
    ),
    # b: praise while the main response corrects ("Not quite") -> fails no_contradiction
    ServedResponse("five", CORRECTION_MAIN, "Great job!", "model"),
    # c: states the main response's number 12 -> fails no_leak
    ServedResponse(
        "I like cats", "Cats are lovely. There are 12 kinds of cats.", "Wow, 12 kinds!", "model"
    ),
    # d: a fallback phrase, not the model's text
    ServedResponse("um", "Let's count.", "Mm, let me think.", "fallback"),
    # e, f: no main response yet; both pass
    ServedResponse("My dog", None, "Ooh, a dog!", "model"),
    ServedResponse("red", None, "Ooh, red like apples.", "model"),
]


def test_metrics_match_the_hand_count() -> None:
    m = compute_metrics(RESPONSES)
    assert (m.rows, m.ok, m.model) == (6, 6, 5)
    assert m.fallback_rate == pytest.approx(1 / 6)
    assert m.pass_rate == pytest.approx(3 / 6)  # a, e, f
    assert (m.leak_rate, m.leak_denominator) == (pytest.approx(1 / 3), 3)  # c of a, b, c
    assert (m.praise_before_correction, m.correction_rows) == (1.0, 1)  # b of b
    # unigrams: 6 + 2 + 3 + 3 + 4 = 18, distinct 13 (ooh x3, red x2, like x2, a x2 repeat)
    assert m.distinct_1 == pytest.approx(13 / 18)
    # bigrams: 5 + 1 + 2 + 2 + 3 = 13; (ooh, red) and (red, like) repeat in f
    assert m.distinct_2 == pytest.approx(11 / 13)
    assert m.mean_words == pytest.approx((6 + 2 + 3 + 3 + 4) / 5)
    assert m.mean_chars == pytest.approx((27 + 10 + 14 + 11 + 21) / 5)
    assert (m.top_opener, m.top_opener_share) == ("ooh red", pytest.approx(2 / 5))
    assert m.filter_failures == {"no_contradiction": 1, "no_leak": 1}


def test_empty_denominators_are_none_not_zero() -> None:
    m = compute_metrics([ServedResponse("hi", None, "Hmm.", "fallback")])
    assert m.fallback_rate == 1.0 and m.pass_rate == 0.0
    assert m.leak_rate is None and m.praise_before_correction is None
    assert m.distinct_2 is None and m.mean_words is None and m.top_opener is None
    assert distinct_n(["one"], 2) is None


def _replay_line(response: ServedResponse, error: str | None = None) -> str:
    triple = {
        "id": "t",
        "source": "jsonl",
        "lesson_id": None,
        "pika_turn": None,
        "user_turn": response.user_turn,
        "main_response": response.main_response,
    }
    return json.dumps(
        {
            "triple": triple,
            "personality": "calm",
            "session_id": "s",
            "request_id": "r",
            "status": None if error else 200,
            "fast_response": None if error else response.fast_response,
            "source": None if error else response.source,
            "client_ms": 1.0,
            "error": error,
        }
    )


def test_cli_reads_replay_files_and_prints_one_column_per_run(tmp_path: Path) -> None:
    base = tmp_path / "base.jsonl"
    base.write_text(
        "\n".join([*(_replay_line(r) for r in RESPONSES), _replay_line(RESPONSES[0], "boom")])
        + "\n"
    )
    other = tmp_path / "adapter.jsonl"
    other.write_text(_replay_line(RESPONSES[0]) + "\n")
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "metrics",
            str(base),
            str(other),
            "--name",
            "base",
            "--name",
            "sft",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| metric | base | sft |" in result.output
    assert "| rows answered (ok / all) | 6 / 7 | 1 / 1 |" in result.output
    figures = json.loads(out.read_text())
    assert figures["base"]["pass_rate"] == pytest.approx(0.5)
    assert figures["sft"]["pass_rate"] == 1.0
    responses, rows = read_replay(base)
    assert (len(responses), rows) == (6, 7)


def test_cli_names_the_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_replay_line(RESPONSES[0]) + '\n{"triple": 3, "fast_response": "x"}\n')
    result = CliRunner().invoke(app, ["eval", "metrics", str(bad)])
    assert result.exit_code == 2
    assert f"{bad}:2: not a replay row" in result.output
    missing = CliRunner().invoke(app, ["eval", "metrics", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "cannot read replay file" in missing.output
