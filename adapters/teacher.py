"""Teacher labelling: a strong LLM proposes K candidate fast responses per triple.

`label_with_teacher` sends every (triple, personality) pair to an OpenAI-compatible
chat-completions endpoint (a vLLM server or a hosted API) with the standard prompt
(`adapters/prompts/teacher-v1.yaml`), parses the JSON reply, runs the candidates
through the text filters (`service.text_checks.select_candidate`) and, when given,
the signal filters (``low_uptake``, ``tone_mismatch``: `adapters.labels.SignalFilters`,
scored once per reply as one batch, the best candidate ranked by uptake), and appends
one `LabeledRow` per pair to a resumable JSON Lines file (`adapters.labels.LabelWriter`).

What a row records, beyond `adapters.labels.base_fields`:

- ``labeler`` "teacher" and ``prompt_version``, the prompt file's ``version``;
- ``status`` accepted (some candidate passed every filter: the best one is
  ``fast_response``, the other passing ones ``alternatives``) or rejected, with
  ``reason`` ``no_candidate_passed`` or ``unparsable_reply``;
- ``teacher``: ``{model, base_url, prompt_sha256, prompt_tokens, completion_tokens,
  structured_output, finish_reason, repairs}``, plus ``error`` and ``reply`` (its
  first 500 characters) when the reply was unparsable.

Failures:

- 429, 5xx, 408, timeouts and connection errors are retried with exponential backoff
  and jitter (tenacity; a ``Retry-After`` header is honoured up to the backoff cap).
  The SDK's own retries are off, so tenacity is the only retry loop.
- When a pair still fails after its retries, the server refuses that one request
  (another 4xx), or it answers 200 with something that is not a chat completion (an
  HTML page, a broken body: `MalformedResponse`), **no row is written**: the pair is
  counted in the summary's ``rejections["teacher_error"]`` (not in ``rows``) and
  logged, and a re-run retries it. A transient failure recorded as done would never
  be retried.
- 401, 403 and 404 (a bad key or an unknown model) fail every request alike, so the
  run stops with `TeacherUnavailable`; the rows written so far stay, and a re-run
  resumes.

Resuming: ids already in the output file are skipped (``skipped_done``); rows are
written one at a time, flushed and fsynced, so a killed run loses at most the pairs
in flight and never writes an id twice.

Only `openai`, `tenacity`, pydantic and the standard library are imported here (the
uptake model is loaded by the caller, `SignalFilters.load`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from adapters.labels import (
    LabeledRow,
    LabelSummary,
    LabelWriter,
    RejectedCandidate,
    SignalFilters,
    base_fields,
    select_with_signals,
)
from adapters.llm_calls import (
    FENCE,
    NO_PIKA_TURN,
    NOT_KNOWN,
    ChatClient,
    ChatEndpointConfig,
    ChatReply,
    PromptFile,
    find_json,
    read_prompt_file,
    run_chat_jobs,
)
from adapters.llm_calls import (  # re-exported: part of this module's API
    NO_API_KEY as NO_API_KEY,
)
from adapters.llm_calls import (
    MalformedResponse as MalformedResponse,  # re-exported: part of this module's API
)
from adapters.sources import Triple
from service.personalities import Personality
from service.text_checks import FilterLimits

log = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPT_FILE = PROMPTS_DIR / "teacher-v1.yaml"
"""The standard teacher prompt (see the file's header for its versioning rule)."""

API_KEY_ENV_VARS: tuple[str, ...] = ("FASTRESP_TEACHER_API_KEY", "OPENAI_API_KEY")
"""Where `TeacherConfig.resolved_api_key` looks for a key, first one set wins."""

REPLY_EXCERPT_CHARS = 500
"""How much of an unparsable reply a rejected row keeps, for debugging."""


class TeacherUnavailable(RuntimeError):
    """The teacher refuses every request (bad API key, no permission, unknown model)."""


class PromptFileError(ValueError):
    """The prompt file is missing, not YAML, or lacks a field or placeholder."""


# --- configuration ------------------------------------------------------------------


class TeacherConfig(ChatEndpointConfig):
    """How to reach the teacher model and how hard to drive it.

    The shared fields (``base_url``, ``model``, ``api_key``, ``concurrency``,
    ``max_tokens``, ``timeout_s``, ``max_retries``, ``max_consecutive_errors``,
    ``backoff_initial_s``, ``backoff_max_s``, ``structured_output``) and
    `resolved_api_key` are `adapters.llm_calls.ChatEndpointConfig`'s; the key's
    environment variables are `API_KEY_ENV_VARS`, and `max_consecutive_errors` failures
    in a row stop the run with `TeacherUnavailable`.
    """

    api_key_env_vars: ClassVar[tuple[str, ...]] = API_KEY_ENV_VARS
    label: ClassVar[str] = "teacher"

    k: int = Field(default=4, ge=1, le=16)
    """Candidates asked for per (triple, personality)."""
    temperature: float = Field(default=0.9, ge=0.0, le=2.0)
    """Sampling temperature: high enough that the K candidates differ."""
    prompt_file: Path = DEFAULT_PROMPT_FILE
    """The standard prompt file (its ``version`` goes into every row)."""


# --- the prompt ---------------------------------------------------------------------

PLACEHOLDERS: frozenset[str] = frozenset(
    {"k", "personality", "description", "style", "pika_turn", "user_turn", "main_response"}
)


@dataclass(frozen=True)
class TeacherPrompt(PromptFile):
    """The standard prompt: a fixed system message and a user-message template."""

    def messages(self, triple: Triple, personality: Personality, k: int) -> list[dict[str, str]]:
        """The chat messages asking for `k` candidates for `triple` in `personality`'s voice."""
        return self.render(
            {
                "k": str(k),
                "personality": personality.name,
                "description": personality.description,
                "style": personality.style,
                "pika_turn": triple.pika_turn or NO_PIKA_TURN,
                "user_turn": triple.user_turn,
                "main_response": triple.main_response or NOT_KNOWN,
            }
        )


def load_prompt(path: Path = DEFAULT_PROMPT_FILE) -> TeacherPrompt:
    """Read and check a teacher prompt file (`adapters.llm_calls.read_prompt_file`).

    Raises:
        PromptFileError: unreadable, not a mapping, a missing or empty field, an unknown
            placeholder, a placeholder in ``system``, or a missing one in ``user``.
    """
    return read_prompt_file(path, TeacherPrompt, PLACEHOLDERS, PromptFileError, "prompt file")


def candidates_schema(k: int) -> dict[str, Any]:
    """The ``response_format`` asking for ``{"candidates": [k strings]}``.

    Only keywords that OpenAI's strict structured outputs and vLLM's guided decoding
    (xgrammar) both accept are used; lengths are left to the filters.
    """
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "fast_response_candidates",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "candidates": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": k,
                        "maxItems": k,
                    }
                },
                "required": ["candidates"],
                "additionalProperties": False,
            },
        },
    }


