"""Labelled rows: the output of `fastresp data label`, and its resumable JSON Lines file.

A *labelled row* is one (triple, personality) pair with the fast responses a labeller
proposed for it, after the text filters (`service.text_checks`)::

    {"id": "<triple id>|<personality>", "triple_id": str, "source": str,
     "lesson_id": str | null, "pika_turn": str | null, "user_turn": str,
     "main_response": str | null,          # as given to the model (tutor-openers strip the opener)
     "personality": str, "labeler": "teacher" | "tutor-openers",
     "prompt_version": str,                 # e.g. "teacher-v1", "tutor-openers-v1"
     "status": "accepted" | "rejected",
     "fast_response": str | null,           # the best passing candidate; null when rejected
     "alternatives": [str],                 # the other passing candidates
     "rejected": [{"text": str, "reasons": [str]}],   # candidates that failed, by filter name
     "reason": str | null,                  # why the row was rejected (below), else null
     "teacher": {...} | null}               # teacher model, base URL, token usage

Row-level rejection reasons: ``no_candidate_passed`` (every candidate failed a filter),
``no_opener`` (tutor-openers: the main response does not open with a short
acknowledgement), ``unparsable_reply`` and ``teacher_error`` (teacher labeller; the
detail goes in ``teacher``).

Candidate rejection reasons (``rejected[].reasons``) are filter names. First the text
filters of `service.text_checks.FILTERS`; among them ``no_contradiction`` is the
**praise-before-correction** filter: a candidate that praises the answer ("Great job!")
while the main response corrects the child ("Not quite...") is rejected under that name.
Then, on the candidates that passed every text filter, the signal filters
(`SIGNAL_FILTERS`, `SignalFilters`; issue 9), which need no judge model:

==============  ======================================================================
name            fails when
==============  ======================================================================
low_uptake      the uptake score (`adapters.signals.uptake`: does the response build
                on what the child said, 0-1, fitted to human ratings) is below
                ``LOW_UPTAKE``: "Okay." after "I saw a big red fire truck!"
tone_mismatch   `adapters.signals.tone.check_tone` flags it: an exuberant reply to a
                sad, scared or hurt child, or a gloomy one to a happy child
==============  ======================================================================

A candidate that fails a text filter is not scored by the signals, so its reasons are
text-filter names only. `fastresp data label` runs both signal filters for the teacher
labeller and only ``tone_mismatch`` for tutor-openers: a tutor's opener is a short
acknowledgement ("Close!", "Good try!") that takes up nothing by design, and on Bridge
train + Uptake (2,664 triples) ``low_uptake`` rejected 560 of the 571 openers that pass
the text filters (measured with the first uptake model: quartiles 0.33 / 0.35 / 0.37
against its ``LOW_UPTAKE`` 0.447; the current model scores "Close!" 0.29-0.34 and "Good
try!" 0.33-0.34 against 0.417). ``--no-signal-filters`` turns the signal filters off
(then passing candidates are ranked by `text_checks.select_candidate`'s rule alone).

Known limit of ``low_uptake``: a child's turn with nothing to take up ("um", "I don't
know") gives every reply a low score ("Take your time." 0.31 after "um"), so such turns tend to
lose all their candidates.

Rejected rows are written too, so a re-run knows they are done and the summary can
count them. `LabelWriter` appends one row per line and flushes it, so a killed run
loses at most the rows in flight; `done_ids` reads a file back (ignoring a torn last
line) so a re-run skips what is done and never writes an id twice. The writer itself
is `RowWriter`, for any pydantic row with a string ``id``; the evaluation judge's
``judgements.jsonl`` (`adapters.judge`) uses it too.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.sources import Triple
from service.text_checks import FilterLimits, Selection, select_candidate

if TYPE_CHECKING:
    from adapters.signals.uptake import UptakeScorer

Labeler = Literal["teacher", "tutor-openers"]
"""The labellers `fastresp data label --labeler` offers."""

LABELERS: tuple[str, ...] = ("teacher", "tutor-openers")


class RejectedCandidate(BaseModel):
    """A candidate fast response and the names of the filters it failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str
    reasons: list[str] = Field(min_length=1)


