"""The fast-response service: prompt, engine call under a deadline, guard, fallback.

Routes call `FastResponseService.respond`; everything between the wire schema and
the engine happens here.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import AbstractContextManager, aclosing
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fastapi import BackgroundTasks

from service.child_safety import NEUTRAL_ACKNOWLEDGEMENTS, TurnSafety, describe_turn, inspect_turn
from service.engine import Engine, GenerationRequest, GenerationResult
from service.errors import EngineError, EngineUnavailable, UnknownPersonality
from service.guard import check_tone_fit, clean_fast_response
from service.metrics import BASE_VERSION, Metrics
from service.personalities import Personality
from service.prompts import PromptMode, Turn, build_prompt
from service.schemas import FastResponseRequest, FastResponseResponse
from service.session_state import ResponseCache, SessionMemory, cache_key, repeats, said_ago
from service.streaming import (
    REPEATED,
    DoneEvent,
    ErrorEvent,
    StreamEvent,
    StreamGuard,
    TokenEvent,
)

if TYPE_CHECKING:
    from service.adapter_registry import ActiveAdapter

logger = logging.getLogger(__name__)


#: Longest one warm-up generation may take before startup fails (the first gemma-3-270m
#: generation on two busy cores took 10.9 s).
WARM_UP_TIMEOUT_S = 300.0

#: Generations per request: a guard rejection is sampled again once, within the deadline.
GENERATION_ATTEMPTS = 2

#: The first neutral acknowledgement (`child_safety.NEUTRAL_ACKNOWLEDGEMENTS`, served in
#: turn): after an unsafe child turn, and with the tone guard on when every fallback
#: phrase of the personality would clash with the child's mood. No sentiment words, so
#: it is neither exuberant nor gloomy and fits any child (`adapters.signals.tone`).
NEUTRAL_FALLBACK = NEUTRAL_ACKNOWLEDGEMENTS[0]


class FallbackReason(StrEnum):
    """Why a fallback phrase was served (a bounded metrics label)."""

    DEADLINE = "deadline"
    ENGINE_ERROR = "engine_error"
    GUARD = "guard"
    REPEAT = "repeat"
    UNSAFE_INPUT = "unsafe_input"


class AdapterLookup(Protocol):
    """Where the service finds each personality's adapter (`AdapterRegistry`)."""

    def active(self, name: str) -> ActiveAdapter | None:
        """The adapter serving `name` now; None for the base model."""
        ...

    def lease(
        self, name: str, session: str | None = None
    ) -> AbstractContextManager[ActiveAdapter | None]:
        """Hold the adapter serving `session` of `name` now, for one request (not
        unloaded until released; with a canary running, the session picks the version)."""
        ...