# --- parsing and repair -------------------------------------------------------------

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_TEXT_KEYS = ("text", "fast_response", "response", "candidate", "content")
"""Keys whose string value is taken from an object item: [{"text": "Ooh!"}]."""
_SINGLE_KEYS = ("fast_response", "candidate", "response")
"""Keys holding one candidate when the reply has no "candidates" list."""


@dataclass(frozen=True)
class ParsedReply:
    """The candidates found in a teacher reply, or why there are none.

    Attributes:
        candidates: Non-empty, stripped, de-duplicated strings in reply order, at most
            the `k` asked for; empty when `error` is set.
        repairs: What was fixed to get them, e.g. ``code_fence``, ``surrounding_prose``,
            ``bare_list``, ``string_not_list``, ``renamed_field``, ``object_items``,
            ``dropped_items``, ``duplicates``, ``extra_candidates``, ``truncated_json``.
        error: Why the reply is unusable (None when usable).
    """

    candidates: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    error: str | None = None


def _salvage_truncated(text: str) -> list[str] | None:
    """Complete strings of a ``"candidates": [`` list cut off mid-reply (max_tokens)."""
    match = re.search(r'"candidates"\s*:\s*\[', text)
    if match is None:
        return None
    rest = text[match.end() :]
    items: list[str] = []
    position = 0
    while True:
        gap = re.match(r"\s*,?\s*", rest[position:])
        position += gap.end() if gap else 0
        string = _JSON_STRING.match(rest, position)
        if string is None:
            break
        try:
            items.append(json.loads(string.group(0)))
        except json.JSONDecodeError:
            break
        position = string.end()
    return items


