"""The rows an evaluation run writes and reads: one `ScoredRow` per answered request.

`fastresp eval run` (`adapters.eval_run`) sends every (triple, personality) pair to the
service, checks each answer with the automatic metrics (`adapters.auto_metrics`), asks
the LLM judge (`adapters.judge`) for its two judgements, and writes one `ScoredRow` per
pair to ``rows.jsonl`` in the run folder. The report (`adapters.eval_report`) and the
comparison of two runs (`adapters.eval_compare`) read nothing else per row, so a run
can be re-reported or compared long after the service and the judge are gone.

Only pydantic and the standard library are imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.sources import Triple

JudgementKind = Literal["intent", "bridging"]
"""The two judgements: ``intent`` (does the response understand and address what the
child meant, rubric 1-5) and ``bridging`` (does it lead into the main response without
leaking, repeating or contradicting it, 1-5)."""

JUDGEMENT_KINDS: tuple[JudgementKind, ...] = ("intent", "bridging")

JUDGE_ERROR_PREFIX = "judge_error"
JUDGE_ERROR = (
    f"{JUDGE_ERROR_PREFIX}: the judge request failed after its retries; a re-run asks again"
)
"""`Verdict.error` of an answer the judge has no verdict for (its request failed after
the retries, so nothing was stored): counted as failed, not rejected."""

ACCURATE_MIN_SCORE = 4
"""An intent score at or above this counts as accurate ("judged accuracy")."""


def row_id(triple_id: str, personality: str) -> str:
    """The id of one evaluated pair: ``{triple id}|{personality}``."""
    return f"{triple_id}|{personality}"


class Verdict(BaseModel):
    """One judgement of one fast response.

    `score` is None when the judge failed (`error` says why: the request failed after
    its retries, or the reply had no usable score); the row is then left out of the
    judged figures and counted as rejected.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: JudgementKind
    score: int | None = Field(default=None, ge=1, le=5)
    reasoning: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    """The judgement's other fields: ``intent_detected`` and ``alignment_quality`` for
    intent; ``leaks``, ``repeats`` and ``contradicts`` (bools) for bridging."""
    error: str | None = None
    repairs: list[str] = Field(default_factory=list)
    """What was fixed in the reply to read it (``code_fence``, ``score_string``...)."""


class RowChecks(BaseModel):
    """The automatic (no-LLM) checks of one answer (`adapters.auto_metrics.check_rows`).

    A check that does not apply is None: every text check of a fallback row or a failed
    request (the text is not the model's), ``leak`` without a main response,
    ``praise_before_correction`` when the main response does not correct the child,
    ``repeats_in_session`` for the first answer of its (session, personality). The
    signal checks (``uptake``, ``tone_fit``, ``tone_mismatch``) are None too in rows
    scored before they existed, so older ``rows.jsonl`` files still read.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    failed_filters: list[str] = Field(default_factory=list)
    """`service.text_checks.failed_filters` of the model text, in FILTERS order."""
    passes: bool | None = None
    """The model text passes the guard and every filter; False for a fallback row."""
    leak: bool | None = None
    praise_before_correction: bool | None = None
    safety_flag: bool | None = None
    """The model text fails ``kid_safe`` (a rude, scary or unsafe word)."""
    repeats_in_session: bool | None = None
    """The same text (case and punctuation ignored) was answered in one of the previous
    4 turns of the same (session, personality): the same answer twice within 5 turns."""
    words: int | None = None
    chars: int | None = None
    uptake: float | None = None
    """Uptake score of the model text in [0, 1] (`adapters.signals.uptake`: how much it
    builds on what the child said)."""
    tone_fit: bool | None = None
    """True when the model text's tone fits the child's turn, False on a tone mismatch
    (`adapters.signals.tone.check_tone`)."""
    tone_mismatch: str | None = None
    """The mismatch's name when ``tone_fit`` is False (e.g.
    ``exuberant_to_upset_child``), else None."""


class ScoredRow(BaseModel):
    """One evaluated (triple, personality) pair: what was sent, answered and judged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """`row_id(triple.id, personality)`."""
    triple: Triple
    personality: str
    session_id: str
    fast_response: str | None = None
    """None when the request failed (`error`)."""
    source: str | None = None
    """The service's ``source``: ``model``, ``cache`` or ``fallback``; None on error."""
    adapter_version: str | None = None
    latency_ms: float | None = None
    """The service's own ``latency_ms`` (time spent in the gateway), milliseconds."""
    error: str | None = None
    """Why the request failed (``HTTP 503: ...``, ``ConnectError: ...``)."""
    checks: RowChecks = Field(default_factory=RowChecks)
    intent: Verdict | None = None
    """None when the run had no judge."""
    bridging: Verdict | None = None

    @property
    def ok(self) -> bool:
        """The service answered (any source)."""
        return self.error is None and self.fast_response is not None

    def verdict(self, kind: JudgementKind) -> Verdict | None:
        return self.intent if kind == "intent" else self.bridging


