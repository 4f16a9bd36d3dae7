"""The LLM judge of an evaluation: two separate judgements of each fast response.

`fastresp eval run` (with a judge) and `fastresp eval calibrate` ask any
OpenAI-compatible chat endpoint for two judgements of every fast response, each with
its own versioned prompt file and its own request:

- **intent** (`adapters/prompts/judge-intent-v1.yaml`): the rubric issue 6 fixes, 1-5
  for how well the fast response understands and addresses the child's intent; the
  reply is ``{"intent_score", "reasoning", "intent_detected", "alignment_quality"}``.
- **bridging** (`adapters/prompts/judge-bridging-v1.yaml`): 1-5 for how well it leads
  into the main response without leaking, repeating or contradicting it; the reply is
  ``{"bridging_score", "reasoning", "leaks", "repeats", "contradicts"}``.

Both ask for the score first, so a reply cut off by ``max_tokens`` still has it.

How a run goes, as in the data pipeline (`adapters.teacher.label_with_teacher`): the
shared `adapters.llm_calls.ChatClient` (SDK retries off, tenacity retries on 429, 408,
5xx, timeouts and connection errors, structured output ``auto|on|off`` with the 400
fallback), a bounded queue feeding ``concurrency`` workers, and an append-only,
resumable ``judgements.jsonl`` (`adapters.labels.RowWriter`: one flushed and fsynced
line per judgement, a torn last line repaired, an id never written twice). One line is
a `JudgementRecord`, id ``{item id}|{kind}|{input sha[:16]}``, where the input SHA-256
(`judge_input_sha256`) covers the kind and every text the judge sees: an item whose
answer changed under the same id is a new input, judged again, and its old record
stays as history. `read_judgements` returns only the verdicts of the items' current
texts, so a verdict is never reused for a text it did not judge.

- A reply is parsed strictly (`parse_judgement`): safe repairs only, a score out of
  1-5 is rejected, never clamped. An unparsable reply **is** written (its verdict has
  no score and says why, with the reply's first 500 characters), so a re-run does not
  ask again: the judge answered, badly.
- A request that still fails after its retries is **not** written (counted in
  ``judge_errors`` and logged); a re-run retries it.
- 401, 403 or 404, or ``max_consecutive_errors`` failed requests in a row, stop the
  run with `JudgeUnavailable`; what was written stays, and a re-run resumes.

Before a run, `check_judge` asks ``GET /models`` once, without retries: a judge that
is down, refuses the key or does not serve the model fails in about a second instead
of after every request's backoff. `served_model` names the model of a server that
serves exactly one, for when none is given.

Calibration (`read_calibration_set`, `agreement`, `calibrate`): the hand-scored set in
``tests/data/judge_calibration.jsonl`` is judged like any run, and each judgement's
agreement with the hand scores is reported as exact agreement, within-1 agreement and
Spearman's rank correlation.

Only `openai`, `tenacity`, `httpx` (in `check_judge`, `served_model`), `scipy` (in
`agreement`), pydantic and the standard library are imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.eval_rows import (
    JUDGEMENT_KINDS,
    Agreement,
    Calibration,
    JudgeInfo,
    JudgementKind,
    Verdict,
)
from adapters.labels import RowWriter, read_jsonl_rows
from adapters.llm_calls import (
    FENCE,
    NO_PIKA_TURN,
    NOT_KNOWN,
    ChatClient,
    ChatEndpointConfig,
    ChatReply,
    PromptFile,
    find_json,
    public_url,
    read_prompt_file,
    resolve_api_key,
    run_chat_jobs,
)
from adapters.llm_calls import (  # re-exported: part of this module's API
    NO_API_KEY as NO_API_KEY,
)

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPT_FILES: dict[JudgementKind, Path] = {
    "intent": PROMPTS_DIR / "judge-intent-v1.yaml",
    "bridging": PROMPTS_DIR / "judge-bridging-v1.yaml",
}
"""The standard prompt of each judgement (see each file's header for its versioning)."""

DEFAULT_CALIBRATION_SET = (
    Path(__file__).resolve().parent.parent / "tests" / "data" / "judge_calibration.jsonl"
)
"""The hand-scored calibration set, in the repository's ``tests/data``."""

API_KEY_ENV_VARS: tuple[str, ...] = ("FASTRESP_JUDGE_API_KEY", "OPENAI_API_KEY")
"""Where `JudgeConfig.resolved_api_key` looks for a key, first one set wins."""

REPLY_EXCERPT_CHARS = 500
"""How much of an unparsable reply a record keeps, for debugging."""

PLACEHOLDERS: frozenset[str] = frozenset(
    {"personality", "pika_turn", "user_turn", "main_response", "fast_response"}
)
"""The placeholders each judge prompt's ``user`` template uses, exactly."""

SCORE_FIELDS: dict[JudgementKind, str] = {"intent": "intent_score", "bridging": "bridging_score"}
"""The reply field holding each judgement's 1-5 score."""
TEXT_FIELDS: dict[JudgementKind, tuple[str, ...]] = {
    "intent": ("reasoning", "intent_detected", "alignment_quality"),
    "bridging": ("reasoning",),
}
"""The string fields of each judgement's reply."""
FLAG_FIELDS: dict[JudgementKind, tuple[str, ...]] = {
    "intent": (),
    "bridging": ("leaks", "repeats", "contradicts"),
}
"""The boolean fields of each judgement's reply."""
ALIGNMENT_QUALITIES: tuple[str, ...] = ("perfect", "good", "adequate", "poor", "none")
"""``alignment_quality`` values, for scores 5 down to 1."""


class JudgePromptError(ValueError):
    """A judge prompt file is missing, not YAML, or lacks a field or placeholder."""


class JudgeUnavailable(RuntimeError):
    """The judge refuses every request (401, 403, 404: bad key, no permission, unknown
    model) or is down (`JudgeConfig.max_consecutive_errors` failures in a row)."""


class JudgementsFileError(ValueError):
    """The judgements file holds judgements by another judge model or prompt text, so
    resuming into it would mix two judges under one run."""


class CalibrationSetError(ValueError):
    """The calibration set is unreadable or a line is not a `CalibrationExample`; the
    message names ``path:line`` and the field."""


# --- configuration ------------------------------------------------------------------


def _default_prompt_files() -> dict[JudgementKind, Path]:
    return dict(DEFAULT_PROMPT_FILES)


class JudgeConfig(ChatEndpointConfig):
    """How to reach the judge model and how hard to drive it.

    The shared fields (``base_url``, ``model``, ``api_key``, ``concurrency``,
    ``max_tokens``, ``timeout_s``, ``max_retries``, ``max_consecutive_errors``,
    ``backoff_initial_s``, ``backoff_max_s``, ``structured_output``) and
    `resolved_api_key` are `adapters.llm_calls.ChatEndpointConfig`'s; the key's
    environment variables are `API_KEY_ENV_VARS`, and `max_consecutive_errors` failures
    in a row stop the run with `JudgeUnavailable`. ``model`` is required: when the user
    names none, resolve it first with `served_model`.
    """

    api_key_env_vars: ClassVar[tuple[str, ...]] = API_KEY_ENV_VARS
    label: ClassVar[str] = "judge"

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature: 0 so a judgement is as repeatable as the server allows."""
    prompt_files: dict[JudgementKind, Path] = Field(default_factory=_default_prompt_files)
    """The prompt file of each judgement; a kind left out uses its default."""

    def prompt_file(self, kind: JudgementKind) -> Path:
        """The prompt file used for `kind`."""
        return self.prompt_files.get(kind, DEFAULT_PROMPT_FILES[kind])


# --- checking the judge before a run --------------------------------------------------

CHECK_TIMEOUT_S = 10.0
"""Limit for the ``GET /models`` of `check_judge` and `served_model`, in seconds."""

LISTED_NAMES_SHOWN = 20
"""How many listed model names an error message shows (some APIs list hundreds)."""


def _listing(names: Sequence[str]) -> str:
    """`names` for a message: the first `LISTED_NAMES_SHOWN`, then how many more."""
    if not names:
        return "no model"
    shown = ", ".join(repr(name) for name in names[:LISTED_NAMES_SHOWN])
    more = len(names) - LISTED_NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _list_models(base_url: str, api_key: str, timeout_s: float) -> list[str] | None:
    """The model ids ``GET {base_url}/models`` lists; None when the server cannot tell.

    One request, no retries: a judge that is down is reported at once.

    Returns:
        The ``data[].id`` of a 200 answer; None ("cannot check") for a 404 or 405 (some
        OpenAI-compatible APIs have no /models), a 429 or other 4xx than 401/403, a
        redirect, or a 200 that is not a model list.

    Raises:
        JudgeUnavailable: connection refused, DNS failure, timeout (after `timeout_s`),
            401 or 403 (the key), or a 5xx.
    """
    import httpx

    url = base_url.rstrip("/") + "/models"
    shown = public_url(url)
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:  # connection refused, DNS, timeouts, bad scheme
        raise JudgeUnavailable(
            f"judge {shown} is unreachable: {type(exc).__name__}: {exc or 'no detail'}"
        ) from exc
    status = response.status_code
    if status in (401, 403):
        raise JudgeUnavailable(
            f"judge {shown} refused the API key ({status}); set {' or '.join(API_KEY_ENV_VARS)}"
        )
    if status >= 500:
        raise JudgeUnavailable(f"judge {shown} answered {status}: {response.text[:200]!r}")
    if status != 200:
        log.info("judge %s answered %d: its models cannot be checked", shown, status)
        return None
    try:
        data = response.json()["data"]
        names = [item["id"] for item in data]
    except (ValueError, KeyError, TypeError) as exc:
        log.info("judge %s: not a model list (%s): its models cannot be checked", shown, exc)
        return None
    if not all(isinstance(name, str) for name in names):
        log.info("judge %s: a model id is not a string: its models cannot be checked", shown)
        return None
    return names


def check_judge(config: JudgeConfig, *, timeout_s: float = CHECK_TIMEOUT_S) -> str:
    """Check that the judge is reachable and serves `config.model`, before a run.

    One ``GET {base_url}/models`` with the resolved key (``Authorization: Bearer``),
    no retries, within `timeout_s` (or `config.timeout_s` when shorter): a judge that
    is down fails here in about a second for a refused connection, instead of after
    every request's retries.

    Returns:
        The model name to use: `config.model`, when the server lists it or cannot
        tell (404 or 405 from /models, as some hosted APIs answer; a 429; a 200 that
        is not a model list).

    Raises:
        JudgeUnavailable: unreachable (refused, DNS, timeout), the key refused (401,
            403), a 5xx, or a model list that does not hold `config.model` (the
            message names the listed models).
    """
    names = _list_models(
        config.base_url, config.resolved_api_key(), min(timeout_s, config.timeout_s)
    )
    if names is None or config.model in names:
        return config.model
    raise JudgeUnavailable(
        f"judge {public_url(config.base_url)} does not serve model {config.model!r}; "
        f"it lists {_listing(names)}"
    )


def served_model(
    base_url: str, api_key: str | None = None, *, timeout_s: float = CHECK_TIMEOUT_S
) -> str:
    """The one model a judge server lists, for when no model is named.

    Args:
        base_url: The API root (``http://127.0.0.1:8100/v1``).
        api_key: The key; None: `API_KEY_ENV_VARS`, then none (as `JudgeConfig`).
        timeout_s: Limit for the request, in seconds.

    Raises:
        JudgeUnavailable: as `check_judge` (unreachable, key refused, 5xx).
        ValueError: the server lists no model or several (the message names them),
            or does not list its models at all: a model must be named.
    """
    key = resolve_api_key(api_key, API_KEY_ENV_VARS)
    names = _list_models(base_url, key, timeout_s)
    shown = public_url(base_url)
    if names is None:
        raise ValueError(f"the judge at {shown} does not list its models; name one")
    if len(names) != 1:
        raise ValueError(
            f"the judge at {shown} serves {len(names)} models ({_listing(names)}); name one"
        )
    return names[0]


# --- the prompts --------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeItem:
    """One fast response to judge, with what it answered."""

    id: str
    """Unique within a run (`adapters.eval_rows.row_id`: ``{triple id}|{personality}``)."""
    personality: str
    pika_turn: str | None
    user_turn: str
    main_response: str | None
    """None when it was not known (the prompt says "not known yet")."""
    fast_response: str


@dataclass(frozen=True)
class JudgePrompt(PromptFile):
    """A judge prompt: a fixed system message and a user-message template."""

    def messages(self, item: JudgeItem) -> list[dict[str, str]]:
        """The chat messages asking for a judgement of `item`."""
        return self.render(
            {
                "personality": item.personality,
                "pika_turn": item.pika_turn or NO_PIKA_TURN,
                "user_turn": item.user_turn,
                "main_response": item.main_response or NOT_KNOWN,
                "fast_response": item.fast_response,
            }
        )


def judge_input_sha256(item: JudgeItem, kind: JudgementKind) -> str:
    """SHA-256 (hex) of what one judgement judges: `kind` and `item`'s texts.

    The bytes hashed are the UTF-8 of the canonical JSON object with keys ``kind``,
    ``personality``, ``pika_turn``, ``user_turn``, ``main_response`` and
    ``fast_response`` (None as ``null``), keys sorted, no whitespace
    (``separators=(",", ":")``), non-ASCII written as is (``ensure_ascii=False``).
    The item id is not part of it: the same id with another text is another input.
    """
    canonical = json.dumps(
        {
            "kind": kind,
            "personality": item.personality,
            "pika_turn": item.pika_turn,
            "user_turn": item.user_turn,
            "main_response": item.main_response,
            "fast_response": item.fast_response,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_id(item: JudgeItem, kind: JudgementKind) -> str:
    """The id of one judgement of one input: ``{item id}|{kind}|{input sha[:16]}``
    (`judge_input_sha256`), so a changed text under the same item id is a new id."""
    return f"{item.id}|{kind}|{judge_input_sha256(item, kind)[:16]}"


def load_judge_prompts(config: JudgeConfig) -> dict[JudgementKind, JudgePrompt]:
    """Read and check the prompt file of every judgement kind
    (`adapters.llm_calls.read_prompt_file`).

    Raises:
        JudgePromptError: a file is unreadable, not a mapping, lacks a field, has a
            placeholder in ``system``, or ``user`` placeholders other than exactly
            `PLACEHOLDERS`; or two kinds share one file (each judgement has its own).
    """
    prompts = {
        kind: read_prompt_file(
            config.prompt_file(kind),
            JudgePrompt,
            PLACEHOLDERS,
            JudgePromptError,
            f"{kind} judge prompt file",
        )
        for kind in JUDGEMENT_KINDS
    }
    if prompts["intent"].sha256 == prompts["bridging"].sha256:
        raise JudgePromptError(
            f"{config.prompt_file('bridging')}: the intent and bridging judgements need "
            "different prompt files"
        )
    return prompts


def judgement_schema(kind: JudgementKind) -> dict[str, Any]:
    """The ``response_format`` asking for `kind`'s reply object, score first.

    Only keywords that OpenAI's strict structured outputs and vLLM's guided decoding
    (xgrammar) both accept: an integer ``enum`` 1-5, strings, a string ``enum`` for
    ``alignment_quality``, booleans; every property required, no others.
    """
    properties: dict[str, Any] = {
        SCORE_FIELDS[kind]: {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    }
    for name in TEXT_FIELDS[kind]:
        properties[name] = {"type": "string"}
    if kind == "intent":
        properties["alignment_quality"] = {"type": "string", "enum": list(ALIGNMENT_QUALITIES)}
    for name in FLAG_FIELDS[kind]:
        properties[name] = {"type": "boolean"}
    return {
        "type": "json_schema",
        "json_schema": {
            "name": f"{kind}_judgement",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
                "additionalProperties": False,
            },
        },
    }


# --- parsing and repair -------------------------------------------------------------


@dataclass(frozen=True)
class ParsedJudgement:
    """What a judge reply says, or why it is unusable.

    Attributes:
        score: The 1-5 score; None when `error` is set.
        reasoning: The judge's reasoning ('' when the reply had none); None on error.
        details: The other fields: ``intent_detected`` and ``alignment_quality``
            (strings) for intent; ``leaks``, ``repeats`` and ``contradicts`` (bool, or
            None when missing or not a boolean) for bridging.
        repairs: What was fixed to read it: ``code_fence``, ``surrounding_prose``,
            ``truncated_json``, ``renamed_field``, ``score_string``, ``score_float``,
            ``missing_field:<name>``.
        error: Why the reply is unusable (None when usable).
    """

    score: int | None
    reasoning: str | None
    details: dict[str, Any] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)
    error: str | None = None


_JSON_KEY = re.compile(r'\s*,?\s*"((?:[^"\\]|\\.)*)"\s*:\s*')
_JSON_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _salvage_truncated(text: str) -> dict[str, Any] | None:
    """The complete key-value pairs of an object cut off mid-reply, plus a string value
    cut off at the end (what it had so far); None when `text` has no ``{``.

    Only the flat objects the judge prompts ask for are read: values are strings,
    numbers, booleans or null; reading stops at anything else.
    """
    start = text.find("{")
    if start < 0:
        return None
    values: dict[str, Any] = {}
    position = start + 1
    while True:
        key_match = _JSON_KEY.match(text, position)
        if key_match is None:
            return values
        try:
            key = json.loads(f'"{key_match.group(1)}"')
        except json.JSONDecodeError:
            return values
        position = key_match.end()
        string = _JSON_STRING.match(text, position)
        if string is not None:
            try:
                values[key] = json.loads(string.group(0))
            except json.JSONDecodeError:
                return values
            position = string.end()
            continue
        if text.startswith('"', position):  # a string cut off: keep what it had
            partial = text[position:].rstrip("\\")
            with contextlib.suppress(json.JSONDecodeError):
                values[key] = json.loads(partial + '"')
            return values
        scalar = _JSON_SCALAR.match(text, position)
        if scalar is None:
            return values
        values[key] = json.loads(scalar.group(0))
        position = scalar.end()


def _score_value(name: str, value: Any, repairs: list[str]) -> tuple[int | None, str | None]:
    """The 1-5 score in `value`, or (None, why not). Never clamps."""
    shown = json.dumps(value)
    if isinstance(value, bool) or value is None:
        return None, f"{name} {shown} is not an integer 1-5"
    if isinstance(value, str):
        text = value.strip()
        number: float
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return None, f"{name} {shown} is not a number"
            if not math.isfinite(number) or not number.is_integer():
                return None, f"{name} {shown} is not a whole number"
        repairs.append("score_string")
        value = int(number)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None, f"{name} {shown} is not a whole number"
        repairs.append("score_float")
        value = int(value)
    if not isinstance(value, int):
        return None, f"{name} {shown} is not an integer 1-5"
    if not 1 <= value <= 5:
        return None, f"{name} {value} is outside 1-5"
    return value, None


def parse_judgement(kind: JudgementKind, text: str | None) -> ParsedJudgement:
    """The judgement in a judge reply, repaired when that is safe.

    Safe repairs: a code fence (``code_fence``) and prose around the JSON
    (``surrounding_prose``); the score as a string ``"4"`` (``score_string``) or a
    whole float ``4.0`` (``score_float``); the score under ``score`` instead of
    ``intent_score``/``bridging_score`` (``renamed_field``); a reply cut off (by
    ``max_tokens``) after the score (``truncated_json``: the complete fields are kept,
    a string cut off keeps what it had); a missing or non-string text field
    (``missing_field:<name>``, value ''); a missing or non-boolean bridging flag
    (``missing_field:<name>``, value None). Other keys are ignored.

    Rejected, with `error` naming the value: no JSON object, a reply cut off before
    its score, no score field, a score that is not a whole number (3.5, "four"), a
    boolean or null, or a whole number outside 1-5 (0, 6, -1: never clamped).

    Args:
        kind: Which judgement the reply answers.
        text: The reply's message content (None when the server sent none).

    Returns:
        A `ParsedJudgement`; `error` is set when the reply is unusable. Never raises.
    """
    if text is None or not text.strip():
        return ParsedJudgement(score=None, reasoning=None, error="empty reply")
    score_field = SCORE_FIELDS[kind]
    repairs: list[str] = []
    body = text.strip()
    fence = FENCE.search(body)
    if fence is not None:
        repairs.append("code_fence")
        if body[: fence.start()].strip() or body[fence.end() :].strip():
            repairs.append("surrounding_prose")
        body = fence.group(1).strip()
    found = find_json(body, (score_field, "score"))
    reply: dict[str, Any]
    if found is not None:
        decoded, surrounded = found
        if surrounded and "surrounding_prose" not in repairs:
            repairs.append("surrounding_prose")
        if not isinstance(decoded, dict):
            kind_name = "list" if isinstance(decoded, list) else type(decoded).__name__
            return ParsedJudgement(
                score=None,
                reasoning=None,
                repairs=repairs,
                error=f"reply is a JSON {kind_name}, not an object",
            )
        reply = decoded
    else:
        salvaged = _salvage_truncated(body)
        if salvaged is None:
            return ParsedJudgement(
                score=None, reasoning=None, repairs=repairs, error="no JSON object in the reply"
            )
        if score_field not in salvaged and "score" not in salvaged:
            return ParsedJudgement(
                score=None,
                reasoning=None,
                repairs=repairs,
                error=f"reply cut off before {score_field} (no complete JSON object)",
            )
        if body[: body.find("{")].strip() and "surrounding_prose" not in repairs:
            repairs.append("surrounding_prose")
        repairs.append("truncated_json")
        reply = salvaged
    if score_field in reply:
        raw_score = reply[score_field]
    elif "score" in reply:
        repairs.append("renamed_field")
        raw_score = reply["score"]
    else:
        keys = ", ".join(sorted(map(str, reply))) or "none"
        return ParsedJudgement(
            score=None,
            reasoning=None,
            repairs=repairs,
            error=f"no {score_field} field (keys: {keys})",
        )
    score, error = _score_value(score_field, raw_score, repairs)
    if error is not None:
        return ParsedJudgement(score=None, reasoning=None, repairs=repairs, error=error)
    texts: dict[str, str] = {}
    for name in TEXT_FIELDS[kind]:
        value = reply.get(name)
        if isinstance(value, str):
            texts[name] = value.strip()
        else:
            repairs.append(f"missing_field:{name}")
            texts[name] = ""
    details: dict[str, Any] = {name: texts[name] for name in TEXT_FIELDS[kind][1:]}
    for name in FLAG_FIELDS[kind]:
        flag = reply.get(name)
        if isinstance(flag, bool):
            details[name] = flag
        else:
            repairs.append(f"missing_field:{name}")
            details[name] = None
    return ParsedJudgement(
        score=score, reasoning=texts["reasoning"], details=details, repairs=repairs
    )


def verdict_of(kind: JudgementKind, parsed: ParsedJudgement) -> Verdict:
    """The `Verdict` for a parsed reply (``unparsable reply: <why>`` on error)."""
    return Verdict(
        kind=kind,
        score=parsed.score,
        reasoning=parsed.reasoning,
        details=parsed.details,
        error=None if parsed.error is None else f"unparsable reply: {parsed.error}",
        repairs=parsed.repairs,
    )


# --- the judgements file ------------------------------------------------------------


class JudgeCall(BaseModel):
    """Who judged, with which prompt, and what the request cost."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    base_url: str
    """Without user:password."""
    prompt_version: str
    prompt_sha256: str
    structured_output: bool
    """Whether this request was sent with ``response_format`` (and accepted)."""
    finish_reason: str | None
    """``stop``, or ``length`` when ``max_tokens`` cut the reply off."""
    prompt_tokens: int
    completion_tokens: int


class JudgementRecord(BaseModel):
    """One line of ``judgements.jsonl``: one judgement of one item."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """``{item id}|{kind}|{input_sha256[:16]}`` (`record_id`)."""
    item_id: str
    kind: JudgementKind
    input_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """`judge_input_sha256` of what was judged: a verdict is used only for this text."""
    verdict: Verdict
    judge: JudgeCall
    reply: str | None = None
    """The reply's first `REPLY_EXCERPT_CHARS` characters, only when it was unparsable."""


class JudgeRunSummary(BaseModel):
    """What one `judge_items` run did."""

    model_config = ConfigDict(extra="forbid")

    judged: int = 0
    """Judgements written by this run (scored + rejected)."""
    scored: int = 0
    """Written with a usable score."""
    rejected: int = 0
    """Written without a score: the reply was unparsable."""
    judge_errors: int = 0
    """Requests that failed after their retries: not written, a re-run retries them."""
    skipped_done: int = 0
    """Judgements of the same input (same `record_id`) already in the output file."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    structured_output: bool | None = None
    """Whether the server took ``response_format`` (None: unknown, nothing answered)."""


def read_judgements(
    path: Path, items: Sequence[JudgeItem]
) -> dict[tuple[str, JudgementKind], Verdict]:
    """The verdicts in a judgements file for `items` as they are now, by (item id, kind).

    A record counts only when its ``input_sha256`` is `judge_input_sha256` of the item
    with its id, for its kind: a verdict of an earlier text under the same id (history
    the file keeps) is not returned, so that item has no verdict until it is judged
    again. When two items share an id, the last one's texts count.

    Lines that are not a `JudgementRecord` (a torn last line, a line written before
    records had ``input_sha256``) are skipped; a missing file gives an empty dict.
    """
    expected: dict[tuple[str, JudgementKind], str] = {
        (item.id, kind): judge_input_sha256(item, kind)
        for item in items
        for kind in JUDGEMENT_KINDS
    }
    return {
        (record.item_id, record.kind): record.verdict
        for record in read_jsonl_rows(path, JudgementRecord)
        if expected.get((record.item_id, record.kind)) == record.input_sha256
    }


def used_structured_output(path: Path) -> bool | None:
    """Whether the judgements in `path` were asked for with ``response_format``: True
    when any was, False when all were asked without it, None when there are none (the
    run's own summary cannot tell after a resume that sent no request)."""
    flags = {record.judge.structured_output for record in read_jsonl_rows(path, JudgementRecord)}
    return True if True in flags else (False if flags else None)


def _check_same_judge(
    path: Path, config: JudgeConfig, prompts: Mapping[JudgementKind, JudgePrompt]
) -> None:
    """Refuse to resume into a file written by another judge model or prompt text."""
    for record in read_jsonl_rows(path, JudgementRecord):
        prompt = prompts[record.kind]
        if record.judge.model != config.model or record.judge.prompt_sha256 != prompt.sha256:
            raise JudgementsFileError(
                f"{path}: judgement {record.id!r} was made by model {record.judge.model!r} "
                f"with prompt {record.judge.prompt_version} ({record.judge.prompt_sha256[:12]}), "
                f"not {config.model!r} with {prompt.version} ({prompt.sha256[:12]}); "
                "write to a new folder to judge again"
            )


# --- the run ------------------------------------------------------------------------


_Job = tuple[JudgeItem, JudgementKind, str]
"""One request of `judge_items`: the item, the judgement and `judge_input_sha256`."""


async def judge_items(
    items: Iterable[JudgeItem],
    kinds: Sequence[JudgementKind],
    out: Path,
    config: JudgeConfig,
    *,
    progress: Callable[[], None] | None = None,
) -> JudgeRunSummary:
    """Judge every (item, kind) pair into `out` (resumable); one request per pair.

    Pairs whose `record_id` is already in `out` are skipped (``skipped_done``): only
    the same item id, kind and texts (`judge_input_sha256`) count as done, so an item
    whose text changed under the same id is judged again and its old record stays in
    `out` as history (`read_judgements` ignores it). The others go to
    `config.concurrency` workers; each record is appended, flushed and fsynced as soon
    as it is ready, so records are in completion order. A pair seen twice in the input
    (same record id) is judged once.

    Args:
        items: The responses to judge, read lazily (at most ``2 * concurrency`` pairs
            are held ahead).
        kinds: The judgements to make for each item (``intent``, ``bridging``).
        out: The judgements JSON Lines file, created or appended to.
        config: The judge endpoint and run settings.
        progress: Called once per pair finished: written, skipped as done, or failed.

    Returns:
        The summary; pairs that failed at the judge are counted in ``judge_errors``
        only.

    Raises:
        JudgeUnavailable: The server answered 401, 403 or 404 (bad key or model), or
            `config.max_consecutive_errors` requests in a row failed after their
            retries (the judge is down); the records written before stay in `out`.
        JudgePromptError: a prompt file is unusable (before anything is written).
        JudgementsFileError: `out` holds judgements by another model or prompt text.
    """
    prompts = load_judge_prompts(config)
    wanted = list(dict.fromkeys(kinds))
    summary = JudgeRunSummary()
    tick = progress if progress is not None else (lambda: None)
    _check_same_judge(out, config, prompts)
    client = ChatClient(config.endpoint(), logger=log)

    with RowWriter(out, JudgementRecord) as writer:
        already_done = set(writer.done)

        def jobs() -> Iterator[_Job]:
            scheduled: set[str] = set()
            for item in items:
                for kind in wanted:
                    input_sha256 = judge_input_sha256(item, kind)
                    rid = f"{item.id}|{kind}|{input_sha256[:16]}"  # record_id
                    if rid in already_done:
                        summary.skipped_done += 1
                        tick()
                        continue
                    if rid in scheduled:
                        continue
                    scheduled.add(rid)
                    yield item, kind, input_sha256

        def request(job: _Job) -> Awaitable[ChatReply]:
            item, kind, _ = job
            return client.complete(prompts[kind].messages(item), judgement_schema(kind))

        def on_error(job: _Job, exc: Exception) -> None:
            item, kind, input_sha256 = job
            summary.judge_errors += 1
            log.warning(
                "judge_error for %s (not written; a re-run retries it): %s: %s",
                f"{item.id}|{kind}|{input_sha256[:16]}",
                type(exc).__name__,
                exc,
            )
            tick()

        async def on_reply(job: _Job, reply: ChatReply) -> None:
            item, kind, input_sha256 = job
            prompt = prompts[kind]
            parsed = parse_judgement(kind, reply.content)
            record = JudgementRecord(
                id=f"{item.id}|{kind}|{input_sha256[:16]}",
                item_id=item.id,
                kind=kind,
                input_sha256=input_sha256,
                verdict=verdict_of(kind, parsed),
                judge=JudgeCall(
                    model=config.model,
                    base_url=client.base_url,
                    prompt_version=prompt.version,
                    prompt_sha256=prompt.sha256,
                    structured_output=reply.structured_output,
                    finish_reason=reply.finish_reason,
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                ),
                reply=None if parsed.error is None else (reply.content or "")[:REPLY_EXCERPT_CHARS],
            )
            await asyncio.to_thread(writer.write, record)
            summary.judged += 1
            if parsed.error is None:
                summary.scored += 1
            else:
                summary.rejected += 1
            summary.prompt_tokens += reply.prompt_tokens
            summary.completion_tokens += reply.completion_tokens
            tick()

        def refused(exc: Exception) -> JudgeUnavailable:
            return JudgeUnavailable(
                f"judge {client.base_url} refused model {config.model!r}: "
                f"{type(exc).__name__}: {exc}; the judgements written so far stay"
            )

        def down(failures: int, exc: Exception) -> JudgeUnavailable:
            return JudgeUnavailable(
                f"{failures} requests in a row failed at the judge {client.base_url} "
                f"after their retries (last: {type(exc).__name__}: {exc}); is it up? "
                "The judgements written so far stay; re-run the same command to resume"
            )

        try:
            await run_chat_jobs(
                jobs(),
                client=client,
                concurrency=config.concurrency,
                max_consecutive_errors=config.max_consecutive_errors,
                request=request,
                on_reply=on_reply,
                on_error=on_error,
                unavailable=JudgeUnavailable,
                refused=refused,
                down=down,
            )
        finally:
            summary.structured_output = client.structured
    return summary


def judge_info(config: JudgeConfig, structured: bool | None) -> JudgeInfo:
    """The `adapters.eval_rows.JudgeInfo` a run records for `config`.

    Args:
        config: The judge the run used.
        structured: `JudgeRunSummary.structured_output` of the run.

    Raises:
        JudgePromptError: a prompt file is unusable.
    """
    prompts = load_judge_prompts(config)
    return JudgeInfo(
        model=config.model,
        base_url=public_url(config.base_url),
        prompt_versions={kind: prompt.version for kind, prompt in prompts.items()},
        prompt_sha256={kind: prompt.sha256 for kind, prompt in prompts.items()},
        structured_output=structured,
    )


# --- calibration --------------------------------------------------------------------

HandScore = Annotated[int, Field(ge=1, le=5, strict=True)]
"""A hand score: an integer 1-5 (``true`` or ``"4"`` are refused)."""


class CalibrationExample(BaseModel):
    """One hand-scored example of ``tests/data/judge_calibration.jsonl``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    personality: str = Field(min_length=1)
    pika_turn: str | None
    user_turn: str = Field(min_length=1)
    main_response: str | None
    """None: not known yet (the bridging rubric has a rule for it)."""
    fast_response: str = Field(min_length=1)
    intent_score: HandScore
    intent_reason: str = Field(min_length=1)
    """Why the hand score is what it is (and not one more or less)."""
    bridging_score: HandScore
    bridging_reason: str = Field(min_length=1)

    def item(self) -> JudgeItem:
        """The example as a `JudgeItem` (same id)."""
        return JudgeItem(
            id=self.id,
            personality=self.personality,
            pika_turn=self.pika_turn,
            user_turn=self.user_turn,
            main_response=self.main_response,
            fast_response=self.fast_response,
        )

    def hand_score(self, kind: JudgementKind) -> int:
        return self.intent_score if kind == "intent" else self.bridging_score


def read_calibration_set(path: Path = DEFAULT_CALIBRATION_SET) -> list[CalibrationExample]:
    """Every example of a calibration set (JSON Lines), in file order.

    Raises:
        CalibrationSetError: unreadable, a line that is not JSON or not a
            `CalibrationExample` (``path:line: field: why``), an id seen twice, or no
            example at all.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationSetError(f"cannot read calibration set {path}: {exc}") from exc
    examples: list[CalibrationExample] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationSetError(f"{path}:{number}: not JSON: {exc}") from exc
        try:
            example = CalibrationExample.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "example"
            raise CalibrationSetError(f"{path}:{number}: {where}: {first['msg']}") from exc
        if example.id in seen:
            raise CalibrationSetError(f"{path}:{number}: id: {example.id!r} is used twice")
        seen.add(example.id)
        examples.append(example)
    if not examples:
        raise CalibrationSetError(f"{path}: no examples")
    return examples


def agreement(kind: JudgementKind, pairs: Sequence[tuple[int, int | None]]) -> Agreement:
    """How the judge's scores agree with the hand scores.

    Args:
        kind: The judgement the scores are for.
        pairs: (hand score, judge score), the judge score None when the judge gave
            none (the request failed or the reply was unparsable).

    Returns:
        ``examples`` = len(pairs); ``scored`` = pairs with a judge score; over those:
        ``exact`` = share with judge == hand, ``within_one`` = share with
        |judge - hand| <= 1, ``spearman`` = Spearman's rho (`scipy.stats.spearmanr`,
        ties get average ranks). Each None when nothing is scored; ``spearman`` also
        None with fewer than 2 scored pairs or when either side is constant (rho is
        undefined).
    """
    scored = [(hand, judge) for hand, judge in pairs if judge is not None]
    exact = within_one = spearman = None
    if scored:
        exact = sum(hand == judge for hand, judge in scored) / len(scored)
        within_one = sum(abs(hand - judge) <= 1 for hand, judge in scored) / len(scored)
    hands = [hand for hand, _ in scored]
    judges = [judge for _, judge in scored]
    if len(scored) >= 2 and len(set(hands)) > 1 and len(set(judges)) > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr(hands, judges).statistic)
        spearman = rho if math.isfinite(rho) else None
    return Agreement(
        kind=kind,
        examples=len(pairs),
        scored=len(scored),
        exact=exact,
        within_one=within_one,
        spearman=spearman,
    )


def _prepare_calibration(set_path: Path, work_dir: Path) -> str:
    """Create `work_dir`; the SHA-256 of `set_path`'s bytes."""
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return hashlib.sha256(set_path.read_bytes()).hexdigest()
    except OSError as exc:
        raise CalibrationSetError(f"cannot read calibration set {set_path}: {exc}") from exc


async def calibrate(
    examples: Sequence[CalibrationExample],
    config: JudgeConfig,
    work_dir: Path,
    *,
    set_path: Path = DEFAULT_CALIBRATION_SET,
    progress: Callable[[], None] | None = None,
) -> Calibration:
    """Judge every example for both judgements and measure agreement with the hands.

    The judgements go to ``work_dir/judgements.jsonl`` through `judge_items`, so an
    interrupted calibration resumes, and an edited set is judged again for the
    examples whose texts changed only (their old records stay, unused). An example
    the judge failed on (request failed after its retries, or unparsable reply) counts
    in ``examples`` but not ``scored``.

    Args:
        examples: The hand-scored examples (`read_calibration_set`).
        config: The judge.
        work_dir: Folder for ``judgements.jsonl`` (created).
        set_path: The file `examples` were read from (recorded with its SHA-256).
        progress: Called once per (example, judgement) finished.

    Raises:
        JudgeUnavailable, JudgePromptError, JudgementsFileError: as `judge_items`.
        CalibrationSetError: `set_path` is unreadable.
    """
    set_sha256 = await asyncio.to_thread(_prepare_calibration, set_path, work_dir)
    out = work_dir / "judgements.jsonl"
    items = [example.item() for example in examples]
    await judge_items(items, JUDGEMENT_KINDS, out, config, progress=progress)
    verdicts = read_judgements(out, items)
    agreements = []
    for kind in JUDGEMENT_KINDS:
        pairs: list[tuple[int, int | None]] = []
        for example in examples:
            verdict = verdicts.get((example.id, kind))
            pairs.append((example.hand_score(kind), verdict.score if verdict else None))
        agreements.append(agreement(kind, pairs))
    return Calibration(
        judge_model=config.model,
        judge_base_url=public_url(config.base_url),
        set_path=str(set_path),
        set_sha256=set_sha256,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        agreements=agreements,
        prompt_sha256={kind: prompt.sha256 for kind, prompt in load_judge_prompts(config).items()},
    )
