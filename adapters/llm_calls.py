"""What the teacher (`adapters.teacher`), the GRPO judge (`adapters.rewards`) and the
evaluation judge (`adapters.judge`) share.

All ask an OpenAI-compatible chat endpoint with a versioned prompt file and retry
transient failures with tenacity; the rules for that live here once:

- **Prompt files** (`read_prompt_file`): YAML with non-empty strings ``version``,
  ``system`` and ``user``; ``system`` has no ``{{placeholder}}`` (it is the shared
  prefix a server can cache) and ``user`` uses exactly the caller's placeholders.
  The file's sha256 identifies the exact text. Each caller keeps its own files,
  placeholders, error type and message wording.
- **Retries** (`is_retryable`, `backoff_wait`): 429, 408, 5xx, timeouts and
  connection errors are retried, never another 4xx; the wait doubles per retry from
  an initial value, plus up to 1 s of jitter, is capped, and honours a server's
  ``Retry-After`` up to the cap.
- **The configuration** (`ChatEndpointConfig`): the fields every caller's config has
  (where the endpoint is, which model, the key and where else to find it, how hard to
  drive it); `TeacherConfig` and `JudgeConfig` subclass it with their own fields,
  defaults and key environment variables.
- **The chat client** (`ChatClient`, configured by a `ChatEndpoint`): one
  ``AsyncOpenAI`` with the SDK's own retries off (tenacity is the one retry loop), the
  structured-output decision of a run (``response_format`` ``on``, ``off`` or ``auto``:
  tried, and dropped for the rest of the run when the server answers 400 to it but not
  to the same request without it), and `MalformedResponse` for a 200 body that is not a
  chat completion. `public_url` strips user:password before a URL is logged or written.
- **The worker pool** (`run_chat_jobs`): one request per job from N workers, a
  bounded queue fed lazily, a run stopped by the caller's "unavailable" error on a
  401/403/404 or after too many failures in a row, other endpoint failures counted by
  the caller and not written, and the replies handed to the caller one at a time.
- **Finding JSON in a reply** (`FENCE`, `json_values`, `find_json`): code fences and
  prose around the JSON that models add despite being told not to.

`openai` is imported inside the functions that need it: importing this module stays
cheap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

log = logging.getLogger(__name__)

NOT_KNOWN = "not known yet"
"""The main response as a prompt shows it when there is none."""
NO_PIKA_TURN = "none (the conversation starts here)"
"""Pika's previous turn as a prompt shows it when there is none."""

NO_API_KEY = "EMPTY"
"""Sent when no key is configured: a local vLLM server needs none, the SDK needs a value."""

PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
"""A ``{{name}}`` placeholder of a prompt file's ``user`` template."""