class RowsFileError(ValueError):
    """A rows file is unreadable or a line is not a `ScoredRow`; the message names both."""


def read_scored_rows(path: Path) -> list[ScoredRow]:
    """Every row of a ``rows.jsonl`` file, in file order.

    Raises:
        RowsFileError: the file is missing or unreadable, or a line is not a `ScoredRow`
            (``path:line: ...``).
    """
    from adapters.labels import read_jsonl_strict

    return read_jsonl_strict(path, ScoredRow, RowsFileError, "scored-rows file")


# --- what a run records besides its rows (``run.json``) -------------------------------


class Agreement(BaseModel):
    """How one judgement agrees with the hand scores of the calibration set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: JudgementKind
    examples: int
    """Calibration examples sent to the judge."""
    scored: int
    """Examples the judge gave a usable score (the figures below are over these)."""
    exact: float | None
    """Share of scored examples where judge score == hand score; None when none scored."""
    within_one: float | None
    """Share where |judge score - hand score| <= 1."""
    spearman: float | None
    """Spearman's rank correlation of judge and hand scores (`scipy.stats.spearmanr`);
    None when fewer than 2 examples scored or either side is constant."""


class Calibration(BaseModel):
    """`fastresp eval calibrate`'s result (its ``--json`` file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    judge_model: str
    judge_base_url: str
    set_path: str
    set_sha256: str
    created: str
    """ISO 8601 UTC time of the calibration run."""
    agreements: list[Agreement]
    prompt_sha256: dict[str, str] = Field(default_factory=dict)
    """Judgement kind -> SHA-256 of the judge prompt file calibrated (empty in files
    written before it was recorded): a calibration vouches for these prompts only."""


class JudgeInfo(BaseModel):
    """The judge a run used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    base_url: str
    """Without user:password."""
    prompt_versions: dict[str, str]
    """Judgement kind -> the prompt file's ``version``."""
    prompt_sha256: dict[str, str]
    structured_output: bool | None
    """Whether the server took ``response_format`` (None: unknown, nothing answered)."""


class RunInfo(BaseModel):
    """What an evaluation run was: written to ``run.json`` beside ``rows.jsonl``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """The run's label in reports and comparisons (default: the run folder's name)."""
    created: str
    """ISO 8601 UTC time the run finished."""
    command: str
    """The command line that produced it."""
    machine: str
    """Where the service ran, as far as the run can tell (hostname, CPUs, GPU)."""
    target: str
    """What answered: the service URL, ``in-process`` or the responses file read."""
    triples: str
    """The triples file (or source) and how many pairs were sent."""
    judge: JudgeInfo | None = None
    """None when no judge was set."""
    calibration: Calibration | None = None
    """The judge's calibration, when one was given (`fastresp eval calibrate --json`)."""