def _candidates_value(value: Any, repairs: list[str]) -> tuple[Any, str | None]:
    """The candidates value inside a decoded JSON reply, or (None, why not)."""
    if isinstance(value, list):
        repairs.append("bare_list")
        return value, None
    if isinstance(value, str):
        repairs.append("string_not_list")
        return [value], None
    if not isinstance(value, dict):
        return None, f"reply is a JSON {type(value).__name__}, not an object"
    if "candidates" in value:
        return value["candidates"], None
    lists = [item for item in value.values() if isinstance(item, list)]
    if len(lists) == 1:
        repairs.append("renamed_field")
        return lists[0], None
    for key in _SINGLE_KEYS:
        if isinstance(value.get(key), str):
            repairs.append("renamed_field")
            return [value[key]], None
    keys = ", ".join(sorted(map(str, value))) or "none"
    return None, f"no 'candidates' field (keys: {keys})"


def parse_reply(text: str | None, k: int | None = None) -> ParsedReply:
    """Candidates from a teacher reply, repaired when that is safe.

    Safe repairs: code fences and prose around the JSON, a bare JSON list, a single
    string instead of a list, the list under another name when it is the object's only
    list, ``{"text": ...}`` items, dropping non-string, empty and duplicate items, more
    than `k` items (the first `k` are kept), and a reply cut off inside the candidates
    list (its complete strings are kept). Anything else is an error: no JSON, JSON
    that is not an object or list, an object with no usable field, or no candidate left.

    Args:
        text: The reply's message content (None when the server sent none).
        k: The number asked for; None keeps every candidate.

    Returns:
        A `ParsedReply`; `error` is set when the reply is unusable. Never raises.
    """
    if text is None or not text.strip():
        return ParsedReply(error="empty reply")
    repairs: list[str] = []
    body = text.strip()
    fence = FENCE.search(body)
    if fence is not None:
        repairs.append("code_fence")
        if body[: fence.start()].strip() or body[fence.end() :].strip():
            repairs.append("surrounding_prose")
        body = fence.group(1).strip()
    found = find_json(body, ("candidates",))
    if found is None:
        salvaged = _salvage_truncated(body)
        if not salvaged:
            return ParsedReply(repairs=repairs, error="no JSON object or list in the reply")
        repairs.append("truncated_json")
        raw: Any = salvaged
    else:
        decoded, surrounded = found
        if surrounded and "surrounding_prose" not in repairs:
            repairs.append("surrounding_prose")
        raw, error = _candidates_value(decoded, repairs)
        if error is not None:
            return ParsedReply(repairs=repairs, error=error)
    if isinstance(raw, str):
        repairs.append("string_not_list")
        raw = [raw]
    if not isinstance(raw, list):
        return ParsedReply(
            repairs=repairs, error=f"'candidates' is a {type(raw).__name__}, not a list"
        )
    candidates: list[str] = []
    seen: set[str] = set()
    for item in raw:
        if isinstance(item, dict):
            texts = [item[key] for key in _TEXT_KEYS if isinstance(item.get(key), str)]
            if not texts:
                _note(repairs, "dropped_items")
                continue
            _note(repairs, "object_items")
            item = texts[0]
        if not isinstance(item, str):
            _note(repairs, "dropped_items")
            continue
        candidate = " ".join(item.split())
        if not candidate:
            _note(repairs, "dropped_items")
            continue
        if candidate.casefold() in seen:
            _note(repairs, "duplicates")
            continue
        seen.add(candidate.casefold())
        candidates.append(candidate)
    if not candidates:
        return ParsedReply(repairs=repairs, error="no usable candidate (empty list)")
    if k is not None and len(candidates) > k:
        repairs.append("extra_candidates")
        candidates = candidates[:k]
    return ParsedReply(candidates=candidates, repairs=repairs)


