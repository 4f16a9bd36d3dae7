"""Which LoRA adapter serves each personality, and hot swaps between versions.

The registry is the one place that loads adapters into the engine and switches a
personality to them:

- every (re)load gets a new LoRA id from one counter, and a new adapter name, so the
  engine never serves KV or prefix-cache entries computed with older weights;
- one `asyncio.Lock` per personality serialises its swaps;
- a swap validates the folder (`service.adapter_validation`), loads it, runs one
  1-token warm-up generation, records the change in the shared `RegistryStore`,
  and only then switches: one dict assignment, so a request admitted before it
  uses the old version and one admitted after it the new one;
- the replaced adapter is unloaded once the last request holding a lease on it ends;
- changes published by other gateway replicas (through the store) are applied the
  same way, in revision order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from service.adapter_validation import BaseModelInfo, ValidatedAdapter, validate_adapter
from service.engine import AdapterRef, Engine, GenerationRequest
from service.errors import (
    AdapterLoadFailed,
    AdapterRejected,
    EngineError,
    FastResponseError,
    RegistryUnavailable,
    UnknownPersonality,
)
from service.metrics import BASE_ADAPTER, BASE_VERSION, Metrics
from service.personalities import Personality
from service.prompts import Turn, build_prompt
from service.registry_store import AdapterRecord, RegistryStore

logger = logging.getLogger(__name__)

#: Longest the warm-up generation of a new adapter may take before the swap is refused.
SWAP_WARM_UP_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class ActiveAdapter:
    """The adapter serving a personality.

    `loaded_at` is unix seconds; `revision` is the store revision that made it active
    (0: the manifest at startup).
    """

    personality: str
    version: str
    ref: AdapterRef
    base_model: str
    rank: int
    loaded_at: float
    revision: int

    def as_dict(self) -> dict[str, object]:
        """JSON shape used by the admin API."""
        return {
            "personality": self.personality,
            "version": self.version,
            "path": str(self.ref.path),
            "adapter_name": self.ref.name,
            "lora_int_id": self.ref.lora_int_id,
            "base_model": self.base_model,
            "rank": self.rank,
            "loaded_at": self.loaded_at,
            "revision": self.revision,
        }


@dataclass(slots=True, eq=False)
class _Slot:
    """An adapter in the engine and the requests leasing it."""

    adapter: ActiveAdapter
    leases: int = 0
    retired: bool = False


@dataclass(slots=True)
class _State:
    """One personality's state: its name, its lock, its slot (None: base model), the
    newest store revision applied."""

    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slot: _Slot | None = None
    revision: int = 0


class AdapterRegistry:
    """Personality -> active LoRA adapter, over one engine and one shared store.

    Build it, `await start()` (loads the manifest's adapters and the store's newer
    versions, then follows the store), and `await close()` at shutdown. `origins`
    (personality -> text) says where a personality's manifest adapter really comes
    from, e.g. the published-adapter store, for startup error messages.
    """

    def __init__(
        self,
        engine: Engine,
        personalities: Mapping[str, Personality],
        base_model: BaseModelInfo,
        max_lora_rank: int,
        store: RegistryStore,
        metrics: Metrics,
        *,
        origins: Mapping[str, str] | None = None,
    ) -> None:
        self._engine = engine
        # Where a personality's startup adapter comes from, for error messages.
        self._origins = dict(origins or {})
        self._personalities = dict(personalities)
        self._base = base_model
        self._max_lora_rank = max_lora_rank
        self._store = store
        self._metrics = metrics
        self._states = {name: _State(name) for name in self._personalities}
        for name in self._personalities:  # every personality starts on the base model
            self._publish_active(name, None)
        self._ids = itertools.count(1)
        self._replica = uuid.uuid4().hex[:8]
        self._removals: set[asyncio.Task[None]] = set()
        self._follower: asyncio.Task[None] | None = None

    # -- reading -----------------------------------------------------------------

    def active(self, name: str) -> ActiveAdapter | None:
        """The adapter serving `name` now; None for the base model or an unknown name."""
        state = self._states.get(name)
        return state.slot.adapter if state and state.slot else None

    def snapshot(self) -> dict[str, ActiveAdapter | None]:
        """personality -> its active adapter (None: base model), in manifest order."""
        return {name: self.active(name) for name in self._personalities}

    @contextmanager
    def lease(self, name: str) -> Iterator[ActiveAdapter | None]:
        """Hold the adapter active at admission for one request.

        The adapter is not unloaded while a lease on it is held, even after a swap.
        """
        state = self._states.get(name)
        slot = state.slot if state else None
        if slot is None:
            yield None
            return
        slot.leases += 1
        try:
            yield slot.adapter
        finally:
            slot.leases -= 1
            if slot.retired and slot.leases == 0:
                self._unload_later(slot.adapter.ref)

    # -- changing ----------------------------------------------------------------

    async def activate(
        self,
        name: str,
        path: Path,
        version: str | None = None,
        *,
        allow_base_model_mismatch: bool = False,
    ) -> ActiveAdapter:
        """Validate, load and switch `name` to the adapter at `path`; publish the change.

        Returns:
            the new active adapter.

        Raises:
            UnknownPersonality: `name` is not in the manifest (404).
            AdapterRejected: the adapter failed validation (422); nothing changed.
            AdapterLoadFailed: the engine refused it or its warm-up failed (502).
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        started = time.perf_counter()
        try:
            validated = await asyncio.to_thread(
                validate_adapter,
                path,
                self._base,
                self._max_lora_rank,
                version=version,
                allow_base_model_mismatch=allow_base_model_mismatch,
            )
            async with state.lock:
                slot = await self._load(name, validated)
                try:
                    record = await self._store.publish(name, str(path), validated.version)
                except BaseException:
                    self._unload_later(slot.adapter.ref)
                    raise
                self._switch(state, slot, record.revision)
        except BaseException as exc:
            self._metrics.adapter_swaps.labels(name, type(exc).__name__).inc()
            raise
        elapsed = time.perf_counter() - started
        self._metrics.adapter_swaps.labels(name, "ok").inc()
        self._metrics.adapter_swap_duration.observe(elapsed)
        logger.info(
            "personality %s: adapter %s active (lora id %d, revision %d) after %.0f ms",
            name,
            validated.version,
            slot.adapter.ref.lora_int_id,
            record.revision,
            elapsed * 1000,
        )
        return slot.adapter

    async def deactivate(self, name: str) -> ActiveAdapter | None:
        """Serve `name` with the base model again; publish the change.

        Returns:
            the adapter that was active, or None if there was none.

        Raises:
            UnknownPersonality: `name` is not in the manifest (404).
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        async with state.lock:
            previous = state.slot
            record = await self._store.publish(name, None, None)
            self._switch(state, None, record.revision)
        logger.info("personality %s: base model (revision %d)", name, record.revision)
        return previous.adapter if previous else None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the manifest's adapters, apply newer versions from the store, follow it.

        Raises:
            AdapterRejected, AdapterLoadFailed: an adapter from the manifest or the
                store failed; startup must fail with this reason.
        """
        for name, personality in self._personalities.items():
            if personality.adapter is None:
                continue
            try:
                validated = await asyncio.to_thread(
                    validate_adapter, personality.adapter, self._base, self._max_lora_rank
                )
                slot = await self._load(name, validated)
            except FastResponseError as exc:
                origin = self._origins.get(name, "the manifest")
                exc.message = f"personality {name!r} in {origin}: {exc.message}"
                exc.args = (exc.message,)
                raise
            self._switch(self._states[name], slot, 0)
        try:
            records = await self._store.records()
        except RegistryUnavailable as exc:
            # /readyz reports Redis down meanwhile; the follower resyncs once it answers.
            logger.warning("%s; serving the manifest's adapters until it answers", exc.message)
            records = {}
        for record in records.values():
            await self._apply(record, fail=True)
        self._follower = asyncio.create_task(self._follow(), name="adapter-registry-follower")

    async def close(self, unload: bool = True) -> None:
        """Stop following the store and wait for pending unloads; `unload` also
        unloads every active adapter (for an engine that outlives the gateway)."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        if unload:
            for state in self._states.values():
                if state.slot is not None:
                    self._switch(state, None, state.revision)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every replaced adapter without leases has been unloaded."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    # -- internals ---------------------------------------------------------------

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            raise UnknownPersonality(
                f"unknown personality; known: {', '.join(self._personalities)}",
                loc=("path", "name"),
            )
        return state

    async def _load(self, name: str, validated: ValidatedAdapter) -> _Slot:
        """Load into the engine under a fresh id and name, and warm it up.

        Raises AdapterRejected (the base model has no chat template) or AdapterLoadFailed
        (the engine is left without it).
        """
        # The personality's own chat prompt: this also fills the prefix cache under the
        # new LoRA id, so the first request after the switch is not the slow one.
        try:
            prompt = build_prompt(
                self._personalities[name],
                Turn(None, "Hello!"),
                "chat",
                self._engine.get_tokenizer(),
            )
        except (ValueError, TypeError) as exc:  # transformers: no chat_template set
            raise AdapterRejected(
                "no_chat_template",
                f"adapters are served with the base model's chat template, and "
                f"{self._base.display_name} has none: {exc}",
            ) from None
        lora_id = next(self._ids)
        ref = AdapterRef(f"{name}-{lora_id}-{self._replica}", lora_id, validated.path)
        try:
            await self._engine.add_adapter(ref)
        except EngineError as exc:
            await self._unload(ref)  # vLLM may keep the id of a load that failed midway
            raise AdapterLoadFailed(exc.message, loc=("body", "path")) from exc
        warm = GenerationRequest(
            prompt=prompt,
            max_tokens=1,
            temperature=0.0,
            top_p=1.0,
            stop=(),
            adapter=ref,
            routing_key=name,
        )
        try:
            async with asyncio.timeout(SWAP_WARM_UP_TIMEOUT_S):
                await self._engine.generate(f"swap-warmup-{ref.name}-{uuid.uuid4().hex}", warm)
        except (FastResponseError, TimeoutError) as exc:
            await self._unload(ref)
            raise AdapterLoadFailed(
                f"adapter {validated.path} loaded but its warm-up generation failed: {exc}",
                loc=("body", "path"),
            ) from exc
        except BaseException:  # cancelled (shutdown): do not leave it in the engine
            self._unload_later(ref)
            raise
        adapter = ActiveAdapter(
            personality=name,
            version=validated.version,
            ref=ref,
            base_model=validated.base_model,
            rank=validated.rank,
            loaded_at=time.time(),
            revision=0,
        )
        return _Slot(adapter)

    def _switch(self, state: _State, slot: _Slot | None, revision: int) -> None:
        """Make `slot` active (no await: atomic for every request) and retire the old one."""
        if slot is not None:
            slot.adapter = replace(slot.adapter, revision=revision)
        previous, state.slot, state.revision = state.slot, slot, revision
        self._publish_active(state.name, slot)
        if previous is not None:
            previous.retired = True
            if previous.leases == 0:
                self._unload_later(previous.adapter.ref)

    def _publish_active(self, name: str, slot: _Slot | None) -> None:
        """`fastresp_active_adapter_info` of `name`: the adapter folder's name and the
        version, or none/base for the base model."""
        if slot is None:
            self._metrics.set_active_adapter(name, BASE_ADAPTER, BASE_VERSION)
        else:
            adapter = slot.adapter
            self._metrics.set_active_adapter(name, adapter.ref.path.name, adapter.version)

    def _unload_later(self, ref: AdapterRef) -> None:
        task = asyncio.get_running_loop().create_task(self._unload(ref))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _unload(self, ref: AdapterRef) -> None:
        try:
            await self._engine.remove_adapter(ref)
        except Exception:  # a failed unload must not fail a swap; the LRU evicts it later
            logger.exception("unloading adapter %s failed", ref.name)

    async def _apply(self, record: AdapterRecord, *, fail: bool) -> None:
        """Apply a store record newer than what `record.personality` has.

        Raises (only when `fail`): AdapterRejected, AdapterLoadFailed.
        """
        state = self._states.get(record.personality)
        if state is None:
            logger.warning("store names personality %r, not in the manifest", record.personality)
            return
        async with state.lock:
            if record.revision <= state.revision:
                return
            try:
                slot = None
                if record.path is not None:
                    validated = await asyncio.to_thread(
                        validate_adapter,
                        Path(record.path),
                        self._base,
                        self._max_lora_rank,
                        version=record.version,
                        allow_base_model_mismatch=True,  # checked by the replica that published it
                    )
                    slot = await self._load(record.personality, validated)
            except FastResponseError as exc:
                self._metrics.adapter_swaps.labels(record.personality, type(exc).__name__).inc()
                if fail:
                    exc.message = (
                        f"personality {record.personality!r}, revision {record.revision} "
                        f"in the shared registry: {exc.message}"
                    )
                    exc.args = (exc.message,)
                    raise
                logger.error(
                    "personality %s: cannot apply revision %d (%s): %s; keeping %s",
                    record.personality,
                    record.revision,
                    record.path,
                    exc.message,
                    state.slot.adapter.version if state.slot else "the base model",
                )
                return
            self._switch(state, slot, record.revision)
            self._metrics.adapter_swaps.labels(record.personality, "ok").inc()
        logger.info(
            "personality %s: applied revision %d from the store (%s)",
            record.personality,
            record.revision,
            record.version or "base model",
        )

    async def _follow(self) -> None:
        """Apply every change other replicas publish (the store resyncs on reconnect)."""
        async for record in self._store.subscribe():
            try:
                await self._apply(record, fail=False)
            except Exception:  # keep following whatever one record does
                logger.exception("applying %s failed", record)