class FastResponseService:
    """Answers one request: build the prompt, generate within the deadline, guard it.

    The fallback phrase is used only on a deadline, an engine error, a guard rejection
    or when every sample repeated the session's last answers, and each use is counted in
    `fastresp_fallbacks_total`; a child's turn with an unsafe word gets a neutral
    acknowledgement instead, without the model (`service.child_safety`), counted there
    too. With `memory` (`service.session_state`), a request with a
    `session_id` avoids that session's last answers; with `cache`, a stored model answer
    of the same turns is served first (`source: "cache"`) and new model answers are
    stored.
    """

    def __init__(
        self,
        engine: Engine,
        personalities: Mapping[str, Personality],
        adapters: AdapterLookup,
        metrics: Metrics,
        deadline_s: float,
        base_prompt_mode: PromptMode,
        tone_guard: bool = False,
        memory: SessionMemory | None = None,
        cache: ResponseCache | None = None,
        log_text: bool = False,
        cache_context: str = "",
    ) -> None:
        self._engine = engine
        self.cache_context = cache_context
        self._fingerprints: dict[tuple[str, str, float], str] = {}
        # Each personality's definition, for the cache key (an edit means new keys).
        self._definitions = {
            name: hashlib.sha256(repr(p).encode()).hexdigest() for name, p in personalities.items()
        }
        self.log_text = log_text
        self.memory = memory
        self.cache = cache
        self._personalities = dict(personalities)
        self._adapters = adapters
        self._metrics = metrics
        self.deadline_s = deadline_s
        self._base_prompt_mode = base_prompt_mode
        self.tone_guard = tone_guard
        self._fallbacks: dict[str, Iterator[str]] = {
            name: itertools.cycle(p.fallback_phrases) for name, p in self._personalities.items()
        }
        self._acknowledgements = itertools.cycle(NEUTRAL_ACKNOWLEDGEMENTS)

    @property
    def personalities(self) -> Mapping[str, Personality]:
        """The served personalities by name."""
        return self._personalities

    def adapter_version(self, name: str) -> str | None:
        """The version of the adapter serving `name`; None for the base model."""
        active = self._adapters.active(name)
        return active.version if active else None

    def personality(self, name: str) -> Personality:
        """The personality called `name`; raises UnknownPersonality (404)."""
        try:
            return self._personalities[name]
        except KeyError:
            raise UnknownPersonality(
                f"unknown personality; known: {', '.join(self._personalities)}",
                loc=("body", "personality"),
            ) from None

    def prompt_for(self, personality: Personality, turn: Turn, adapter: bool) -> str:
        """Model input: chat template for an adapter, `base_prompt_mode` otherwise."""
        mode: PromptMode = "chat" if adapter else self._base_prompt_mode
        # The tokenizer also in few-shot mode: its special tokens are taken out of the turn.
        try:
            tokenizer = self._engine.get_tokenizer()
        except NotImplementedError:
            if mode == "chat":
                raise
            tokenizer = None
        return build_prompt(personality, turn, mode, tokenizer)

    def generation_for(
        self, personality: Personality, turn: Turn, active: ActiveAdapter | None
    ) -> GenerationRequest:
        """The engine request for `turn`: the prompt for `active` (None: the base model)
        and the personality's sampling, routed by personality."""
        return GenerationRequest(
            prompt=self.prompt_for(personality, turn, active is not None),
            max_tokens=personality.sampling.max_tokens,
            temperature=personality.sampling.temperature,
            top_p=personality.sampling.top_p,
            stop=personality.sampling.stop,
            adapter=active.ref if active else None,
            routing_key=personality.name,
        )

    async def warm_up(self) -> float:
        """Run one short generation per personality, before traffic arrives.

        The first generation on a fresh engine is several times slower than the rest
        (10.9 s against 1.2 s for gemma-3-270m on two busy cores), and this also puts
        each personality's shared prompt prefix into vLLM's prefix cache.

        Returns:
            the time it took, in seconds.

        Raises:
            EngineUnavailable: a warm-up generation took over WARM_UP_TIMEOUT_S, so
                startup fails with that reason instead of hanging.
        """
        started = time.perf_counter()
        for personality in self._personalities.values():
            try:
                async with asyncio.timeout(WARM_UP_TIMEOUT_S):
                    with self._adapters.lease(personality.name) as active:
                        warm = GenerationRequest(
                            prompt=self.prompt_for(
                                personality, Turn(None, "Hello!"), active is not None
                            ),
                            max_tokens=2,
                            temperature=0.0,
                            top_p=1.0,
                            stop=(),
                            adapter=active.ref if active else None,
                            routing_key=personality.name,
                        )
                        warm_id = f"warmup-{personality.name}-{uuid.uuid4().hex}"
                        await self._engine.generate(warm_id, warm)
            except TimeoutError:
                raise EngineUnavailable(
                    f"warm-up of {personality.name!r} took over {WARM_UP_TIMEOUT_S:.0f} s"
                ) from None
        return time.perf_counter() - started

    async def respond(
        self, request: FastResponseRequest, background: BackgroundTasks | None = None
    ) -> FastResponseResponse:
        """Answer `request` within the deadline.

        Counts the answer in `fastresp_requests_total` with outcome `ok`; requests that
        end in an error status are counted by the app (`service.app.RequestOutcomes`).
        The session memory and the response cache are read together, once; what they
        must remember is written after the answer is sent when `background` (the
        route's `BackgroundTasks`) is given, else before this returns.

        Raises:
            UnknownPersonality: the personality is not served (404).
        """
        started = time.perf_counter()
        personality = self.personality(request.personality)
        request_id = request.request_id or uuid.uuid4().hex
        turn = Turn(request.pika_turn, request.user_turn, request.main_response)
        safety = inspect_turn(request.pika_turn, request.user_turn)
        text: str | None = None
        reason: FallbackReason | None = FallbackReason.UNSAFE_INPUT
        source = "fallback"
        key: str | None = None
        # The adapter active at admission answers, even if a swap happens meanwhile.
        with self._adapters.lease(personality.name, request.session_id or request_id) as active:
            # Turns with the child's personal details are not cached, not even hashed.
            if not safety.unsafe_input and not safety.details:
                key = await self._cache_key(personality, active, request)
            elif self.cache is not None and safety.details:
                self._metrics.cache_lookups.labels(personality.name, "skipped").inc()
            recent, text = await self._recall(personality, request.session_id, key, safety)
            source = "cache"
            if text is None and not safety.unsafe_input:
                source = "model"
                generation = self.generation_for(personality, turn, active)
                self._metrics.in_flight.inc()
                try:
                    text, reason = await self._generate(
                        personality, request_id, generation, request.user_turn, recent, safety
                    )
                finally:
                    self._metrics.in_flight.dec()
        version = active.version if active else BASE_VERSION
        if text is None:
            source = "fallback"
            if safety.unsafe_input:
                text = self._acknowledgement(recent)
            else:
                text = self._fallback(personality, request.user_turn, recent)
            self._metrics.fallbacks.labels(personality.name, reason, version).inc()
        store_key = key if source == "model" else None  # only model answers are cached
        if background is not None:
            background.add_task(self._keep, request.session_id, store_key, text)
        else:
            await self._keep(request.session_id, store_key, text)
        self._log_answer(request, request_id, source, text)
        elapsed = time.perf_counter() - started
        self._metrics.request_duration.labels(personality.name, source, version).observe(elapsed)
        self._metrics.requests.labels(personality.name, source, "ok", version).inc()
        return FastResponseResponse(
            fast_response=text,
            source=source,
            personality=personality.name,
            adapter_version=active.version if active else None,
            latency_ms=round(elapsed * 1000, 2),
            request_id=request_id,
        )

    def _log_answer(
        self, request: FastResponseRequest, request_id: str, source: str, text: str
    ) -> None:
        """One debug line per answer: ids, source and lengths; the texts only with
        `log_text` (setting `log_text`, a debug flag), since they are the child's words."""
        if not logger.isEnabledFor(logging.DEBUG):
            return
        if self.log_text:
            logger.debug(
                "request %s session %s: user_turn %r -> %s %r",
                request_id, request.session_id, request.user_turn, source, text,
            )  # fmt: skip
        else:
            logger.debug(
                "request %s session %s: user_turn %s -> %s, %s",
                request_id, request.session_id, describe_turn(request.user_turn), source,
                describe_turn(text),
            )  # fmt: skip

    def _acknowledgement(self, recent: list[str]) -> str:
        """The next neutral acknowledgement (`child_safety.NEUTRAL_ACKNOWLEDGEMENTS`, in
        turn) that does not repeat `recent`; when all do, the one said longest ago."""
        return _next_fresh(self._acknowledgements, len(NEUTRAL_ACKNOWLEDGEMENTS), recent)

    async def _recall(
        self,
        personality: Personality,
        session_id: str | None,
        key: str | None,
        safety: TurnSafety,
    ) -> tuple[list[str], str | None]:
        """The session's remembered answers (newest first; [] without memory or id) and a
        stored answer under `key` that does not repeat them and passes `safety` (chosen
        at random among those; None without a cache or key), read concurrently. Cache
        lookups are counted in `fastresp_cache_lookups_total`."""

        async def recent() -> list[str]:
            if self.memory is None or session_id is None:
                return []
            return await self.memory.recent(session_id)

        async def stored() -> list[str] | None:
            if self.cache is None or key is None:
                return []
            return await self.cache.get(key)

        remembered, answers = await asyncio.gather(recent(), stored())
        if self.cache is None or key is None:
            return remembered, None
        if answers is None:
            self._metrics.cache_lookups.labels(personality.name, "error").inc()
            return remembered, None
        fresh = [a for a in answers if not repeats(a, remembered) and safety.check(a) is None]
        self._metrics.cache_lookups.labels(personality.name, "hit" if fresh else "miss").inc()
        return remembered, random.choice(fresh) if fresh else None

    async def _keep(self, session_id: str | None, key: str | None, text: str) -> None:
        """Remember `text` as the session's newest answer and, with a cache `key` (a model
        answer), store it in the response cache; concurrently, never raising."""
        work = []
        if self.memory is not None and session_id is not None:
            work.append(self.memory.remember(session_id, text))
        if self.cache is not None and key is not None:
            work.append(self.cache.add(key, text))
        await asyncio.gather(*work)

    async def _cache_key(
        self,
        personality: Personality,
        active: ActiveAdapter | None,
        request: FastResponseRequest,
    ) -> str | None:
        """The response-cache key of `request` as answered by `active`; None without a
        cache. Besides the turns and the adapter version, the key covers `cache_context`
        (the base model, prompt mode and tone guard), the personality's definition and the
        adapter's
        folder, so an edited personality or another model never hears older answers. The
        adapter is named by its folder and its files' names, sizes and modification times
        (`_adapter_fingerprint`: a sha256 of its files' contents), so weights replaced in
        place and loaded again get new keys."""
        if self.cache is None:
            return None
        version = active.version if active else None
        definition = self._definitions[personality.name]
        adapter = await self._adapter_fingerprint(active) if active else ""
        return cache_key(
            personality.name,
            version,
            request.pika_turn,
            request.user_turn,
            request.main_response,
            context=f"{self.cache_context}|{definition}|{adapter}",
        )

    async def _adapter_fingerprint(self, active: ActiveAdapter) -> str:
        """sha256 of `active`'s folder name and its files' names and contents, computed
        once per activation in a worker thread (a LoRA of a 4B model is tens of MB: about
        0.1 s); the folder name alone when it is unreadable."""
        memo = (str(active.ref.path), active.version, active.loaded_at)
        found = self._fingerprints.get(memo)
        if found is None:
            found = await asyncio.to_thread(_folder_digest, Path(active.ref.path))
            if len(self._fingerprints) > 1000:  # activations over a long life
                self._fingerprints.clear()
            self._fingerprints[memo] = found
        return found

    def _fallback(self, personality: Personality, user_turn: str, recent: list[str]) -> str:
        """The personality's next fallback phrase that does not repeat `recent` (the
        session's last answers); when every phrase does, the one said longest ago. With the
        tone guard on, phrases whose tone clashes with `user_turn` are skipped, and a
        neutral acknowledgement (`_acknowledgement`) is used when all do.
        """
        phrases = self._fallbacks[personality.name]
        if self.tone_guard:
            fitting = [p for p in personality.fallback_phrases if check_tone_fit(p, user_turn).text]
            if not fitting:
                return self._acknowledgement(recent)
            phrases = (p for p in phrases if p in fitting)
            return _next_fresh(phrases, len(fitting), recent)
        return _next_fresh(phrases, len(personality.fallback_phrases), recent)

    async def _generate(
        self,
        personality: Personality,
        request_id: str,
        generation: GenerationRequest,
        user_turn: str,
        recent: list[str],
        safety: TurnSafety,
    ) -> tuple[str | None, FallbackReason | None]:
        """The guarded model text, or (None, reason) when a fallback must be used.

        An output the guard rejects (with the tone guard on: also one whose tone clashes
        with `user_turn`), one `safety` rejects (`child_safety.TurnSafety.check`: unsafe
        words, the child's personal details or contact details), or one that repeats
        `recent` (`session_state.repeats`), is sampled again, up to GENERATION_ATTEMPTS
        times in all, while the deadline allows.
        """
        engine_started = time.perf_counter()
        result: GenerationResult
        reason = FallbackReason.GUARD
        try:
            async with asyncio.timeout(self.deadline_s):
                for attempt in range(GENERATION_ATTEMPTS):
                    # A fresh id per attempt: request_id comes from the client and may
                    # repeat, and vLLM aborts every request filed under an id.
                    engine_id = f"{request_id}-{attempt}-{uuid.uuid4().hex[:12]}"
                    result = await self._engine.generate(engine_id, generation)
                    self._observe_generation(personality.name, result)
                    guarded = clean_fast_response(
                        result.text,
                        personality.max_words,
                        truncated=result.finish_reason == "length",
                    )
                    if guarded.text is not None and self.tone_guard:
                        guarded = check_tone_fit(guarded.text, user_turn)
                    unsafe = safety.check(guarded.text) if guarded.text is not None else None
                    if unsafe is not None:
                        logger.info(
                            "request %s: child-safety guard rejected (%s)", engine_id, unsafe
                        )
                        reason = FallbackReason.GUARD
                        continue
                    if guarded.text is not None and repeats(guarded.text, recent):
                        logger.info("request %s: repeats the session's last answers", engine_id)
                        reason = FallbackReason.REPEAT
                        continue
                    if guarded.text is not None:
                        return guarded.text, None
                    logger.info("request %s: guard rejected (%s)", engine_id, guarded.rejection)
                    reason = FallbackReason.GUARD
                return None, reason
        except TimeoutError:
            logger.info("request %s missed the %.0f ms deadline", request_id, self.deadline_s * 1e3)
            return None, FallbackReason.DEADLINE
        except (EngineError, EngineUnavailable) as exc:
            logger.warning("request %s: engine error: %s", request_id, exc)
            return None, FallbackReason.ENGINE_ERROR
        finally:
            self._metrics.engine_duration.labels(personality.name).observe(
                time.perf_counter() - engine_started
            )

    def _observe_generation(self, personality: str, result: GenerationResult) -> None:
        """Record one finished engine generation: its time to first token (when the
        engine measured one) and its output tokens."""
        if result.ttft_s is not None:
            self._metrics.time_to_first_token.labels(personality).observe(result.ttft_s)
        self._metrics.output_tokens.labels(personality).observe(result.output_tokens)

    def respond_stream(self, request: FastResponseRequest) -> AsyncGenerator[StreamEvent, None]:
        """Answer `request` as events (`service.streaming`): `TokenEvent`s with the
        guarded text as it is generated, then one `DoneEvent`, preceded by an `ErrorEvent`
        when the fallback is served. The deadline covers the whole generation.

        The request is checked by this call, before any event, so its errors can still
        get their own HTTP status. Counts the answer in `fastresp_requests_total` and
        `fastresp_fallbacks_total` like `respond`, and its timings in
        `fastresp_stream_first_token_seconds` and `fastresp_stream_done_seconds`. Closing
        the iterator early (or cancelling its task) aborts the engine request.

        Raises:
            UnknownPersonality: the personality is not served (404).
        """
        started = time.perf_counter()
        personality = self.personality(request.personality)
        return self._stream_events(personality, request, started)

    async def _stream_events(
        self, personality: Personality, request: FastResponseRequest, started: float
    ) -> AsyncGenerator[StreamEvent, None]:
        """The events of `respond_stream`; `started` is when handling began."""
        request_id = request.request_id or uuid.uuid4().hex
        turn = Turn(request.pika_turn, request.user_turn, request.main_response)
        user_turn = request.user_turn if self.tone_guard else None
        safety = inspect_turn(request.pika_turn, request.user_turn)
        guard = StreamGuard(personality.max_words, user_turn, safety)
        rest: str | None = None
        failure: tuple[FallbackReason, str | None, str] | None = None
        first_token = True
        key: str | None = None
        with self._adapters.lease(personality.name, request.session_id or request_id) as active:
            version = active.version if active else BASE_VERSION
            if not safety.unsafe_input and not safety.details:
                key = await self._cache_key(personality, active, request)
            elif self.cache is not None and safety.details:
                self._metrics.cache_lookups.labels(personality.name, "skipped").inc()
            recent, cached = await self._recall(personality, request.session_id, key, safety)
            if safety.unsafe_input:
                cached = self._acknowledgement(recent)
            if cached is None:
                generation = self.generation_for(personality, turn, active)
                deadline = asyncio.get_running_loop().time() + self.deadline_s
                self._metrics.in_flight.inc()
                engine_started = time.perf_counter()
                try:
                    for attempt in range(GENERATION_ATTEMPTS):
                        guard = StreamGuard(personality.max_words, user_turn, safety, recent)
                        engine_id = f"{request_id}-{attempt}-{uuid.uuid4().hex[:12]}"
                        result: GenerationResult | None = None
                        stream = self._engine.generate_stream(engine_id, generation)
                        async with aclosing(stream):
                            while result is None:
                                async with asyncio.timeout_at(deadline):
                                    delta = await anext(stream, None)
                                if delta is None:
                                    raise EngineError("the engine stream ended without a result")
                                result = delta.result
                                piece = guard.feed(delta.text)
                                if piece:
                                    if first_token:
                                        first_token = False
                                        self._observe_stream_first_token(personality.name, started)
                                    yield TokenEvent(piece)
                        self._observe_generation(personality.name, result)
                        verdict = guard.finish(result)
                        rest = verdict.rest
                        if rest is not None:
                            break
                        logger.info("request %s: guard rejected (%s)", engine_id, verdict.rejection)
                        # Nothing sent yet: sample again, as `respond` does.
                        if guard.sent or attempt + 1 == GENERATION_ATTEMPTS:
                            message = f"the generated text failed the guard ({verdict.rejection})"
                            reason = (
                                FallbackReason.REPEAT
                                if verdict.rejection == REPEATED
                                else FallbackReason.GUARD
                            )
                            failure = (reason, verdict.rejection, message)
                            break
                except TimeoutError:
                    logger.info(
                        "request %s missed the %.0f ms deadline", request_id, self.deadline_s * 1e3
                    )
                    message = f"no answer within the {self.deadline_s * 1e3:.0f} ms deadline"
                    failure = (FallbackReason.DEADLINE, None, message)
                except (EngineError, EngineUnavailable) as exc:
                    logger.warning("request %s: engine error: %s", request_id, exc)
                    failure = (FallbackReason.ENGINE_ERROR, None, "the engine failed this request")
                finally:
                    self._metrics.in_flight.dec()
                    self._metrics.engine_duration.labels(personality.name).observe(
                        time.perf_counter() - engine_started
                    )
        if cached is not None:
            self._observe_stream_first_token(personality.name, started)
            yield TokenEvent(cached)
            source, text = "fallback" if safety.unsafe_input else "cache", cached
            if safety.unsafe_input:
                reason = FallbackReason.UNSAFE_INPUT
                self._metrics.fallbacks.labels(personality.name, reason, version).inc()
        elif failure is None and rest is not None:
            if rest:
                if first_token:
                    self._observe_stream_first_token(personality.name, started)
                yield TokenEvent(rest)
            source, text = "model", guard.sent
        else:
            reason, detail, message = failure or (FallbackReason.GUARD, None, "no answer")
            yield ErrorEvent(reason.value, detail, message)
            source, text = "fallback", self._fallback(personality, request.user_turn, recent)
            self._metrics.fallbacks.labels(personality.name, reason, version).inc()
        self._log_answer(request, request_id, source, text)
        elapsed = time.perf_counter() - started
        self._metrics.requests.labels(personality.name, source, "ok", version).inc()
        self._metrics.stream_done.labels(personality.name).observe(elapsed)
        yield DoneEvent(
            FastResponseResponse(
                fast_response=text,
                source=source,
                personality=personality.name,
                adapter_version=active.version if active else None,
                latency_ms=round(elapsed * 1000, 2),
                request_id=request_id,
            )
        )
        # After `done` is sent: the session memory and the cache cost the child no time.
        await self._keep(request.session_id, key if source == "model" else None, text)

    def _observe_stream_first_token(self, personality: str, started: float) -> None:
        """Record the time from `started` to the first `token` event of a stream."""
        self._metrics.stream_first_token.labels(personality).observe(time.perf_counter() - started)


def _folder_digest(folder: Path) -> str:
    """sha256 of `folder`'s path and of each file's name and bytes, in name order; of the
    path alone when the folder cannot be read."""
    digest = hashlib.sha256(str(folder).encode())
    try:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digest.update(b"\0" + path.name.encode() + b"\0")
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    except OSError:
        return hashlib.sha256(str(folder).encode()).hexdigest()
    return digest.hexdigest()


def _next_fresh(phrases: Iterator[str], count: int, recent: list[str]) -> str:
    """The next of `count` phrases from the cycle `phrases` that does not repeat
    `recent`; when all of them do, the one said longest ago (the cycle moves on either
    way, so answers without a session still rotate)."""
    seen: list[str] = []
    for _ in range(count):
        phrase = next(phrases)
        if not repeats(phrase, recent):
            return phrase
        seen.append(phrase)
    return max(seen, key=lambda phrase: said_ago(phrase, recent))