def _note(repairs: list[str], repair: str) -> None:
    if repair not in repairs:
        repairs.append(repair)


# --- talking to the teacher ---------------------------------------------------------


TeacherReply = ChatReply
"""One successful chat completion (`adapters.llm_calls.ChatReply`)."""


class TeacherClient(ChatClient):
    """`adapters.llm_calls.ChatClient` set up from a `TeacherConfig`: the key resolved,
    ``response_format`` asking for `config.k` candidates, warnings under this module's
    logger."""

    def __init__(self, config: TeacherConfig) -> None:
        self.config = config
        super().__init__(
            config.endpoint(response_format=candidates_schema(config.k)),
            logger=log,
        )


# --- the labelling run --------------------------------------------------------------


def build_row(
    triple: Triple,
    personality: str,
    reply: TeacherReply,
    *,
    prompt: TeacherPrompt,
    config: TeacherConfig,
    base_url: str,
    limits: FilterLimits,
    signals: SignalFilters | None = None,
) -> LabeledRow:
    """The labelled row for one teacher reply: parsed, filtered and selected.

    The candidates go through the text filters, then (when `signals` is given) the
    signal filters, as one batch (`adapters.labels.select_with_signals`).
    """
    parsed = parse_reply(reply.content, config.k)
    teacher: dict[str, Any] = {
        "model": config.model,
        "base_url": base_url,
        "prompt_sha256": prompt.sha256,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "structured_output": reply.structured_output,
        "finish_reason": reply.finish_reason,
        "repairs": parsed.repairs,
    }
    fields = base_fields(triple, personality) | {
        "labeler": "teacher",
        "prompt_version": prompt.version,
    }
    if parsed.error is not None:
        teacher["error"] = parsed.error
        teacher["reply"] = (reply.content or "")[:REPLY_EXCERPT_CHARS]
        return LabeledRow(
            **fields,
            status="rejected",
            fast_response=None,
            reason="unparsable_reply",
            teacher=teacher,
        )
    selection = select_with_signals(
        parsed.candidates,
        user_turn=triple.user_turn,
        main_response=triple.main_response,
        limits=limits,
        signals=signals,
    )
    rejected = [
        RejectedCandidate(text=text, reasons=list(reasons)) for text, reasons in selection.rejected
    ]
    return LabeledRow(
        **fields,
        status="accepted" if selection.best is not None else "rejected",
        fast_response=selection.best,
        alternatives=list(selection.alternatives),
        rejected=rejected,
        reason=None if selection.best is not None else "no_candidate_passed",
        teacher=teacher,
    )


