"""The small protocol every engine implements, and its value types.

The gateway does not care whether vLLM runs in-process (`service.vllm_engine`)
or behind an HTTP server; it only sees `Engine`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.prompts import ChatTokenizer


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A LoRA adapter as the engine knows it.

    `name` and `lora_int_id` are unique per load: a reload gets a new id, so vLLM never reuses
    KV or prefix-cache entries computed with older weights.
    """

    name: str
    lora_int_id: int
    path: Path


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation: the prompt, sampling settings and the adapter (None: base model)."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    adapter: AdapterRef | None = None
    seed: int | None = None
    routing_key: str | None = None
    """Requests with the same key go to the same replica (the personality name), so
    its adapter and prompt prefix stay warm there; ignored by the in-process engine."""


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What the engine produced.

    `finish_reason` is vLLM's: "stop" (stop string or EOS), "length" (hit
    max_tokens) or "abort". `output_tokens` counts the generated tokens. `ttft_s` is
    the time from submitting the request to the engine to its first output token, in
    seconds, measured by the caller's side of the engine (the gateway process); None
    when no token arrived.
    """

    text: str
    output_tokens: int
    finish_reason: str | None
    ttft_s: float | None


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """One step of a streamed generation (`Engine.generate_stream`).

    `text` is the output text new since the previous delta (it may be empty). `result`
    is None on every delta but the last, which carries the whole generation exactly as
    `Engine.generate` returns it (its `text` is the concatenation of all deltas).
    """

    text: str
    result: GenerationResult | None = None


class Engine(Protocol):
    """A text-generation engine with runtime LoRA adapters."""

    @property
    def device(self) -> str:
        """ "cpu" or "cuda"."""
        ...

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        """Generate a completion for `request`.

        Cancelling the awaiting task (a deadline) aborts the request inside the
        engine before `CancelledError` propagates.

        Raises:
            EngineError: the engine failed this request.
            EngineUnavailable: the engine is not running.
        """
        ...

    def generate_stream(
        self, request_id: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Generate a completion for `request`, yielding its text as it is produced.

        An async generator: the last delta carries the `GenerationResult`. Closing the
        generator early (`contextlib.aclosing`) or cancelling the task that iterates it
        (a deadline, a client disconnect) aborts the request inside the engine.

        Raises (while iterating):
            EngineError: the engine failed this request.
            EngineUnavailable: the engine is not running.
        """
        ...

    async def check_health(self) -> None:
        """Return if the engine can serve; raise EngineUnavailable otherwise."""
        ...

    def get_tokenizer(self) -> ChatTokenizer:
        """The served model's tokenizer (for the chat-template prompt mode)."""
        ...

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load a LoRA adapter; raise EngineError if the engine refuses it."""
        ...

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload a LoRA adapter (a no-op if it is not loaded)."""
        ...

    async def loaded_adapters(self) -> set[str]:
        """Names (`AdapterRef.name`) of the LoRA adapters the engine holds now."""
        ...

    def num_unfinished_requests(self) -> int:
        """Requests the engine is still running or queueing."""
        ...

    async def close(self) -> None:
        """Stop the engine and free its resources."""
        ...
