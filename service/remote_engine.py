"""The remote engine: vLLM OpenAI-compatible servers behind the `Engine` protocol.

Each upstream is a vLLM server started with `--enable-lora` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (`fastresp engine serve` does both). The gateway
and its upstreams must share a filesystem:

- adapters are loaded by path (`POST /v1/load_lora_adapter` with `AdapterRef.path`), so
  every upstream must read the adapter folder at the path the gateway names;
- the tokenizer is loaded locally from `Settings.resolved_model()`, the same base model
  directory the upstreams serve.

Routing: requests with the same `GenerationRequest.routing_key` (the personality) go to
the same upstream, chosen by rendezvous (highest random weight) hashing over the
upstream URLs, so that personality's adapter and prompt prefix stay warm there. When
that upstream is down (connection error, or a 5xx answer) the request fails over to the
next upstream in the key's rendezvous order, and the failed upstream is skipped for
`Settings.engine_down_s` seconds. Adding or removing an upstream moves only the keys
that hashed to it.

Adapters are loaded on every upstream. An upstream that lost its runtime adapters (it
restarted) gets an adapter re-loaded on demand: when vLLM answers 404 for an adapter this
engine added, it is loaded there again and the request retried once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import httpx
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_delay
from tenacity import wait_exponential as wait_backoff

from service.engine import AdapterRef, GenerationDelta, GenerationRequest, GenerationResult
from service.errors import EngineError, EngineUnavailable
from service.identity_lora import (
    IDENTITY_LORA_ID,
    IDENTITY_LORA_NAME,
    needs_identity_lora,
    write_identity_lora,
)
from service.prompts import ChatTokenizer
from service.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds one `/health` or `/v1/models` probe may take.
PROBE_TIMEOUT_S = 5.0


def rendezvous_order(key: str, urls: Sequence[str]) -> list[str]:
    """`urls` ordered by their rendezvous (highest random weight) score for `key`.

    The first URL is the key's home upstream; the rest is its failover order. The
    score depends only on (url, key), so every gateway replica agrees, and removing
    one URL moves only the keys whose home it was.
    """

    def score(url: str) -> int:
        digest = hashlib.blake2b(f"{url}\x00{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(urls, key=score, reverse=True)


class _UpstreamDown(Exception):
    """The upstream did not answer usefully (connection error, timeout or 5xx)."""


class _UpstreamRefused(Exception):
    """The upstream answered with a 4xx: it is up, but refuses this call."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(slots=True)
class _Upstream:
    url: str
    client: httpx.AsyncClient
    down_until: float = 0.0  # time.monotonic() before which routing skips it