class LabeledRow(BaseModel):
    """One (triple, personality) pair with its chosen fast response (see module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    triple_id: str
    source: str
    lesson_id: str | None
    pika_turn: str | None
    user_turn: str
    main_response: str | None
    personality: str
    labeler: Labeler
    prompt_version: str
    status: Literal["accepted", "rejected"]
    fast_response: str | None
    alternatives: list[str] = Field(default_factory=list)
    rejected: list[RejectedCandidate] = Field(default_factory=list)
    reason: str | None = None
    teacher: dict[str, Any] | None = None


def row_id(triple_id: str, personality: str) -> str:
    """The labelled row's id: stable for the same triple and personality."""
    return f"{triple_id}|{personality}"


def base_fields(triple: Triple, personality: str) -> dict[str, Any]:
    """The row fields a labeller copies from `triple` (main_response as in the triple)."""
    return {
        "id": row_id(triple.id, personality),
        "triple_id": triple.id,
        "source": triple.source,
        "lesson_id": triple.lesson_id,
        "pika_turn": triple.pika_turn,
        "user_turn": triple.user_turn,
        "main_response": triple.main_response,
        "personality": personality,
    }


class IdRow(Protocol):
    """A row `RowWriter` can write: a pydantic model with a string ``id``."""

    @property
    def id(self) -> str: ...

    def model_dump_json(self) -> str: ...

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray) -> Self: ...


R = TypeVar("R", bound=IdRow)


def read_jsonl_rows(path: Path, row_type: type[R]) -> Iterator[R]:
    """The valid `row_type` rows of a JSON Lines file, in file order.

    A line that is not a valid row (a torn last line of a killed run) is skipped.
    A missing file yields nothing.
    """
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                yield row_type.model_validate_json(line)
            except ValidationError:
                continue


M = TypeVar("M", bound=BaseModel)


def read_jsonl_strict(path: Path, row_type: type[M], error: type[Exception], what: str) -> list[M]:
    """Every row of a JSON Lines file that must be whole (an input, not a resumable
    output): blank lines are skipped, anything else must be a valid `row_type`.

    Args:
        what: The file's kind, e.g. ``replay file``: ``cannot read replay file <path>``,
            ``<path>:<line>: not a replay row``.

    Raises:
        error: the file is missing or unreadable (``cannot read <what> <path>: ...``) or a
            line is not a `row_type` (``<path>:<line>: not a <kind> row: <field>: <msg>``,
            the kind being `what` without a trailing " file").
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    rows: list[M] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(row_type.model_validate_json(line))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "row"
            kind = what.removesuffix(" file")
            raise error(f"{path}:{number}: not a {kind} row: {where}: {first['msg']}") from exc
    return rows


def read_rows(path: Path) -> Iterator[LabeledRow]:
    """The valid rows of a labelled JSON Lines file, in file order.

    A line that is not a valid row (a torn last line of a killed run) is skipped.
    A missing file yields nothing.
    """
    return read_jsonl_rows(path, LabeledRow)


def done_ids(path: Path) -> set[str]:
    """Ids of the rows already in `path` (empty when the file does not exist)."""
    return {row.id for row in read_rows(path)}


class RowWriter(Generic[R]):
    """Appends rows to a JSON Lines file, one flushed (and fsynced) line each.

    Opening repairs a torn last line left by a killed run (the partial line is cut
    off, so the next row starts on a line of its own) and reads the ids already
    there (`done`; lines that are not a valid `row_type` are ignored). `write`
    refuses an id already in the file or written before, so a re-run never
    duplicates a row.

    Raises:
        ValueError: `write` of an id that is already done.
    """

    def __init__(self, path: Path, row_type: type[R]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self.done: set[str] = {row.id for row in read_jsonl_rows(path, row_type)}
        self._file = path.open("a", encoding="utf-8")

    def write(self, row: R) -> None:
        if row.id in self.done:
            raise ValueError(f"row {row.id!r} is already in {self.path}")
        self._file.write(row.model_dump_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(row.id)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LabelWriter(RowWriter[LabeledRow]):
    """A `RowWriter` of `LabeledRow`s (see `RowWriter`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, LabeledRow)


