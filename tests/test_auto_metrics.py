"""Automatic metrics (adapters/auto_metrics.py) against values counted by hand below."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters.auto_metrics import (
    ServedResponse,
    check_rows,
    compute_metrics,
    distinct_n,
    markdown_table,
    metrics_of_rows,
    read_replay,
    summarize_checks,
)
from adapters.eval_rows import RowChecks, ScoredRow
from adapters.sources import Triple
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


# --- per-row checks, repetition, latency, cache and safety (issue 6) -------------------


def test_check_rows_gives_each_check_only_where_it_applies() -> None:
    unsafe = ServedResponse("I hate maths", None, "Maths is stupid, I know.", "model")
    checks = check_rows([*RESPONSES, unsafe])
    a, b, c, d, e, f, g = checks
    # every model row also gets the signals (tests/test_signals_wiring.py checks them)
    assert a.uptake is not None and 0.0 <= a.uptake <= 1.0 and a.tone_fit is True
    # a: main response given, no correction in it ("Red is a warm colour...") -> no praise check
    assert a.model_copy(update={"uptake": None, "tone_fit": None}) == RowChecks(
        failed_filters=[],
        passes=True,
        leak=False,
        praise_before_correction=None,
        safety_flag=False,
        words=6,  # "Ooh," "red" "like" "a" "fire" "truck!"
        chars=27,
    )
    # b: "Not quite!" corrects the child and "Great job!" praises -> praise True, no leak
    assert (b.failed_filters, b.passes, b.leak, b.praise_before_correction) == (
        ["no_contradiction"],
        False,
        False,
        True,
    )
    assert (b.words, b.chars) == (2, 10)
    # c: "12" is the main response's number -> leak; "Cats are lovely" corrects nothing
    assert (c.failed_filters, c.leak, c.praise_before_correction) == (["no_leak"], True, None)
    # d: a fallback phrase: no text check at all, and it does not pass
    assert d == RowChecks(passes=False)
    # e, f: no main response -> leak and praise do not apply
    for check in (e, f):
        assert (check.passes, check.leak, check.praise_before_correction) == (True, None, None)
        assert check.safety_flag is False
    # g: "stupid" is one of text_checks' extra unsafe words -> kid_safe fails
    assert (g.failed_filters, g.safety_flag, g.passes) == (["kid_safe"], True, False)
    # no session ids anywhere: every row is its own session, so never a repetition check
    assert all(check.repeats_in_session is None for check in checks)


def _turn(
    text: str, session: str | None, personality: str = "calm", source: str = "model"
) -> ServedResponse:
    return ServedResponse("yes", None, text, source, session_id=session, personality=personality)


DISTINCT = ["Hmm.", "Okay!", "Let's see.", "Nice thinking.", "I hear you."]


def test_repetition_is_the_same_answer_twice_within_five_turns() -> None:
    # "the same response twice in the last 5 turns": the turn itself and the 4 before it
    rows = [
        # session s1 / calm: "ooh RED" repeats "Ooh, red!" 4 turns back: inside the 5 turns
        _turn("Ooh, red!", "s1"),  # 0: first of s1/calm -> None
        *(_turn(t, "s1") for t in DISTINCT[:3]),  # 1-3: False
        _turn("Ooh, red!", "s1", personality="cheerful"),  # 4: first of s1/cheerful -> None
        _turn("Ooh, red!", "s3"),  # 5: first of s3/calm (other session) -> None
        _turn("ooh   RED", "s1"),  # 6: s1/calm turns 0-3 and this one: 5 turns -> True
        # session s2 / calm: the same text 5 turns back (6 turns with this one) does not
        _turn("Ooh, red!", "s2"),  # 7: None
        *(_turn(t, "s2") for t in DISTINCT[:4]),  # 8-11: False
        _turn("Ooh red.", "s2"),  # 12: the 4 before it are rows 8-11 -> False
        # session s4: a fallback and a cache answer are turns the child heard
        _turn("Mm, let me think.", "s4", source="fallback"),  # 13: None
        _turn("mm let me think", "s4", source="cache"),  # 14: repeats the fallback -> True
        _turn("Mm... let me THINK!", "s4"),  # 15: True
        _turn("Ooh, red!", None),  # 16: no session -> its own key -> None
    ]
    got = [check.repeats_in_session for check in check_rows(rows)]
    assert got == [
        None, False, False, False, None, None, True,
        None, False, False, False, False, False,
        None, True, True,
        None,
    ]  # fmt: skip
    m = compute_metrics(rows)
    # checked rows: 17 - 6 None (rows 0, 4, 5, 7, 13, 16) = 11; repeats: rows 6, 14, 15 = 3
    assert (m.repetition_rate, m.repetition_denominator) == (pytest.approx(3 / 11), 11)


def test_latency_percentiles_cache_and_safety_by_hand() -> None:
    responses = [
        ServedResponse("red", None, "Mm, let me think.", "fallback", latency_ms=40.0),
        ServedResponse("red", None, "Ooh, red!", "model", latency_ms=10.0),
        ServedResponse("red", None, "Ooh, red!", "cache", latency_ms=None),
        ServedResponse("blue", None, "That is stupid.", "model", latency_ms=30.0),
        ServedResponse("blue", None, "Blue, nice.", "cache", latency_ms=20.0),
    ]
    m = compute_metrics(responses, rows=6)
    # latencies of the rows that have one, fallback included: [10, 20, 30, 40], n = 4.
    # Type 7: h = (n - 1) p + 1 = 3p + 1, j = floor(h); Q = x[j] + (h - j)(x[j + 1] - x[j])
    # P50: h = 2.5  -> 20 + 0.5 * 10 = 25
    # P95: h = 3.85 -> 30 + 0.85 * 10 = 38.5
    # P99: h = 3.97 -> 30 + 0.97 * 10 = 39.7
    assert m.latency_p50_ms == pytest.approx(25.0)
    assert m.latency_p95_ms == pytest.approx(38.5)
    assert m.latency_p99_ms == pytest.approx(39.7)
    # cache: 2 of 5 ok rows; model rows (not fallback): 4, of which "stupid" is flagged: 1/4
    assert m.cache_rate == pytest.approx(2 / 5)
    assert (m.model, m.safety_flags, m.safety_flag_rate) == (4, 1, pytest.approx(1 / 4))
    assert m.filter_failures == {"kid_safe": 1}
    # one latency: all three percentiles are it
    single = compute_metrics([ServedResponse("x", None, "Ooh!", "model", latency_ms=12.5)])
    assert (single.latency_p50_ms, single.latency_p95_ms, single.latency_p99_ms) == (
        12.5,
        12.5,
        12.5,
    )


def test_new_rates_are_none_without_a_denominator() -> None:
    nothing = compute_metrics([], rows=3)
    assert (nothing.rows, nothing.ok, nothing.model) == (3, 0, 0)
    assert nothing.latency_p50_ms is None and nothing.latency_p99_ms is None
    assert nothing.cache_rate is None and nothing.fallback_rate is None
    assert (nothing.repetition_rate, nothing.repetition_denominator) == (None, 0)
    assert (nothing.safety_flag_rate, nothing.safety_flags) == (None, 0)
    # only a fallback row with no latency: a cache rate of 0, but no model row to flag
    fallback = compute_metrics([ServedResponse("hi", None, "Hmm.", "fallback")])
    assert fallback.cache_rate == 0.0
    assert (fallback.safety_flag_rate, fallback.safety_flags) == (None, 0)
    assert fallback.latency_p95_ms is None
    table = markdown_table([("empty", nothing)])
    assert "| latency P95 (ms) | n/a |" in table
    assert "| cache rate | n/a |" in table
    assert "| repetition rate | n/a (of 0) |" in table
    assert "| safety flags | 0 (n/a) |" in table


def test_summarize_checks_needs_one_check_per_response() -> None:
    with pytest.raises(ValueError, match="1 checks for 2 responses"):
        summarize_checks(RESPONSES[:2], [RowChecks()])


def _scored(
    key: str,
    response: ServedResponse | None,
    checks: RowChecks,
    session: str = "s",
    error: str | None = None,
) -> ScoredRow:
    triple = Triple(
        id=key,
        source="jsonl",
        user_turn=response.user_turn if response else "hi",
        main_response=response.main_response if response else None,
    )
    return ScoredRow(
        id=f"{key}|calm",
        triple=triple,
        personality="calm",
        session_id=session,
        fast_response=None if response is None else response.fast_response,
        source=None if response is None else response.source,
        latency_ms=None if response is None else response.latency_ms,
        error=error,
        checks=checks,
    )


def test_metrics_of_rows_use_the_stored_checks() -> None:
    clean = ServedResponse("red", None, "Ooh, red!", "model", latency_ms=10.0)
    cached = ServedResponse("red", None, "Ooh, red!", "cache", latency_ms=30.0)
    fallback = ServedResponse("um", None, "Mm, let me think.", "fallback", latency_ms=20.0)
    rows = [
        # stored checks say what the run found: the text is clean, but the stored flag
        # is what counts (nothing is checked again)
        _scored("a", clean, RowChecks(passes=True, safety_flag=True, words=2, chars=9)),
        _scored(
            "b",
            cached,
            RowChecks(passes=True, safety_flag=False, repeats_in_session=True, words=2, chars=9),
        ),
        _scored("c", fallback, RowChecks(passes=False, repeats_in_session=False)),
        _scored("d", None, RowChecks(), error="HTTP 503: busy"),
    ]
    m = metrics_of_rows(rows)
    # rows 4 (the failed request too), ok 3, model 2 (a, b)
    assert (m.rows, m.ok, m.model) == (4, 3, 2)
    assert m.safety_flags == 1 and m.safety_flag_rate == pytest.approx(1 / 2)
    # repetition: checked b (True) and c (False) -> 1/2
    assert (m.repetition_rate, m.repetition_denominator) == (pytest.approx(1 / 2), 2)
    assert m.pass_rate == pytest.approx(2 / 3) and m.cache_rate == pytest.approx(1 / 3)
    # latencies [10, 20, 30]: P50 h = 2 -> 20; P95 h = 2.9 -> 20 + 0.9 * 10 = 29
    assert (m.latency_p50_ms, m.latency_p95_ms) == (pytest.approx(20.0), pytest.approx(29.0))
    assert m.mean_words == 2.0 and m.mean_chars == 9.0


def test_metrics_of_rows_match_compute_metrics_when_checks_come_from_check_rows() -> None:
    responses = [
        ServedResponse(
            r.user_turn,
            r.main_response,
            r.fast_response,
            r.source,
            session_id="s",
            latency_ms=float(i),
        )
        for i, r in enumerate(RESPONSES)
    ]
    rows = [
        _scored(str(i), response, checks)
        for i, (response, checks) in enumerate(zip(responses, check_rows(responses), strict=True))
    ]
    assert metrics_of_rows(rows) == compute_metrics(responses)


def test_read_replay_carries_session_personality_and_latency(tmp_path: Path) -> None:
    line = json.loads(_replay_line(RESPONSES[0]))
    line |= {"session_id": "lesson-1", "personality": "cheerful", "latency_ms": 12.5}
    other = json.loads(_replay_line(RESPONSES[0]))  # session "s", personality calm, no latency
    path = tmp_path / "replay.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(other) + "\n")
    (first, second), rows = read_replay(path)
    assert rows == 2
    assert (first.id, first.personality, first.session_id, first.latency_ms) == (
        "t|cheerful",
        "cheerful",
        "lesson-1",
        12.5,
    )
    assert (second.id, second.session_id, second.latency_ms) == ("t|calm", "s", None)
    # same text, same session id but other personalities: no repetition check applies
    assert compute_metrics([first, second]).repetition_denominator == 0