async def label_with_teacher(
    triples: Iterable[Triple],
    personalities: Sequence[Personality],
    out: Path,
    config: TeacherConfig,
    *,
    limits: FilterLimits | None = None,
    signals: SignalFilters | None = None,
    progress: Callable[[], None] | None = None,
) -> LabelSummary:
    """Label every (triple, personality) pair with the teacher into `out` (resumable).

    Pairs whose row id is already in `out` are skipped (``skipped_done``). The others
    go to `config.concurrency` workers; each row is appended and flushed as soon as it
    is ready, so rows are in completion order, not input order. A pair seen twice in
    the input (same triple id and personality) is labelled once.

    Args:
        triples: The triples, read lazily (at most ``2 * concurrency`` are held ahead).
        personalities: Each triple is labelled once per personality.
        out: The labelled JSON Lines file, created or appended to.
        config: The teacher endpoint and run settings.
        limits: Filter limits for `select_candidate`; None: the defaults.
        signals: The signal filters (``low_uptake``, ``tone_mismatch``), loaded once by
            the caller (`SignalFilters.load`); None: text filters only. Each reply's
            candidates are scored as one batch, off the event loop.
        progress: Called once per pair finished: written, skipped as done, or failed.

    Returns:
        The summary. ``rows`` counts written rows; pairs that failed at the teacher
        are not written and are counted in ``rejections["teacher_error"]`` only.

    Raises:
        TeacherUnavailable: The server answered 401, 403 or 404 (bad key or model),
            or `config.max_consecutive_errors` pairs in a row failed after their
            retries (the teacher is down); the rows written before stay in `out`.
        PromptFileError: `config.prompt_file` is unusable (before anything is written).
    """
    prompt = load_prompt(config.prompt_file)
    filter_limits = limits if limits is not None else FilterLimits()
    people = list({p.name: p for p in personalities}.values())
    summary = LabelSummary()
    tick = progress if progress is not None else (lambda: None)
    client = TeacherClient(config)

    with LabelWriter(out) as writer:
        already_done = set(writer.done)

        def jobs() -> Iterator[tuple[Triple, Personality]]:
            scheduled: set[str] = set()
            for triple in triples:
                for personality in people:
                    fields = base_fields(triple, personality.name)
                    row_id = fields["id"]
                    if row_id in already_done:
                        summary.skipped_done += 1
                        tick()
                        continue
                    if row_id in scheduled:
                        continue
                    scheduled.add(row_id)
                    yield triple, personality

        def request(job: tuple[Triple, Personality]) -> Awaitable[ChatReply]:
            triple, personality = job
            return client.complete(prompt.messages(triple, personality, config.k))

        def on_error(job: tuple[Triple, Personality], exc: Exception) -> None:
            triple, personality = job
            summary.rejections["teacher_error"] = summary.rejections.get("teacher_error", 0) + 1
            log.warning(
                "teacher_error for %s|%s (not written; a re-run retries it): %s: %s",
                triple.id,
                personality.name,
                type(exc).__name__,
                exc,
            )
            tick()

        async def on_reply(job: tuple[Triple, Personality], reply: ChatReply) -> None:
            triple, personality = job
            row = await asyncio.to_thread(
                build_row,
                triple,
                personality.name,
                reply,
                prompt=prompt,
                config=config,
                base_url=client.base_url,
                limits=filter_limits,
                signals=signals,
            )
            await asyncio.to_thread(writer.write, row)
            summary.count(row)
            summary.prompt_tokens += reply.prompt_tokens
            summary.completion_tokens += reply.completion_tokens
            tick()

        def refused(exc: Exception) -> TeacherUnavailable:
            return TeacherUnavailable(
                f"teacher {client.base_url} refused model {config.model!r}: "
                f"{type(exc).__name__}: {exc}"
            )

        def down(failures: int, exc: Exception) -> TeacherUnavailable:
            return TeacherUnavailable(
                f"{failures} pairs in a row failed at the teacher {client.base_url} after "
                f"their retries (last: {type(exc).__name__}: {exc}); is it up? The rows "
                "written so far stay; re-run the same command to resume"
            )

        await run_chat_jobs(
            jobs(),
            client=client,
            concurrency=config.concurrency,
            max_consecutive_errors=config.max_consecutive_errors,
            request=request,
            on_reply=on_reply,
            on_error=on_error,
            unavailable=TeacherUnavailable,
            refused=refused,
            down=down,
        )
    return summary
