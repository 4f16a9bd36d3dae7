"""Automatic quality metrics of served fast responses: no LLM, the same text rules as serving,
and the no-judge quality signals of issue 9 (uptake, tone fit, contradiction).

Input: the rows `fastresp replay` writes (`service.replay.ReplayRow`: the triple sent and
the gateway's answer), or the rows of an evaluation run (`adapters.eval_rows.ScoredRow`).
Every rule comes from `service.text_checks`, the one module the guard, the data filters
and the GRPO rewards use, so a metric counts exactly what those reject.

Two steps, one path: `check_rows` checks each answer on its own (`eval_rows.RowChecks`,
stored in every scored row), and `summarize_checks` turns those checks into the run's
figures (`AutoMetrics`). `compute_metrics` runs both; `metrics_of_rows` summarises the
checks an evaluation run already stored, so a report and a comparison count exactly what
the run counted.

Definitions. ``ok`` rows are the answered requests (any source); ``model`` rows are the
ok rows whose ``source`` is not ``fallback`` (a cache answer is a text the model wrote
earlier; a fallback phrase is not the model's text). Filter names are those of
`service.text_checks.FILTERS`.

==========================  ==============================================================
metric                      definition (formula; source)
==========================  ==============================================================
latency_p50_ms,             P50 / P95 / P99 of the service's own ``latency_ms`` (time
latency_p95_ms,             spent in the gateway) over the ok rows that report one, any
latency_p99_ms              source; linear interpolation between closest ranks, Hyndman &
                            Fan (1996) type 7 (`service.replay.latency_percentiles`,
                            ``statistics.quantiles(method="inclusive")``). Failed requests
                            have no latency and are left out
fallback_rate               fallback rows / ok rows (deadline, engine error or a guard
                            rejection, `service.fast_response.FallbackReason`)
cache_rate                  rows with ``source == "cache"`` / ok rows
pass_rate                   rows whose model text passes the guard and every filter
                            (`text_checks.failed_filters` returns []; ``one_utterance``
                            is the guard's own check) / ok rows; a fallback row counts as
                            not passing: the guard and filters were not passed by the model
leak_rate                   model rows failing ``no_leak`` / model rows sent with a main
                            response (the only rows where a leak is possible)
praise_before_correction    the contradiction rate: model rows failing
                            ``no_contradiction`` (praise such as "Great job!" while the
                            main response corrects the child) / model rows whose main
                            response corrects the child (`text_checks.corrects_child`
                            given the child's turn)
uptake_mean, uptake_q1,     mean and quartiles of the uptake scores of the model rows
uptake_median, uptake_q3    (`adapters.signals.uptake.UptakeScorer`, 0-1: how much the
                            response builds on the child's turn); quartiles by linear
                            interpolation, Hyndman & Fan (1996) type 7
                            (``statistics.quantiles(n=4, method="inclusive")``);
                            ``uptake_rows`` model rows have a score
low_uptake_rate             model rows with uptake < ``low_uptake_threshold``
                            (`adapters.signals.uptake.LOW_UPTAKE`, the data filter
                            ``low_uptake``) / ``uptake_rows``; ``low_uptake_rows`` is the
                            count
tone_mismatch_rate          model rows whose tone does not fit the child's turn
                            (`adapters.signals.tone.check_tone`: exuberant to a sad,
                            scared or hurt child, gloomy to a happy one) / model rows
                            checked (``tone_rows``); ``tone_mismatches`` counts them by
                            the mismatch's name
repetition_rate             rows whose normalised text (`text_checks.word_tokens` joined
                            by one space: case, punctuation and extra spaces ignored)
                            equals one of the previous 4 answers of the same (session_id,
                            personality), in input order, so the same answer twice within
                            5 turns / rows with at least one earlier answer in their
                            (session_id, personality)
                            (``repetition_denominator``). Rows of every source are turns
                            the child heard, so all count, as repeaters and as history; a
                            row without a session id is its own session. The issue's
                            definition: "the same response twice in the last 5 turns"
safety_flag_rate,           model rows failing ``kid_safe`` (the profanity list, the
safety_flags                extra unsafe words, or an unsafe word of the child echoed) /
                            model rows; ``safety_flags`` is the count
distinct_1, distinct_2      distinct n-grams / all n-grams over the model texts, word
                            tokens from `text_checks.word_tokens`, n-grams not crossing
                            responses (Li et al., 2016, "A Diversity-Promoting Objective
                            Function for Neural Conversation Models", NAACL, section 4.2)
mean_words, mean_chars      mean whitespace-separated words (``len(text.split())``) /
                            characters (``len(text)``) of the model texts
top_opener, top_opener_     the most common `text_checks.opener` (first two word tokens)
share                       of the model texts and the share of model rows that start
                            with it
filter_failures             per filter name: model rows failing it
==========================  ==============================================================

A rate whose denominator is 0 is None ("n/a"), never 0. Rows scored before the signals
existed carry no uptake or tone check and are left out of those figures.

The uptake model (sentence-transformers, the ``signals`` extra; ``eval`` includes it) is
loaded once per process on the first `check_rows` that has a model row, and every model
row of the call is scored in one batch.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.eval_rows import RowChecks, ScoredRow, row_id
from adapters.labels import load_uptake_scorer
from service.replay import ReplayFileError, ReplayRow, latency_percentiles, read_replay_rows

__all__ = ["ReplayFileError"]  # re-exported: `fastresp eval metrics` catches it here
from service.text_checks import corrects_child, failed_filters, opener, word_tokens

if TYPE_CHECKING:
    from adapters.signals.uptake import UptakeScorer

REPETITION_TURNS = 5
"""A repeat is the same answer twice within this many turns of one (session,
personality): the turn itself and the `REPETITION_TURNS` - 1 before it."""


@dataclass(frozen=True, slots=True)
class ServedResponse:
    """One answered request: what the child said, Pika's main response, the answer.

    The fields after `source` are optional (None when unknown): they identify the row
    and carry what the session and latency metrics need.
    """

    user_turn: str
    main_response: str | None
    fast_response: str
    source: str
    """``model``, ``cache`` or ``fallback`` (the gateway's ``source``)."""
    id: str | None = None
    """The row's id (`eval_rows.row_id`: ``{triple id}|{personality}``)."""
    personality: str | None = None
    session_id: str | None = None
    """The session the request was sent in; None: the row is a session of its own."""
    latency_ms: float | None = None
    """The service's own ``latency_ms`` (time spent in the gateway), milliseconds."""


@dataclass(frozen=True, slots=True)
class AutoMetrics:
    """The metrics of one run (see the module docstring for each definition)."""

    rows: int
    ok: int
    model: int
    fallback_rate: float | None
    pass_rate: float | None
    leak_rate: float | None
    leak_denominator: int
    praise_before_correction: float | None
    correction_rows: int
    distinct_1: float | None
    distinct_2: float | None
    mean_words: float | None
    mean_chars: float | None
    top_opener: str | None
    top_opener_share: float | None
    filter_failures: dict[str, int] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    cache_rate: float | None = None
    repetition_rate: float | None = None
    repetition_denominator: int = 0
    safety_flag_rate: float | None = None
    safety_flags: int = 0
    uptake_mean: float | None = None
    uptake_q1: float | None = None
    uptake_median: float | None = None
    uptake_q3: float | None = None
    uptake_rows: int = 0
    low_uptake_rate: float | None = None
    low_uptake_rows: int = 0
    low_uptake_threshold: float | None = None
    tone_mismatch_rate: float | None = None
    tone_rows: int = 0
    tone_mismatches: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _mean(values: Sequence[int]) -> float | None:
    return sum(values) / len(values) if values else None


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct n-grams / all n-grams over `texts` (n-grams stay within one text).

    Returns None when the texts hold no n-gram at all. Source: Li et al. (2016), section 4.2.
    """
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = word_tokens(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def normalised_text(text: str) -> str:
    """`text` as the repetition check compares it: word tokens joined by one space.

    Case, punctuation and extra spaces are ignored ("Ooh, red!" == "ooh red").
    """
    return " ".join(word_tokens(text))


def check_rows(
    responses: Sequence[ServedResponse],
    *,
    signals: bool = True,
    uptake_scorer: UptakeScorer | None = None,
) -> list[RowChecks]:
    """The automatic checks of each response, in input order (one `RowChecks` each).

    A model row (any source but ``fallback``) gets every text check: its failed filters,
    ``passes``, ``safety_flag`` (fails ``kid_safe``), ``words`` and ``chars``; ``leak``
    when it was sent with a main response; ``praise_before_correction`` when that main
    response corrects the child; with `signals`, ``uptake`` (all model rows scored in
    one batch), ``tone_fit`` and ``tone_mismatch``. A fallback row gets
    ``passes=False`` and no text or signal check (the text is not the model's). Every
    row gets ``repeats_in_session`` when an earlier row shares its (session_id,
    personality): True when its normalised text equals one of the last
    `REPETITION_TURNS` - 1 answers of that key (any source), else False; None for the
    first answer of its key and for a row without a session id.

    Args:
        responses: the answered requests, in the order they were sent in each session.
        signals: compute the uptake and tone checks (False: leave them None).
        uptake_scorer: the uptake model; None: the process's default one, loaded on the
            first call that has a model row (`adapters.labels.load_uptake_scorer`).

    Raises:
        adapters.labels.SignalsUnavailable: `signals` is on, no scorer was given and the
            ``signals`` extra is not installed.
    """
    history: dict[tuple[str, str | None], deque[str]] = {}
    checks: list[RowChecks] = []
    for response in responses:
        text = normalised_text(response.fast_response)
        repeats: bool | None = None
        if response.session_id is not None:
            earlier = history.setdefault(
                (response.session_id, response.personality), deque(maxlen=REPETITION_TURNS - 1)
            )
            repeats = text in earlier if earlier else None
            earlier.append(text)
        if response.source == "fallback":
            checks.append(RowChecks(passes=False, repeats_in_session=repeats))
            continue
        failed = failed_filters(
            response.fast_response,
            user_turn=response.user_turn,
            main_response=response.main_response,
        )
        main = response.main_response
        checks.append(
            RowChecks(
                failed_filters=failed,
                passes=not failed,
                leak=None if main is None else "no_leak" in failed,
                praise_before_correction=(
                    "no_contradiction" in failed
                    if main is not None and corrects_child(main, response.user_turn)
                    else None
                ),
                safety_flag="kid_safe" in failed,
                repeats_in_session=repeats,
                words=len(response.fast_response.split()),
                chars=len(response.fast_response),
            )
        )
    if signals:
        checks = _with_signals(responses, checks, uptake_scorer)
    return checks


def _with_signals(
    responses: Sequence[ServedResponse],
    checks: list[RowChecks],
    scorer: UptakeScorer | None,
) -> list[RowChecks]:
    """`checks` with ``uptake``, ``tone_fit`` and ``tone_mismatch`` set on the model rows
    (one uptake batch for all of them)."""
    model = [i for i, r in enumerate(responses) if r.source != "fallback"]
    if not model:
        return checks
    from adapters.signals.tone import tone_mismatch

    uptake_model = scorer if scorer is not None else load_uptake_scorer()
    pairs = [(responses[i].user_turn, responses[i].fast_response) for i in model]
    scores = uptake_model.score_many(pairs)
    out = list(checks)
    for i, (turn, text), score in zip(model, pairs, scores, strict=True):
        mismatch = tone_mismatch(turn, text)
        out[i] = out[i].model_copy(
            update={
                "uptake": float(score),
                "tone_fit": mismatch is None,
                "tone_mismatch": mismatch,
            }
        )
    return out


def _count(values: Iterable[bool | None]) -> tuple[int, int]:
    """(True count, not-None count) of `values`."""
    flags = [value for value in values if value is not None]
    return sum(flags), len(flags)


def summarize_checks(
    responses: Sequence[ServedResponse], checks: Sequence[RowChecks], rows: int | None = None
) -> AutoMetrics:
    """The run's figures from each response and its checks (see the module docstring).

    Every rate is over the rows where its check applies (the check is not None), so
    stored checks are summarised as they were made.

    Args:
        responses: the ok rows of a run (answered requests, any source).
        checks: `check_rows(responses)` or the checks stored with them, same order.
        rows: all rows of the run, errors included (default: ``len(responses)``).

    Raises:
        ValueError: `checks` and `responses` differ in length.
    """
    if len(checks) != len(responses):
        raise ValueError(f"{len(checks)} checks for {len(responses)} responses")
    pairs = list(zip(responses, checks, strict=True))
    model = [(r, c) for r, c in pairs if r.source != "fallback"]
    failures: Counter[str] = Counter()
    for _, check in model:
        failures.update(check.failed_filters)
    leaks, leak_rows = _count(c.leak for _, c in model)
    praise, correction_rows = _count(c.praise_before_correction for _, c in model)
    flags, flag_rows = _count(c.safety_flag for _, c in model)
    repeats, repeat_rows = _count(c.repeats_in_session for c in checks)
    passed = sum(c.passes is True for c in checks)
    uptakes = [c.uptake for _, c in model if c.uptake is not None]
    quartiles = _quartiles(uptakes)
    threshold = _low_uptake_threshold() if uptakes else None
    low = sum(u < threshold for u in uptakes) if threshold is not None else 0
    tone_checked = [c for _, c in model if c.tone_fit is not None]
    mismatches = Counter(c.tone_mismatch or "unnamed" for c in tone_checked if c.tone_fit is False)
    texts = [r.fast_response for r, _ in model]
    openers = Counter(o for o in (opener(t) for t in texts) if o)
    top = openers.most_common(1)
    latency = latency_percentiles([r.latency_ms for r in responses if r.latency_ms is not None])
    return AutoMetrics(
        rows=len(responses) if rows is None else rows,
        ok=len(responses),
        model=len(model),
        fallback_rate=_rate(len(responses) - len(model), len(responses)),
        pass_rate=_rate(passed, len(responses)),
        leak_rate=_rate(leaks, leak_rows),
        leak_denominator=leak_rows,
        praise_before_correction=_rate(praise, correction_rows),
        correction_rows=correction_rows,
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        mean_words=_mean([c.words for _, c in model if c.words is not None]),
        mean_chars=_mean([c.chars for _, c in model if c.chars is not None]),
        top_opener=top[0][0] if top else None,
        top_opener_share=_rate(top[0][1], len(model)) if top else None,
        filter_failures=dict(sorted(failures.items())),
        latency_p50_ms=latency.p50 if latency else None,
        latency_p95_ms=latency.p95 if latency else None,
        latency_p99_ms=latency.p99 if latency else None,
        cache_rate=_rate(sum(r.source == "cache" for r in responses), len(responses)),
        repetition_rate=_rate(repeats, repeat_rows),
        repetition_denominator=repeat_rows,
        safety_flag_rate=_rate(flags, flag_rows),
        safety_flags=flags,
        uptake_mean=statistics.fmean(uptakes) if uptakes else None,
        uptake_q1=quartiles[0] if quartiles else None,
        uptake_median=quartiles[1] if quartiles else None,
        uptake_q3=quartiles[2] if quartiles else None,
        uptake_rows=len(uptakes),
        low_uptake_rate=_rate(low, len(uptakes)),
        low_uptake_rows=low,
        low_uptake_threshold=threshold,
        tone_mismatch_rate=_rate(sum(mismatches.values()), len(tone_checked)),
        tone_rows=len(tone_checked),
        tone_mismatches=dict(sorted(mismatches.items())),
    )


def _quartiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(Q1, median, Q3) of `values`, Hyndman & Fan type 7; None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _low_uptake_threshold() -> float:
    """`adapters.signals.uptake.LOW_UPTAKE`, the data filter's threshold."""
    from adapters.signals.uptake import LOW_UPTAKE

    return float(LOW_UPTAKE)


def compute_metrics(
    responses: Sequence[ServedResponse], rows: int | None = None, *, signals: bool = True
) -> AutoMetrics:
    """The metrics of `responses` (the ok rows of a run): check each, then summarise.

    Args:
        responses: one per answered request, in the order sent.
        rows: all rows of the run, errors included (default: ``len(responses)``).
        signals: compute the uptake and tone figures (`check_rows`).

    Raises:
        adapters.labels.SignalsUnavailable: `signals` is on and the ``signals`` extra is
            not installed.
    """
    return summarize_checks(responses, check_rows(responses, signals=signals), rows)


def served_response(row: ScoredRow) -> ServedResponse:
    """The `ServedResponse` of an ok scored row (a row without a source counts as model).

    Raises:
        ValueError: the row is not ok (its request failed).
    """
    if not row.ok or row.fast_response is None:
        raise ValueError(f"row {row.id} has no answer: {row.error}")
    return ServedResponse(
        user_turn=row.triple.user_turn,
        main_response=row.triple.main_response,
        fast_response=row.fast_response,
        source=row.source or "model",
        id=row.id,
        personality=row.personality,
        session_id=row.session_id,
        latency_ms=row.latency_ms,
    )


def metrics_of_rows(rows: Sequence[ScoredRow]) -> AutoMetrics:
    """The metrics of an evaluation run's rows, from the checks stored in them.

    The ok rows are summarised with their stored ``row.checks`` (nothing is checked
    again, so the figures are those of the run); failed requests count in ``rows`` only.
    """
    ok = [row for row in rows if row.ok]
    return summarize_checks(
        [served_response(row) for row in ok], [row.checks for row in ok], len(rows)
    )


def served_from_replay(row: ReplayRow) -> ServedResponse:
    """The `ServedResponse` of an answered replay row (`service.replay.ReplayRow`), id
    ``{triple id}|{personality}`` like `adapters.eval_rows.row_id`.

    Raises:
        ValueError: the row is not answered (its request failed).
    """
    if not row.ok or row.fast_response is None or row.source is None:
        raise ValueError(f"row {row.triple.id} has no answer: {row.error}")
    return ServedResponse(
        user_turn=row.triple.user_turn,
        main_response=row.triple.main_response,
        fast_response=row.fast_response,
        source=row.source,
        id=row_id(row.triple.id, row.personality),
        personality=row.personality,
        session_id=row.session_id,
        latency_ms=row.latency_ms,
    )


def read_replay(path: Path) -> tuple[list[ServedResponse], int]:
    """The answered rows of a `fastresp replay --out` file (`served_from_replay`), and
    the count of all its rows (failed requests included).

    Raises:
        ReplayFileError: the file is missing or unreadable, or a line is not a replay row
            (``path:line: ...``; `service.replay.read_replay_rows`).
    """
    rows = read_replay_rows(path)
    return [served_from_replay(row) for row in rows if row.ok], len(rows)


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if percent else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def markdown_table(runs: Sequence[tuple[str, AutoMetrics]]) -> str:
    """A Markdown table with one column per run and one row per metric."""
    header = "| metric | " + " | ".join(name for name, _ in runs) + " |"
    rule = "|---|" + "---|" * len(runs)
    lines = [header, rule]

    def row(label: str, cells: Iterable[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("rows answered (ok / all)", (f"{m.ok} / {m.rows}" for _, m in runs))
    row("latency P50 (ms)", (_ms(m.latency_p50_ms) for _, m in runs))
    row("latency P95 (ms)", (_ms(m.latency_p95_ms) for _, m in runs))
    row("latency P99 (ms)", (_ms(m.latency_p99_ms) for _, m in runs))
    row("fallback rate", (_fmt(m.fallback_rate, True) for _, m in runs))
    row("cache rate", (_fmt(m.cache_rate, True) for _, m in runs))
    row("passes guard and filters", (_fmt(m.pass_rate, True) for _, m in runs))
    row(
        "leak rate",
        (f"{_fmt(m.leak_rate, True)} (of {m.leak_denominator})" for _, m in runs),
    )
    row(
        "contradiction: praise before a correction",
        (f"{_fmt(m.praise_before_correction, True)} (of {m.correction_rows})" for _, m in runs),
    )
    row("uptake mean (0-1)", (_fmt(m.uptake_mean) for _, m in runs))
    row(
        "uptake Q1 / median / Q3",
        (f"{_fmt(m.uptake_q1)} / {_fmt(m.uptake_median)} / {_fmt(m.uptake_q3)}" for _, m in runs),
    )
    row(
        "low uptake (below the low_uptake filter's threshold)",
        (
            f"{_fmt(m.low_uptake_rate, True)} (of {m.uptake_rows}"
            + ("" if m.low_uptake_threshold is None else f", < {m.low_uptake_threshold:g}")
            + ")"
            for _, m in runs
        ),
    )
    row(
        "tone mismatch rate",
        (f"{_fmt(m.tone_mismatch_rate, True)} (of {m.tone_rows})" for _, m in runs),
    )
    row(
        "repetition rate",
        (f"{_fmt(m.repetition_rate, True)} (of {m.repetition_denominator})" for _, m in runs),
    )
    row(
        "safety flags",
        (f"{m.safety_flags} ({_fmt(m.safety_flag_rate, True)})" for _, m in runs),
    )
    row("distinct-1", (_fmt(m.distinct_1) for _, m in runs))
    row("distinct-2", (_fmt(m.distinct_2) for _, m in runs))
    row("mean length (words)", (_fmt(m.mean_words) for _, m in runs))
    row("mean length (characters)", (_fmt(m.mean_chars) for _, m in runs))
    row(
        "most common opener",
        (
            f'"{m.top_opener}" {_fmt(m.top_opener_share, True)}' if m.top_opener else "n/a"
            for _, m in runs
        ),
    )
    names = sorted({name for _, m in runs for name in m.filter_failures})
    for name in names:
        row(f"fails `{name}`", (str(m.filter_failures.get(name, 0)) for _, m in runs))
    return "\n".join(lines)