def _cut_torn_tail(path: Path) -> None:
    """Truncate `path` after its last newline when the final line is incomplete JSON."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    last_newline = data.rfind(b"\n")
    tail = data[last_newline + 1 :]
    try:
        json.loads(tail)
    except ValueError:
        with path.open("r+b") as file:
            file.truncate(last_newline + 1)
        return
    with path.open("ab") as file:  # a complete last row without its newline
        file.write(b"\n")


class LabelSummary(BaseModel):
    """What one `fastresp data label` run did (printed at the end, and by tests).

    `rejections` counts by reason: filter names for rejected candidates, plus the
    row-level reasons (``no_candidate_passed``, ``no_opener``, ``unparsable_reply``,
    ``teacher_error``). `acceptance_rate` is accepted rows / labelled rows this run.
    """

    model_config = ConfigDict(extra="forbid")

    rows: int = 0
    """Rows labelled and written by this run (accepted + rejected)."""
    accepted: int = 0
    rejected: int = 0
    skipped_done: int = 0
    """Rows already in the output file from an earlier run, not labelled again."""
    candidates: int = 0
    """Candidate fast responses seen (the teacher's K per row; 1 per row for tutor-openers)."""
    candidates_passed: int = 0
    rejections: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.rows if self.rows else 0.0

    def count(self, row: LabeledRow) -> None:
        """Add one written row to the totals."""
        self.rows += 1
        if row.status == "accepted":
            self.accepted += 1
        else:
            self.rejected += 1
        if row.reason is not None:
            self.rejections[row.reason] = self.rejections.get(row.reason, 0) + 1
        passed = (1 if row.fast_response is not None else 0) + len(row.alternatives)
        self.candidates += passed + len(row.rejected)
        self.candidates_passed += passed
        for candidate in row.rejected:
            for reason in candidate.reasons:
                self.rejections[reason] = self.rejections.get(reason, 0) + 1


# --- the signal filters (issue 9) -----------------------------------------------------

SIGNAL_FILTERS: tuple[str, ...] = ("low_uptake", "tone_mismatch")
"""Names of the signal filters, in check order; applied after the text filters."""

SIGNALS_EXTRA = "signals"
"""The pyproject extra that installs the uptake model (``pipeline``, ``train`` and
``eval`` include it too)."""


class SignalsUnavailable(RuntimeError):
    """The uptake model cannot be loaded: the ``signals`` extra is not installed."""


def load_uptake_scorer() -> UptakeScorer:
    """The process's uptake scorer (`adapters.signals.uptake.default_scorer`, loaded once
    per process and cached there: about 3 s and 90 MB the first time).

    Raises:
        SignalsUnavailable: sentence-transformers or the model package is missing; the
            message names the ``signals`` extra and the pip command.
    """
    try:
        from adapters.signals.uptake import default_scorer

        return default_scorer()
    except ImportError as exc:
        raise SignalsUnavailable(
            f"the uptake signal needs the {SIGNALS_EXTRA!r} extra ({exc}); install it with "
            f"pip install -e '.[{SIGNALS_EXTRA}]' (the pipeline, train and eval extras "
            "include it), or turn the signal filters off with --no-signal-filters"
        ) from exc


@dataclass(frozen=True)
class SignalVerdict:
    """The signals of one candidate (`SignalFilters.check`)."""

    uptake: float | None
    """Uptake score in [0, 1]; None when the uptake filter is off."""
    tone_mismatch: str | None
    """`adapters.signals.tone.tone_mismatch`'s reason; None when the tone fits (or the
    tone filter is off)."""
    failed: list[str]
    """The signal filters it fails, in `SIGNAL_FILTERS` order ([] when it passes)."""


@dataclass
class SignalFilters:
    """The signal filters of the data pipeline: ``low_uptake`` and ``tone_mismatch``.

    One instance per labelling run holds the uptake model (`load`), so the model is
    loaded once; `check` scores a batch of (user turn, candidate) pairs in one model
    call. Calls from several threads are serialised (one model, one lock).

    Attributes:
        scorer: The uptake scorer; None turns the ``low_uptake`` filter off.
        low_uptake: A candidate whose uptake is below this fails ``low_uptake``
            (default: `adapters.signals.uptake.LOW_UPTAKE`, set by `load`).
        tone: Whether the ``tone_mismatch`` filter runs.
    """

    scorer: UptakeScorer | None
    low_uptake: float = 0.0
    tone: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, *, uptake: bool = True, tone: bool = True) -> SignalFilters:
        """Both filters (or the ones asked for), with the uptake model loaded now.

        Raises:
            SignalsUnavailable: `uptake` is on and the ``signals`` extra is missing.
        """
        if not uptake:
            return cls(scorer=None, tone=tone)
        scorer = load_uptake_scorer()
        from adapters.signals.uptake import LOW_UPTAKE

        return cls(scorer=scorer, low_uptake=LOW_UPTAKE, tone=tone)

    def check(self, pairs: Sequence[tuple[str, str]]) -> list[SignalVerdict]:
        """The verdict of each (user turn, candidate) pair, in order, in one batch.

        Args:
            pairs: (what the child said, candidate fast response); may be empty.

        Returns:
            One `SignalVerdict` per pair.
        """
        if not pairs:
            return []
        scores: list[float | None] = [None] * len(pairs)
        if self.scorer is not None:
            with self._lock:
                scores = list(self.scorer.score_many(list(pairs)))
        mismatches: list[str | None] = [None] * len(pairs)
        if self.tone:
            from adapters.signals.tone import tone_mismatch

            mismatches = [tone_mismatch(turn, text) for turn, text in pairs]
        verdicts = []
        for score, mismatch in zip(scores, mismatches, strict=True):
            failed = []
            if score is not None and score < self.low_uptake:
                failed.append("low_uptake")
            if mismatch is not None:
                failed.append("tone_mismatch")
            verdicts.append(SignalVerdict(uptake=score, tone_mismatch=mismatch, failed=failed))
        return verdicts