def _error_text(response: httpx.Response) -> str:
    """vLLM's error message from an OpenAI-style error body, else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return cast(str, error["message"])
        if isinstance(body.get("detail"), str):
            return cast(str, body["detail"])
    return response.text[:300]


def _describe(exc: BaseException) -> str:
    """An error for a message: our own upstream errors as they are, others with their type."""
    text = str(exc)
    if isinstance(exc, _UpstreamDown | _UpstreamRefused):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RemoteEngine:
    """`Engine` over one or more vLLM OpenAI-compatible servers.

    Build it with `await RemoteEngine.start(settings)`; `close()` closes its HTTP
    clients (the upstream servers keep running).
    """

    def __init__(
        self,
        upstreams: Sequence[_Upstream],
        served_model: str,
        tokenizer: ChatTokenizer,
        settings: Settings,
    ) -> None:
        self._upstreams = {u.url: u for u in upstreams}
        self._urls = [u.url for u in upstreams]
        self._served_model = served_model
        self._tokenizer = tokenizer
        self._device = settings.engine_device
        self._down_s = settings.engine_down_s
        self._stream = settings.engine_stream
        self._adapters: dict[str, AdapterRef] = {}  # added through this engine, not removed
        self._reloads: dict[tuple[str, str], asyncio.Lock] = {}  # (url, adapter name)
        self._in_flight = 0
        # On CPU upstreams base-model requests go through an all-zero adapter
        # (service.identity_lora); it is loaded on each upstream by its first 404.
        self._identity: AdapterRef | None = None
        if needs_identity_lora(settings, settings.engine_device):
            name = f"{IDENTITY_LORA_NAME}-{uuid.uuid4().hex[:8]}"
            # Under cache_dir: the upstreams must read it (shared filesystem, as adapters).
            folder = write_identity_lora(
                settings.resolved_model(), settings.cache_dir / "identity-lora" / name
            )
            self._identity = AdapterRef(name, IDENTITY_LORA_ID, folder)
            self._adapters[name] = self._identity

    @classmethod
    async def start(cls, settings: Settings) -> RemoteEngine:
        """Connect to `settings.engine_urls` and return a ready engine.

        Waits up to `settings.engine_connect_timeout_s` seconds for at least one upstream
        to answer `/health`; upstreams still down then are skipped by routing until they
        answer. The base model name comes from `settings.engine_served_model`, else from
        the answering upstreams' `GET /v1/models` (the entry whose `parent` is null).

        Raises:
            EngineUnavailable: no upstream configured or healthy in time (the message
                names every URL and its last error), the upstreams serve different
                base models, or the local tokenizer cannot be loaded.
        """
        if not settings.engine_urls:
            raise EngineUnavailable("remote engine: no engine_urls configured")
        upstreams = [_Upstream(url, _make_client(url, settings)) for url in settings.engine_urls]
        engine: RemoteEngine | None = None
        try:
            started = time.perf_counter()
            healthy = await _wait_for_health(upstreams, settings.engine_connect_timeout_s)
            served = await _discover_served_model(
                healthy, settings.engine_served_model, settings.resolved_model()
            )
            tokenizer = await asyncio.to_thread(_load_tokenizer, settings.resolved_model())
            engine = cls(upstreams, served, tokenizer, settings)
            healthy_urls = {u.url for u in healthy}
            for upstream in upstreams:
                if upstream.url not in healthy_urls:
                    engine._mark_down(upstream)
            logger.info(
                "remote engine ready in %.1f s: model %r, %d/%d upstream(s) healthy (%s)",
                time.perf_counter() - started,
                served,
                len(healthy),
                len(upstreams),
                ", ".join(u.url for u in healthy),
            )
            return engine
        finally:
            if engine is None:
                await asyncio.gather(*(u.client.aclose() for u in upstreams))

    # -- Engine protocol -----------------------------------------------------------

    @property
    def device(self) -> str:
        """ "cpu" or "cuda": the `engine_device` setting (the upstreams' device)."""
        return self._device

    @property
    def urls(self) -> list[str]:
        """The upstream base URLs, as configured."""
        return list(self._urls)

    @property
    def served_model(self) -> str:
        """The base model name the upstreams serve (used when a request has no adapter)."""
        return self._served_model

    def route(self, key: str) -> list[str]:
        """Upstream URLs in the order a request with routing key `key` tries them.

        The key's rendezvous order, with upstreams that failed in the last
        `engine_down_s` seconds moved to the end (still tried, as a last resort).
        """
        order = rendezvous_order(key, self._urls)
        now = time.monotonic()
        return [u for u in order if self._upstreams[u].down_until <= now] + [
            u for u in order if self._upstreams[u].down_until > now
        ]

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        """Run one completion (`POST /v1/completions`) on the request's upstream.

        The model is the adapter's name (`AdapterRef.name`), or the base model when
        `request.adapter` is None. `routing_key` picks the upstream (`route`; None: the
        request id, i.e. spread). Cancelling the awaiting task closes the connection,
        which makes vLLM abort the request. The completion is streamed, so `ttft_s` is
        the time from sending it to the upstream that served it to its first token event.

        Raises:
            EngineError: the upstream refused or failed the request (message names it).
            EngineUnavailable: every upstream was down (message lists each failure).
        """
        self._in_flight += 1
        try:
            return await self._generate(request_id, request)
        finally:
            self._in_flight -= 1

    async def generate_stream(
        self, request_id: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Run one completion like `generate`, yielding its text as the upstream sends it.

        Routing, adapter re-loading and failover are `generate`'s, with one limit: a
        request fails over to the next upstream only until its first text was yielded
        (text cannot be taken back); an upstream that fails after that fails the request
        with EngineError. The completion runs in its own task; closing this generator or
        cancelling the task iterating it cancels that task, which closes the connection,
        so vLLM aborts the request. Without `Settings.engine_stream` the whole text comes
        as one delta.

        Raises (while iterating): as `generate`.
        """
        texts: asyncio.Queue[str | None] = asyncio.Queue()
        self._in_flight += 1
        task = asyncio.create_task(self._generate(request_id, request, texts.put_nowait))
        task.add_done_callback(lambda _: texts.put_nowait(None))
        try:
            while (text := await texts.get()) is not None:
                yield GenerationDelta(text)
            yield GenerationDelta("", task.result())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self._in_flight -= 1

    async def check_health(self) -> None:
        """Return if at least one upstream answers `GET /health` with 200.

        Raises:
            EngineUnavailable: none did; the message lists each upstream's failure.
        """
        results = await asyncio.gather(*(self._probe(u) for u in self._upstreams.values()))
        failures = [
            f"{url}: {error}" for url, error in zip(self._urls, results, strict=True) if error
        ]
        if len(failures) == len(self._urls):
            raise EngineUnavailable("no engine upstream is healthy: " + "; ".join(failures))

    def get_tokenizer(self) -> ChatTokenizer:
        """The base model's tokenizer, loaded locally from `Settings.resolved_model()`."""
        return self._tokenizer

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load `adapter` on every upstream concurrently (`POST /v1/load_lora_adapter`).

        All or nothing: if any upstream fails, the adapter is unloaded again from those
        that loaded it. An upstream that already holds the name counts as loaded.

        Raises:
            EngineError: some upstream failed; the message gives each upstream's outcome
                (loaded and rolled back, refused with vLLM's reason, or unreachable).
        """
        upstreams = list(self._upstreams.values())
        results = await asyncio.gather(
            *(self._load_on(u, adapter) for u in upstreams), return_exceptions=True
        )
        failed = [(u, r) for u, r in zip(upstreams, results, strict=True) if r is not None]
        if not failed:
            self._adapters[adapter.name] = adapter
            return
        for _, result in failed:  # a cancellation or a bug is not an upstream's answer
            if not isinstance(result, _UpstreamDown | _UpstreamRefused):
                raise result
        loaded = [u for u, r in zip(upstreams, results, strict=True) if r is None]
        rollbacks = await asyncio.gather(
            *(self._unload_on(u, adapter.name) for u in loaded), return_exceptions=True
        )
        outcomes = [
            f"{u.url}: {'refused' if isinstance(r, _UpstreamRefused) else 'failed'}: {_describe(r)}"
            for u, r in failed
        ]
        for upstream, rollback in zip(loaded, rollbacks, strict=True):
            if rollback is None:
                outcomes.append(f"{upstream.url}: loaded, rolled back")
            else:
                outcomes.append(f"{upstream.url}: loaded, rollback failed: {_describe(rollback)}")
        raise EngineError(
            f"adapter {adapter.name!r} ({adapter.path}) was not loaded: " + "; ".join(outcomes)
        )

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload `adapter` from every upstream (`POST /v1/unload_lora_adapter`).

        Upstreams that do not hold it count as done. It is no longer re-loaded on demand.

        Raises:
            EngineError: some upstream failed to unload it or was unreachable (the message
                names each); the others have unloaded it.
        """
        self._adapters.pop(adapter.name, None)
        upstreams = list(self._upstreams.values())
        results = await asyncio.gather(
            *(self._unload_on(u, adapter.name) for u in upstreams), return_exceptions=True
        )
        failures: list[str] = []
        for upstream, result in zip(upstreams, results, strict=True):
            if result is None:
                continue
            if not isinstance(result, _UpstreamDown | _UpstreamRefused):
                raise result
            failures.append(f"{upstream.url}: {_describe(result)}")
        if failures:
            raise EngineError(f"adapter {adapter.name!r} unload failed on: " + "; ".join(failures))

    async def loaded_adapters(self) -> set[str]:
        """Names of the LoRA adapters held by at least one reachable upstream.

        Raises:
            EngineUnavailable: no upstream answered `GET /v1/models`.
        """
        per_upstream = await self.loaded_adapters_by_upstream()
        if not per_upstream:
            raise EngineUnavailable(
                "no engine upstream answered /v1/models: " + ", ".join(self._urls)
            )
        return set().union(*per_upstream.values())

    async def loaded_adapters_by_upstream(self) -> dict[str, set[str]]:
        """{upstream URL: names of the LoRA adapters it holds}, for reachable upstreams only.

        An adapter is an entry of the upstream's `GET /v1/models` with a non-null
        `parent`. Unreachable upstreams are left out.
        """
        upstreams = list(self._upstreams.values())
        results = await asyncio.gather(
            *(_list_models(u.client) for u in upstreams), return_exceptions=True
        )
        loaded: dict[str, set[str]] = {}
        for upstream, result in zip(upstreams, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, _UpstreamDown | _UpstreamRefused):
                    raise result
                logger.warning("cannot list adapters on %s: %s", upstream.url, result)
                continue
            loaded[upstream.url] = {
                str(m["id"])
                for m in result
                if m.get("parent") is not None and not str(m["id"]).startswith(IDENTITY_LORA_NAME)
            }
        return loaded

    def num_unfinished_requests(self) -> int:
        """Generations in flight through this engine object (all upstreams together)."""
        return self._in_flight

    async def close(self) -> None:
        """Unload the identity adapter, close the HTTP clients; the upstreams keep running."""
        if self._identity is not None:
            try:
                await self.remove_adapter(self._identity)
            except EngineError as exc:
                logger.warning("identity adapter not unloaded everywhere: %s", exc.message)
            shutil.rmtree(self._identity.path, ignore_errors=True)
        await asyncio.gather(*(u.client.aclose() for u in self._upstreams.values()))

    # -- internals -----------------------------------------------------------------

    async def _generate(
        self,
        request_id: str,
        request: GenerationRequest,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """`generate`; `on_text` is called with each piece of text as it arrives, and once
        it was called, an upstream failure no longer fails over (EngineError)."""
        if request.adapter is None and self._identity is not None:
            request = replace(request, adapter=self._identity)
        key = request.routing_key if request.routing_key is not None else request_id
        failures: list[str] = []
        sent = False

        def forward(text: str) -> None:
            nonlocal sent
            sent = True
            if on_text is not None:
                on_text(text)

        for url in self.route(key):
            upstream = self._upstreams[url]
            try:
                result = await self._generate_on(
                    upstream, request_id, request, forward if on_text is not None else None
                )
            except _UpstreamDown as exc:
                self._mark_down(upstream)
                if sent:
                    raise EngineError(
                        f"engine upstream {url} failed mid-stream, after text was sent: {exc}"
                    ) from exc
                failures.append(f"{url}: {exc}")
                logger.warning("engine upstream %s failed (%s); trying the next one", url, exc)
                continue
            upstream.down_until = 0.0
            if failures:
                logger.info("request %s served by %s after failover", request_id, url)
            return result
        raise EngineUnavailable(
            "no engine upstream could serve the request: " + "; ".join(failures)
        )

    async def _generate_on(
        self,
        upstream: _Upstream,
        request_id: str,
        request: GenerationRequest,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """One upstream; re-loads a known adapter it lost and retries once.

        Raises: _UpstreamDown (fail over), EngineError (do not).
        """
        adapter = request.adapter
        try:
            return await self._complete(upstream, request_id, request, on_text)
        except _UpstreamRefused as exc:
            known = adapter is not None and self._adapters.get(adapter.name) == adapter
            if exc.status_code != 404 or adapter is None or not known:
                raise EngineError(
                    f"engine upstream {upstream.url} refused the request: {exc}"
                ) from exc
        logger.warning("adapter %s missing on %s; loading it again", adapter.name, upstream.url)
        try:
            await self._reload_on(upstream, adapter)
            return await self._complete(upstream, request_id, request, on_text)
        except _UpstreamRefused as exc:
            raise EngineError(
                f"adapter {adapter.name!r} was missing on engine upstream {upstream.url}; "
                f"re-loading it and retrying failed: {exc}"
            ) from exc

    async def _complete(
        self,
        upstream: _Upstream,
        request_id: str,
        request: GenerationRequest,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """`POST /v1/completions`, streamed (unless `Settings.engine_stream` is off), so
        that the time to the first token is seen here: vLLM sends the first event once the
        first token exists (an event may carry no text yet while vLLM holds back a
        possible stop string). `on_text` gets each non-empty text as it arrives (without
        streaming: the whole text, once).

        Raises: _UpstreamDown, _UpstreamRefused, EngineError.
        """
        body: dict[str, Any] = {
            "model": request.adapter.name if request.adapter is not None else self._served_model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": list(request.stop),
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if not self._stream:
            whole = await self._complete_whole(upstream, request_id, body)
            if on_text is not None and whole.text:
                on_text(whole.text)
            return whole
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        texts: list[str] = []
        finish_reason: str | None = None
        output_tokens: int | None = None
        ttft: float | None = None
        started = time.perf_counter()
        try:
            async with upstream.client.stream(
                "POST", "/v1/completions", json=body, headers={"X-Request-Id": request_id}
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank lines between events
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = _stream_event(data, upstream.url)
                    for choice in event.get("choices") or ():
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        text = choice.get("text")
                        if not isinstance(text, str):
                            raise EngineError(
                                f"engine upstream {upstream.url} sent a non-text completion"
                            )
                        texts.append(text)
                        if on_text is not None and text:
                            on_text(text)
                        if choice.get("finish_reason") is not None:
                            finish_reason = str(choice["finish_reason"])
                    usage = event.get("usage")
                    if isinstance(usage, dict) and "completion_tokens" in usage:
                        output_tokens = int(usage["completion_tokens"])
        except httpx.TransportError as exc:  # the upstream went away mid-stream
            raise _UpstreamDown(_describe(exc)) from exc
        except (AttributeError, TypeError, ValueError) as exc:
            raise EngineError(
                f"engine upstream {upstream.url} sent an unexpected completion event: "
                f"{_describe(exc)}"
            ) from exc
        if output_tokens is None:
            raise EngineError(
                f"engine upstream {upstream.url} ended the completion stream without usage"
            )
        if finish_reason == "abort":
            raise EngineError(f"engine upstream {upstream.url} aborted the request")
        return GenerationResult(
            text="".join(texts),
            output_tokens=output_tokens,
            finish_reason=finish_reason,
            ttft_s=ttft,
        )

    async def _complete_whole(
        self, upstream: _Upstream, request_id: str, body: dict[str, Any]
    ) -> GenerationResult:
        """`POST /v1/completions` answered in one JSON body (`Settings.engine_stream`
        off): no time to first token. Raises: _UpstreamDown, _UpstreamRefused, EngineError.
        """
        response = await _call(
            upstream.client,
            "POST",
            "/v1/completions",
            json=body,
            headers={"X-Request-Id": request_id},
        )
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["text"]
            finish_reason = choice.get("finish_reason")
            output_tokens = int(payload["usage"]["completion_tokens"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EngineError(
                f"engine upstream {upstream.url} sent an unexpected completion body: "
                f"{_describe(exc)}"
            ) from exc
        if not isinstance(text, str):
            raise EngineError(f"engine upstream {upstream.url} sent a non-text completion")
        if finish_reason == "abort":
            raise EngineError(f"engine upstream {upstream.url} aborted the request")
        return GenerationResult(
            text=text, output_tokens=output_tokens, finish_reason=finish_reason, ttft_s=None
        )

    async def _reload_on(self, upstream: _Upstream, adapter: AdapterRef) -> None:
        """Load a lost adapter on one upstream, once even under concurrent requests."""
        lock = self._reloads.setdefault((upstream.url, adapter.name), asyncio.Lock())
        async with lock:
            names = {str(m["id"]) for m in await _list_models(upstream.client)}
            if adapter.name not in names:
                await self._load_on(upstream, adapter)
        self._reloads.pop((upstream.url, adapter.name), None)

    async def _load_on(self, upstream: _Upstream, adapter: AdapterRef) -> None:
        """Raises: _UpstreamDown, _UpstreamRefused (with vLLM's reason)."""
        body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
        try:
            await _call(upstream.client, "POST", "/v1/load_lora_adapter", json=body)
        except _UpstreamRefused as exc:
            if exc.status_code == 400 and "already been loaded" in str(exc):
                return  # same name, so the same weights: AdapterRef names are unique per load
            raise

    async def _unload_on(self, upstream: _Upstream, name: str) -> None:
        """Raises: _UpstreamDown, _UpstreamRefused; a 404 (not loaded) counts as done."""
        try:
            await _call(
                upstream.client, "POST", "/v1/unload_lora_adapter", json={"lora_name": name}
            )
        except _UpstreamRefused as exc:
            if exc.status_code != 404:
                raise

    async def _probe(self, upstream: _Upstream) -> str | None:
        """`GET /health`: None if 200 (and clear the down mark), else the failure."""
        try:
            await _call(upstream.client, "GET", "/health", timeout_s=PROBE_TIMEOUT_S)
        except (_UpstreamDown, _UpstreamRefused) as exc:
            self._mark_down(upstream)
            return _describe(exc)
        upstream.down_until = 0.0
        return None

    def _mark_down(self, upstream: _Upstream) -> None:
        upstream.down_until = time.monotonic() + self._down_s


def _make_client(url: str, settings: Settings) -> httpx.AsyncClient:
    """A pooled client for one upstream; its connections are kept alive between requests."""
    connections = max(2 * settings.max_num_seqs, 16)
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(settings.engine_request_timeout_s, connect=PROBE_TIMEOUT_S),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        # one retry of a failed connect (e.g. a keep-alive race); a refused connect is instant
        transport=httpx.AsyncHTTPTransport(retries=1),
    )


async def _call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> httpx.Response:
    """One HTTP call to an upstream; returns only a 2xx response.

    Raises:
        _UpstreamDown: transport error, timeout or 5xx.
        _UpstreamRefused: 4xx, with vLLM's error message.
    """
    extra: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
    try:
        response = await client.request(method, path, json=json, headers=headers, **extra)
    except httpx.TransportError as exc:
        raise _UpstreamDown(_describe(exc)) from exc
    _raise_for_status(response)
    return response


def _raise_for_status(response: httpx.Response) -> None:
    """Raises: _UpstreamDown (5xx), _UpstreamRefused (4xx, with vLLM's error message)."""
    if response.status_code >= 500:
        raise _UpstreamDown(f"HTTP {response.status_code}: {_error_text(response)}")
    if response.status_code >= 400:
        raise _UpstreamRefused(
            f"HTTP {response.status_code}: {_error_text(response)}", response.status_code
        )


def _stream_event(data: str, url: str) -> dict[str, Any]:
    """The JSON event of one `data:` line of a vLLM completion stream.

    Raises:
        _UpstreamDown: the event is an error with a 5xx code (e.g. the engine died), so
            the request fails over.
        EngineError: an event that is not a JSON object, or an error event with another
            code.
    """
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise EngineError(f"engine upstream {url} sent a bad stream event: {exc}") from exc
    if not isinstance(event, dict):
        raise EngineError(f"engine upstream {url} sent a stream event that is not an object")
    error = event.get("error")
    if error is not None:
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(code, int) and code >= 500:
            raise _UpstreamDown(f"HTTP {code} in the stream: {message}")
        raise EngineError(f"engine upstream {url} failed the request: {message}")
    return event


async def _list_models(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """`GET /v1/models` entries. Raises: _UpstreamDown, _UpstreamRefused."""
    response = await _call(client, "GET", "/v1/models", timeout_s=PROBE_TIMEOUT_S)
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _UpstreamDown(f"unexpected /v1/models body: {_describe(exc)}") from exc
    if not isinstance(data, list):
        raise _UpstreamDown("unexpected /v1/models body: data is not a list")
    return [m for m in data if isinstance(m, dict) and "id" in m]


async def _wait_for_health(upstreams: Sequence[_Upstream], timeout_s: float) -> list[_Upstream]:
    """Poll `/health` on all until at least one answers 200; return those that did.

    Raises:
        EngineUnavailable: none answered within `timeout_s`; names each URL and its error.
    """
    last: dict[str, str] = {}

    async def probe_all() -> list[_Upstream]:
        async def probe(upstream: _Upstream) -> bool:
            try:
                await _call(upstream.client, "GET", "/health", timeout_s=PROBE_TIMEOUT_S)
            except (_UpstreamDown, _UpstreamRefused) as exc:
                last[upstream.url] = _describe(exc)
                return False
            return True

        answers = await asyncio.gather(*(probe(u) for u in upstreams))
        healthy = [u for u, ok in zip(upstreams, answers, strict=True) if ok]
        if not healthy:
            raise _UpstreamDown("no upstream healthy yet")
        return healthy

    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(timeout_s),
            wait=wait_backoff(multiplier=0.25, max=2.0),
            retry=retry_if_exception_type(_UpstreamDown),
        ):
            with attempt:
                return await probe_all()
    except RetryError:
        pass
    raise EngineUnavailable(
        f"no engine upstream answered /health within {timeout_s:g} s: "
        + "; ".join(f"{u.url}: {last.get(u.url, 'no answer')}" for u in upstreams)
    )


async def _discover_served_model(
    upstreams: Iterable[_Upstream], expected: str | None, local_model: Path
) -> str:
    """The base model name the upstreams serve: `expected`, checked, or discovered.

    The base model is the `GET /v1/models` entry with a null `parent`. A base model
    directory (`root`) other than `local_model`, where the gateway's tokenizer comes
    from, is logged as a warning: the path may differ between machines legitimately.

    Raises:
        EngineUnavailable: an upstream cannot list its models or lists no base model,
            does not serve `expected`, or the upstreams disagree.
    """
    served: dict[str, str] = {}
    for upstream in upstreams:
        try:
            models = await _list_models(upstream.client)
        except (_UpstreamDown, _UpstreamRefused) as exc:
            raise EngineUnavailable(
                f"engine upstream {upstream.url} did not list its models: {exc}"
            ) from exc
        bases = [m for m in models if m.get("parent") is None]
        if expected is not None:
            bases = [m for m in bases if m["id"] == expected]
            if not bases:
                listed = ", ".join(str(m["id"]) for m in models) or "nothing"
                raise EngineUnavailable(
                    f"engine upstream {upstream.url} does not serve engine_served_model "
                    f"{expected!r} (it lists {listed})"
                )
        if not bases:
            raise EngineUnavailable(f"engine upstream {upstream.url} lists no base model")
        served[upstream.url] = str(bases[0]["id"])
        root = bases[0].get("root")
        if isinstance(root, str) and Path(root) != local_model:
            logger.warning(
                "engine upstream %s serves %s; the gateway's tokenizer comes from %s",
                upstream.url,
                root,
                local_model,
            )
    if len(set(served.values())) != 1:
        raise EngineUnavailable(
            "engine upstreams serve different base models: "
            + ", ".join(f"{url}: {name!r}" for url, name in served.items())
        )
    return next(iter(served.values()))


def _load_tokenizer(model_dir: Path) -> ChatTokenizer:
    """The base model's tokenizer from its local directory (imports transformers).

    Raises:
        EngineUnavailable: the directory has no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return cast(ChatTokenizer, AutoTokenizer.from_pretrained(str(model_dir)))
    except (OSError, ValueError) as exc:
        raise EngineUnavailable(
            f"cannot load the tokenizer from {model_dir} (remote mode needs the base model "
            f"directory on the gateway too; set FASTRESP_MODEL): {exc}"
        ) from exc