@dataclass(frozen=True)
class PromptFile:
    """A checked prompt file: a fixed system message and a user-message template."""

    version: str
    sha256: str
    """SHA-256 (hex) of the prompt file's bytes."""
    system: str
    user_template: str

    def render(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """The chat messages: the system message, and the user template with each
        ``{{name}}`` replaced by ``values[name]``."""
        user = PLACEHOLDER.sub(lambda match: values[match.group(1)], self.user_template)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


P = TypeVar("P", bound=PromptFile)


def read_prompt_file(
    path: Path,
    kind: type[P],
    placeholders: frozenset[str],
    error: type[Exception],
    what: str,
) -> P:
    """Read and check a prompt file (``version``, ``system``, ``user``).

    Args:
        path: The YAML file.
        kind: The `PromptFile` class to return.
        placeholders: The exact set of placeholders ``user`` must use.
        error: The exception raised for every problem.
        what: How the read-error message names the file (``prompt file``).

    Raises:
        error: unreadable (``cannot read <what> <path>: ...``), not a mapping, a missing
            or empty field, a placeholder in ``system``, or ``user`` placeholders other
            than exactly `placeholders` (each message starts with the path).
    """
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping with version, system and user")
    fields: dict[str, str] = {}
    for name in ("version", "system", "user"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise error(f"{path}: '{name}' must be a non-empty string")
        fields[name] = value
    if PLACEHOLDER.search(fields["system"]):
        raise error(f"{path}: 'system' must have no placeholders (shared prefix)")
    used = set(PLACEHOLDER.findall(fields["user"]))
    if used != placeholders:
        unknown = ", ".join(sorted(used - placeholders)) or "none"
        missing = ", ".join(sorted(placeholders - used)) or "none"
        raise error(f"{path}: 'user' placeholders: unknown {unknown}; missing {missing}")
    return kind(
        version=fields["version"].strip(),
        sha256=hashlib.sha256(data).hexdigest(),
        system=fields["system"],
        user_template=fields["user"],
    )


def is_retryable(exc: BaseException) -> bool:
    """429, 408, 5xx, timeouts and connection errors; never other 4xx."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    return False


def backoff_wait(retry_state: Any, initial_s: float, max_s: float) -> float:
    """Seconds to wait before the next attempt (a tenacity ``wait`` body).

    Exponential backoff from `initial_s` (doubling per attempt) plus up to 1 s of
    jitter, or the server's ``Retry-After`` when longer; both capped at `max_s`.
    """
    import openai

    attempt = max(1, retry_state.attempt_number)
    delay: float = min(max_s, initial_s * 2 ** (attempt - 1))
    delay = min(max_s, delay + random.uniform(0, min(1.0, delay)))
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    if isinstance(exc, openai.APIStatusError):
        header = exc.response.headers.get("retry-after")
        try:
            after = float(header) if header is not None else None
        except ValueError:
            after = None
        if after is not None and after >= 0:
            delay = min(max_s, max(delay, after))
    return delay


def is_fatal(exc: BaseException) -> bool:
    """401, 403, 404: the key, the permission or the model is wrong for every request."""
    import openai

    return isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403, 404)


def is_api_error(exc: BaseException) -> bool:
    """A failure of the endpoint for one request (an `openai.APIError` after its retries,
    or a `MalformedResponse`), as opposed to a bug in the caller."""
    import openai

    return isinstance(exc, openai.APIError | MalformedResponse)


def public_url(url: str) -> str:
    """`url` without user:password, safe to write into rows and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_http_url(value: str) -> str:
    """`value` when it is an http:// or https:// URL with something after the scheme.

    Raises:
        ValueError: otherwise (a pydantic field validator turns it into a field error).
    """
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8100/v1")
    return value


# --- finding JSON in a reply ----------------------------------------------------------

FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:\n?[ \t]*```|\Z)", re.DOTALL)
"""A Markdown code fence (```json ... ```); an unclosed one runs to the end of the text."""


def json_values(text: str) -> Iterator[tuple[Any, int, int]]:
    """Every JSON object or array in `text` that decodes, with its (start, end) offsets."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
        if not starts:
            return
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        yield value, start, end
        position = end


def find_json(text: str, keys: tuple[str, ...] = ()) -> tuple[Any, bool] | None:
    """The JSON value in `text` and whether prose surrounded it; None when there is none.

    A whole-text parse wins; otherwise the first object holding one of `keys`, else the
    first object or array found.
    """
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        pass
    found = list(json_values(text))
    for value, _, _ in found:
        if isinstance(value, dict) and any(key in value for key in keys):
            return value, True
    if found:
        return found[0][0], True
    return None


# --- the chat client ------------------------------------------------------------------

StructuredMode = Literal["auto", "on", "off"]
"""``response_format`` with a JSON schema: ``on`` always, ``off`` never, ``auto`` tries
it and drops it for the rest of the run if the server refuses it (400)."""


class MalformedResponse(RuntimeError):
    """A 200 response that is not a chat completion (not JSON, an HTML page, no message
    object): a proxy or server fault, so the request counts as failed at the endpoint
    (not written, retried by a re-run), never a crash of the run."""


class ChatEndpoint(BaseModel):
    """What `ChatClient` needs: where the endpoint is and how to ask it.

    Callers build it with `ChatEndpointConfig.endpoint`, which also resolves the API
    key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(min_length=1)
    """OpenAI-compatible API root, e.g. ``http://127.0.0.1:8100/v1``."""
    model: str = Field(min_length=1)
    """Model name as the server knows it (vLLM: its ``--served-model-name``)."""
    api_key: str
    """The key sent (``EMPTY`` for a local server that needs none)."""
    temperature: float = Field(ge=0.0, le=2.0)
    max_tokens: int = Field(ge=1)
    """Longest reply, in tokens."""
    timeout_s: float = Field(gt=0.0)
    """Limit for one HTTP request, in seconds; a timeout is retried."""
    max_retries: int = Field(ge=0)
    """Retries after the first attempt (429, 408, 5xx, timeouts, connection errors)."""
    backoff_initial_s: float = Field(gt=0.0)
    backoff_max_s: float = Field(gt=0.0)
    structured_output: StructuredMode
    response_format: dict[str, Any] | None = None
    """Sent as ``response_format`` when structured output is used, unless a call gives
    its own (`ChatClient.complete`); None: no schema for calls that give none."""
    label: str = "endpoint"
    """How log lines name the endpoint's role (``teacher``, ``judge``)."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)


def resolve_api_key(
    api_key: SecretStr | str | None,
    env_vars: tuple[str, ...],
    environ: Mapping[str, str] | None = None,
) -> str:
    """The key to send: `api_key` when given, else the first of `env_vars` set (non-empty)
    in `environ` (default: the process environment), else `NO_API_KEY`."""
    if api_key is not None:
        return api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    env = os.environ if environ is None else environ
    for name in env_vars:
        if env.get(name):
            return env[name]
    return NO_API_KEY


class ChatEndpointConfig(BaseModel):
    """What every caller's config of an OpenAI-compatible chat endpoint has.

    A subclass (`adapters.teacher.TeacherConfig`, `adapters.judge.JudgeConfig`) adds
    its own fields, may redeclare a field to change its default (the teacher samples
    at 0.9, the judge at 0.0), and sets `api_key_env_vars` and `label`. `endpoint`
    turns a config into the `ChatEndpoint` a `ChatClient` takes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env_vars: ClassVar[tuple[str, ...]] = ("OPENAI_API_KEY",)
    """Where `resolved_api_key` looks for a key when none is configured, first set wins."""
    label: ClassVar[str] = "endpoint"
    """How log lines and errors name the endpoint's role (``teacher``, ``judge``)."""

    base_url: str = Field(min_length=1)
    """OpenAI-compatible API root, e.g. ``http://127.0.0.1:8100/v1`` or
    ``https://api.openai.com/v1``."""
    model: str = Field(min_length=1)
    """Model name as the server knows it (vLLM: its ``--served-model-name``)."""
    api_key: SecretStr | None = None
    """API key; None: the first of `api_key_env_vars` that is set, else none."""
    concurrency: int = Field(default=4, ge=1, le=256)
    """Requests in flight at once."""
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """Sampling temperature."""
    max_tokens: int = Field(default=256, ge=1, le=8192)
    """Longest reply, in tokens."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Limit for one HTTP request, in seconds; a timeout is retried."""
    max_retries: int = Field(default=5, ge=0, le=50)
    """Retries after the first attempt, on 429, 5xx, 408, timeouts, connection errors."""
    max_consecutive_errors: int = Field(default=8, ge=1)
    """Stop the run (the caller's "unavailable" error) after this many requests in a
    row failed after their retries: an endpoint that is down is detected in about two
    backoff cycles instead of failing every item of the input one by one."""
    backoff_initial_s: float = Field(default=1.0, gt=0.0)
    """First backoff wait, seconds; it doubles per retry, plus up to 1 s of jitter."""
    backoff_max_s: float = Field(default=30.0, gt=0.0)
    """Longest backoff wait, seconds (also caps a server's Retry-After)."""
    structured_output: StructuredMode = "auto"
    """``response_format`` with a JSON schema: ``on`` always, ``off`` never, ``auto``
    tries it and, if the server answers 400 to it but not to the same request without
    it, drops it for the rest of the run."""

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return check_http_url(value)

    def resolved_api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key to send: the configured one, else the first of `api_key_env_vars`
        set in `environ` (default: the process environment), else "EMPTY"."""
        return resolve_api_key(self.api_key, self.api_key_env_vars, environ)

    def endpoint(self, response_format: dict[str, Any] | None = None) -> ChatEndpoint:
        """The `ChatEndpoint` for this config (key resolved now), labelled `label`.

        Args:
            response_format: The endpoint's default ``response_format`` (None: calls
                give their own, or none).
        """
        return ChatEndpoint(
            base_url=self.base_url,
            model=self.model,
            api_key=self.resolved_api_key(),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            structured_output=self.structured_output,
            response_format=response_format,
            label=self.label,
        )


@dataclass(frozen=True)
class ChatReply:
    """One successful chat completion."""

    content: str | None
    prompt_tokens: int
    completion_tokens: int
    structured_output: bool
    """Whether this request was sent with ``response_format`` (and accepted)."""
    finish_reason: str | None


class ChatClient:
    """Chat completions against one OpenAI-compatible endpoint, with retries.

    Holds the structured-output decision for the run (`structured`): None while
    unknown (auto mode, nothing answered yet), True once the server took the schema,
    False once it refused it. One client serves a whole run (one connection pool);
    `close` it at the end. `logger` (default: this module's) gets the fallback warning,
    so it appears under the caller's logger name.
    """

    def __init__(self, endpoint: ChatEndpoint, logger: logging.Logger | None = None) -> None:
        from openai import AsyncOpenAI

        self.endpoint = endpoint
        self._log = logger if logger is not None else log
        self.base_url = public_url(endpoint.base_url)
        self._client = AsyncOpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key,
            timeout=endpoint.timeout_s,
            max_retries=0,  # tenacity is the one retry loop
        )
        self.structured: bool | None = {"on": True, "off": False, "auto": None}[
            endpoint.structured_output
        ]

    async def close(self) -> None:
        await self._client.close()

    async def complete(
        self, messages: list[dict[str, str]], response_format: dict[str, Any] | None = None
    ) -> ChatReply:
        """One reply for `messages`, retried on transient errors.

        `response_format` (default: the endpoint's) is sent while structured output is
        on or not yet refused; with neither, the request has no schema. The
        structured-output decision is the client's, shared by every schema it sends.
        In auto mode a 400 to a request with ``response_format`` is retried once
        without it; if that succeeds the schema is dropped for the rest of the run,
        if it fails too the 400 is the request's own and is raised.

        Raises:
            openai.APIError: after the retries (or at once for a non-retryable status).
            MalformedResponse: a 200 whose body is not a chat completion.
        """
        import openai

        schema = response_format if response_format is not None else self.endpoint.response_format
        use_schema = self.structured is not False and schema is not None
        try:
            reply = await self._with_retries(messages, schema if use_schema else None)
        except openai.BadRequestError:
            if not use_schema or self.endpoint.structured_output != "auto":
                raise
            reply = await self._with_retries(messages, None)
            if self.structured is None:
                self._log.warning(
                    "%s %s refused response_format json_schema (400); "
                    "using plain JSON instructions for the rest of the run",
                    self.endpoint.label,
                    self.base_url,
                )
            self.structured = False
            return reply
        if use_schema and self.structured is None:
            self.structured = True
        return reply

    async def _with_retries(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None
    ) -> ChatReply:
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.endpoint.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            reraise=True,
        ):
            with attempt:
                return await self._once(messages, schema)
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    def _wait(self, retry_state: Any) -> float:
        """Exponential backoff with jitter, or the server's Retry-After, both capped."""
        return backoff_wait(
            retry_state, self.endpoint.backoff_initial_s, self.endpoint.backoff_max_s
        )

    async def _once(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None
    ) -> ChatReply:
        extra: dict[str, Any] = {}
        if schema is not None:
            extra["response_format"] = schema
        try:
            response = await self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=self.endpoint.temperature,
                max_tokens=self.endpoint.max_tokens,
                **extra,
            )
        except json.JSONDecodeError as exc:  # a JSON content type with a broken body
            raise MalformedResponse(f"response body is not JSON: {exc}") from exc
        # The SDK does not validate a 200 body: a text/html page comes back as a str,
        # and fields may hold anything, so the shape is checked here.
        try:
            choices = response.choices
            if not isinstance(choices, list):  # absent ({}), or not a list
                raise TypeError("no choices list")
            choice = choices[0] if choices else None
            content = choice.message.content if choice is not None else None
            finish_reason = choice.finish_reason if choice is not None else None
            usage = response.usage
            prompt_tokens = int(usage.prompt_tokens) if usage is not None else 0
            completion_tokens = int(usage.completion_tokens) if usage is not None else 0
        except (AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise MalformedResponse(
                f"response is not a chat completion: {str(response)[:200]!r}"
            ) from exc
        if content is not None and not isinstance(content, str):
            raise MalformedResponse(f"message content is a {type(content).__name__}, not text")
        return ChatReply(
            content=content,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            structured_output=schema is not None,
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        )


# --- the worker pool ------------------------------------------------------------------

J = TypeVar("J")
E = TypeVar("E", bound=Exception)


async def run_chat_jobs(
    jobs: Iterable[J],
    *,
    client: ChatClient,
    concurrency: int,
    max_consecutive_errors: int,
    request: Callable[[J], Awaitable[ChatReply]],
    on_reply: Callable[[J, ChatReply], Awaitable[None]],
    on_error: Callable[[J, Exception], None],
    unavailable: type[E],
    refused: Callable[[Exception], E],
    down: Callable[[int, Exception], E],
) -> None:
    """Send one request per job from `concurrency` workers; close `client` at the end.

    `jobs` is read lazily by one producer (at most ``2 * concurrency`` jobs are held
    ahead), so a generator that skips done or repeated jobs runs as the pool drains.
    The teacher's labelling and the judge's evaluation both run on this.

    Args:
        jobs: The work, in order; each is passed to `request` once.
        client: The client `request` uses; closed when the run ends, however it ends.
        concurrency: Workers, hence requests in flight at once.
        max_consecutive_errors: Failed jobs in a row (after their retries) that stop
            the run with `down`.
        request: The chat call for a job (e.g. ``client.complete(messages, schema)``).
        on_reply: Handles a successful reply (builds and writes its row). Awaited
            under one lock: calls never overlap, so it may append to one file.
        on_error: Counts and logs a job whose request failed at the endpoint (an
            `is_api_error` exception that is not `is_fatal`); the job is not written.
        unavailable: The type `refused` and `down` return.
        refused: The error for a 401, 403 or 404 (the key or model is wrong).
        down: The error for `max_consecutive_errors` failures in a row, given their
            count and the last one.

    Raises:
        E: From `refused` or `down`, chained to the API error (the first one when
            several workers stop at once); what `on_reply` wrote before stays.
        Exception: any other exception of `request` or `on_reply` (a bug), in an
            ExceptionGroup.
    """
    queue: asyncio.Queue[tuple[J] | None] = asyncio.Queue(maxsize=2 * concurrency)
    reply_lock = asyncio.Lock()
    failures_in_a_row = 0

    async def produce() -> None:
        for job in jobs:
            await queue.put((job,))
        for _ in range(concurrency):
            await queue.put(None)

    async def work() -> None:
        nonlocal failures_in_a_row
        while (entry := await queue.get()) is not None:
            (job,) = entry
            try:
                reply = await request(job)
            except Exception as exc:
                if is_fatal(exc):
                    raise refused(exc) from exc
                if not is_api_error(exc):
                    raise
                on_error(job, exc)
                failures_in_a_row += 1
                if failures_in_a_row >= max_consecutive_errors:
                    raise down(failures_in_a_row, exc) from exc
                continue
            failures_in_a_row = 0
            async with reply_lock:
                await on_reply(job, reply)

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(concurrency):
                group.create_task(work())
    except* unavailable as errors:
        first = errors.exceptions[0]
        raise first from first.__cause__
    finally:
        await client.close()