def select_with_signals(
    candidates: Sequence[str],
    *,
    user_turn: str,
    main_response: str | None,
    limits: FilterLimits,
    signals: SignalFilters | None,
) -> Selection:
    """`service.text_checks.select_candidate`, then the signal filters on its passing
    candidates (one batch), then the ranking.

    Without `signals` this is `select_candidate` itself (passing candidates that reuse a
    content word of the child come first, `text_checks.picks_up_child`). With them, a
    passing candidate that fails a signal filter moves to ``rejected`` with the signal
    names, and the rest are ranked by uptake score, highest first (ties keep the
    labeller's order; with the uptake filter off, the text-checks order is kept).
    Uptake replaces the word-overlap rule because it is a graded score checked against
    human uptake ratings, and repeated content words are one of its features, so it
    also tells a candidate that merely repeats a word from one that builds on it.

    Returns:
        The `Selection`; ``rejected`` stays in input order, text-filter and signal
        rejections together.
    """
    selection = select_candidate(
        candidates, user_turn=user_turn, main_response=main_response, limits=limits
    )
    if signals is None:
        return selection
    passing = [c for c in (selection.best, *selection.alternatives) if c is not None]
    verdicts = signals.check([(user_turn, text) for text in passing])
    checked = list(zip(passing, verdicts, strict=True))
    signal_rejects = {text: verdict.failed for text, verdict in checked if verdict.failed}
    kept = [(text, verdict) for text, verdict in checked if not verdict.failed]
    if signals.scorer is not None:
        order = {text.strip(): i for i, text in reversed(list(enumerate(candidates)))}
        kept.sort(key=lambda item: (-(item[1].uptake or 0.0), order.get(item[0], 0)))
    ranked = [text for text, _ in kept]
    text_failed = {text for text, _ in selection.rejected}
    text_rejects = iter(selection.rejected)
    rejected: list[tuple[str, list[str]]] = []
    for raw in candidates:
        text = raw.strip()
        if text in text_failed:
            rejected.append(next(text_rejects))
        elif text in signal_rejects:
            rejected.append((text, signal_rejects.pop(text)))
    return Selection(best=ranked[0] if ranked else None, alternatives=ranked[1:], rejected=rejected)
