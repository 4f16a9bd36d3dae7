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
  same way, in revision order;
- a canary: a second version serves `weight` percent of a personality's sessions,
  picked by `canary_bucket` (a hash of personality and session id), so a session
  keeps its version for as long as the weight stays; raising the weight only moves
  sessions from the stable version to the canary. `promote` makes the canary the
  stable version, `rollback` drops it; both switch with one assignment, so every
  request admitted afterwards gets the stable version. While a canary runs, a plain
  swap or unload is refused (`CanaryConflict`): promote or roll back first.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
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
    CanaryConflict,
    EngineError,
    FastResponseError,
    RegistryUnavailable,
    UnknownPersonality,
)
from service.metrics import BASE_ADAPTER, BASE_VERSION, Metrics
from service.personalities import Personality
from service.prompts import Turn, build_prompt
from service.registry_store import AdapterRecord, CanaryRecord, RegistryStore

logger = logging.getLogger(__name__)

#: Longest the warm-up generation of a new adapter may take before the swap is refused.
SWAP_WARM_UP_TIMEOUT_S = 60.0


def canary_bucket(personality: str, session: str) -> float:
    """Where `session` of `personality` falls in [0, 100); it hears the canary when the
    bucket is below the canary's weight (percent).

    The first 8 bytes of sha256(personality NUL session), scaled: the same on every
    replica and after restarts (Python's `hash` is salted per process), uniform, and
    independent between personalities.
    """
    digest = hashlib.sha256(f"{personality}\0{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2**64


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
    """One personality's state: its name, its lock, its stable slot (None: base
    model), its canary slot and weight (percent of sessions), the newest store
    revision applied."""

    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    slot: _Slot | None = None
    revision: int = 0
    canary: _Slot | None = None
    canary_weight: float = 0.0

    def pick(self, session: str | None) -> _Slot | None:
        """The slot serving `session` now (no session: chosen at random)."""
        canary = self.canary
        if canary is None:
            return self.slot
        bucket = random.uniform(0, 100) if session is None else canary_bucket(self.name, session)
        return canary if bucket < self.canary_weight else self.slot


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

    def canary(self, name: str) -> tuple[ActiveAdapter, float] | None:
        """The canary of `name` and its weight (percent of sessions); None without one."""
        state = self._states.get(name)
        if state is None or state.canary is None:
            return None
        return state.canary.adapter, state.canary_weight

    @contextmanager
    def lease(self, name: str, session: str | None = None) -> Iterator[ActiveAdapter | None]:
        """Hold the adapter that serves `session` of `name` now, for one request.

        `session`: the session id (falls back to the request id when the client sends
        none); with a canary running it picks the version, sticky per session.
        The adapter is not unloaded while a lease on it is held, even after a swap.
        """
        state = self._states.get(name)
        slot = state.pick(session) if state else None
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
            CanaryConflict: a canary runs for `name` (409); nothing changed.
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        started = time.perf_counter()
        try:
            validated = await self._validate(path, version, allow_base_model_mismatch)
            async with state.lock:
                self._refuse_during_canary(state, "load another version")
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
            CanaryConflict: a canary runs for `name` (409); nothing changed.
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        async with state.lock:
            self._refuse_during_canary(state, "unload the adapter")
            previous = state.slot
            record = await self._store.publish(name, None, None)
            self._switch(state, None, record.revision)
        logger.info("personality %s: base model (revision %d)", name, record.revision)
        return previous.adapter if previous else None

    async def start_canary(
        self,
        name: str,
        path: Path,
        weight: float,
        version: str | None = None,
        *,
        allow_base_model_mismatch: bool = False,
    ) -> ActiveAdapter:
        """Serve the adapter at `path` to `weight` percent of `name`'s sessions, beside
        the stable version (the base model when there is none); publish the change.

        Called again with the running canary's path and version, it only changes the
        weight (nothing is reloaded). Another version replaces the running canary.

        Returns:
            the canary adapter.

        Raises:
            ValueError: `weight` is not in (0, 100).
            UnknownPersonality: `name` is not in the manifest (404).
            AdapterRejected: the adapter failed validation (422); nothing changed.
            CanaryConflict: its version is the stable version (409); nothing changed.
            AdapterLoadFailed: the engine refused it or its warm-up failed (502).
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        if not 0 < weight < 100:
            raise ValueError(f"canary weight {weight} is not in (0, 100)")
        state = self._state(name)
        try:
            validated = await self._validate(path, version, allow_base_model_mismatch)
            async with state.lock:
                stable = state.slot
                if stable is not None and stable.adapter.version == validated.version:
                    raise CanaryConflict(
                        f"{name} already serves version {validated.version!r} as its stable "
                        "version; a canary needs another version",
                        loc=("body", "version"),
                    )
                running = state.canary
                reuse = running is not None and (
                    running.adapter.ref.path == validated.path
                    and running.adapter.version == validated.version
                )
                slot = (
                    running if reuse and running is not None else await self._load(name, validated)
                )
                canary = CanaryRecord(str(slot.adapter.ref.path), validated.version, weight)
                try:
                    record = await self._store.publish(
                        name,
                        str(stable.adapter.ref.path) if stable else None,
                        stable.adapter.version if stable else None,
                        canary,
                    )
                except BaseException:
                    if not reuse:
                        self._unload_later(slot.adapter.ref)
                    raise
                self._set(state, stable, slot, weight, record.revision)
        except BaseException as exc:
            self._metrics.adapter_swaps.labels(name, type(exc).__name__).inc()
            raise
        self._metrics.adapter_swaps.labels(name, "ok").inc()
        logger.info(
            "personality %s: canary %s serves %g%% of sessions (revision %d)",
            name,
            validated.version,
            weight,
            record.revision,
        )
        return slot.adapter

    async def promote(self, name: str) -> ActiveAdapter:
        """Make `name`'s canary its stable version, for every session; publish it.

        Returns:
            the promoted adapter, now stable.

        Raises:
            UnknownPersonality: `name` is not in the manifest (404).
            CanaryConflict: `name` has no canary (409).
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        async with state.lock:
            canary = state.canary
            if canary is None:
                raise CanaryConflict(f"{name} has no canary to promote", loc=("path", "name"))
            adapter = canary.adapter
            record = await self._store.publish(name, str(adapter.ref.path), adapter.version)
            self._set(state, canary, None, 0.0, record.revision)
        self._metrics.adapter_swaps.labels(name, "ok").inc()
        logger.info(
            "personality %s: canary %s promoted (revision %d)",
            name,
            adapter.version,
            record.revision,
        )
        return canary.adapter

    async def rollback(self, name: str) -> ActiveAdapter:
        """Drop `name`'s canary: every request admitted from now on gets the stable
        version. Requests already running on the canary finish on it.

        Returns:
            the canary that was dropped.

        Raises:
            UnknownPersonality: `name` is not in the manifest (404).
            CanaryConflict: `name` has no canary (409).
            RegistryUnavailable: the shared store is down (503); nothing changed.
        """
        state = self._state(name)
        async with state.lock:
            canary, stable = state.canary, state.slot
            if canary is None:
                raise CanaryConflict(f"{name} has no canary to roll back", loc=("path", "name"))
            record = await self._store.publish(
                name,
                str(stable.adapter.ref.path) if stable else None,
                stable.adapter.version if stable else None,
            )
            self._set(state, stable, None, 0.0, record.revision)
        self._metrics.adapter_swaps.labels(name, "ok").inc()
        logger.info(
            "personality %s: canary %s rolled back (revision %d)",
            name,
            canary.adapter.version,
            record.revision,
        )
        return canary.adapter

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
                self._set(state, None, None, 0.0, state.revision)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every replaced adapter without leases has been unloaded."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    # -- internals ---------------------------------------------------------------

    async def _validate(
        self, path: Path, version: str | None, allow_base_model_mismatch: bool
    ) -> ValidatedAdapter:
        """`validate_adapter` against the served base, in a thread; raises AdapterRejected."""
        return await asyncio.to_thread(
            validate_adapter,
            path,
            self._base,
            self._max_lora_rank,
            version=version,
            allow_base_model_mismatch=allow_base_model_mismatch,
        )

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
        """Make `slot` active, with no canary, and retire the old slot(s)."""
        self._set(state, slot, None, 0.0, revision)

    def _set(
        self,
        state: _State,
        stable: _Slot | None,
        canary: _Slot | None,
        weight: float,
        revision: int,
    ) -> None:
        """Make `stable` and `canary` (at `weight` percent) serve `state` (no await:
        atomic for every request) and retire the slots no longer used."""
        for slot in (stable, canary):
            if slot is not None:
                slot.adapter = replace(slot.adapter, revision=revision)
        previous = [s for s in (state.slot, state.canary) if s is not None]
        state.slot, state.canary, state.canary_weight = stable, canary, weight
        state.revision = revision
        self._publish_active(state.name, stable)
        self._metrics.set_canary(
            state.name,
            None if canary is None else (canary.adapter.ref.path.name, canary.adapter.version),
            weight,
        )
        for slot in previous:
            if slot is not stable and slot is not canary:
                slot.retired = True
                if slot.leases == 0:
                    self._unload_later(slot.adapter.ref)

    @staticmethod
    def _refuse_during_canary(state: _State, what: str) -> None:
        if state.canary is not None:
            raise CanaryConflict(
                f"{state.name} runs canary {state.canary.adapter.version!r}: promote or roll "
                f"it back before you {what}",
                loc=("path", "name"),
            )

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

        A canary this replica cannot load is not served here (logged and counted): the
        stable version then answers all of this replica's sessions, so a replica still
        starts when a canary's folder is gone.

        Raises (only when `fail`): AdapterRejected, AdapterLoadFailed (the stable
        version could not be loaded).
        """
        state = self._states.get(record.personality)
        if state is None:
            logger.warning("store names personality %r, not in the manifest", record.personality)
            return
        async with state.lock:
            if record.revision <= state.revision:
                return
            loaded: list[_Slot] = []
            canary_change = record.canary is not None or state.canary is not None
            try:
                slot = await self._slot_for(
                    state, record.path, record.version, loaded, canary_change=canary_change
                )
                canary = await self._canary_slot_for(state, record, loaded)
            except FastResponseError as exc:
                self._forget(loaded)
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
            except BaseException:  # cancelled (shutdown): leave nothing loaded behind
                self._forget(loaded)
                raise
            weight = record.canary.weight if record.canary is not None and canary else 0.0
            self._set(state, slot, canary, weight, record.revision)
            self._metrics.adapter_swaps.labels(record.personality, "ok").inc()
        logger.info(
            "personality %s: applied revision %d from the store (%s)",
            record.personality,
            record.revision,
            record.version or "base model",
        )

    async def _canary_slot_for(
        self, state: _State, record: AdapterRecord, loaded: list[_Slot]
    ) -> _Slot | None:
        """The slot of `record`'s canary; None without one, or when it cannot be loaded
        here (logged and counted; the stable version serves this replica's sessions)."""
        if record.canary is None:
            return None
        try:
            return await self._slot_for(
                state, record.canary.path, record.canary.version, loaded, canary_change=True
            )
        except FastResponseError as exc:
            self._metrics.adapter_swaps.labels(record.personality, type(exc).__name__).inc()
            logger.error(
                "personality %s: cannot load canary %s of revision %d (%s): %s; this replica "
                "serves the stable version to every session",
                record.personality,
                record.canary.version,
                record.revision,
                record.canary.path,
                exc.message,
            )
            return None

    def _forget(self, slots: list[_Slot]) -> None:
        """Unload adapters loaded for a change that is not applied."""
        for slot in slots:
            self._unload_later(slot.adapter.ref)

    async def _slot_for(
        self,
        state: _State,
        path: str | None,
        version: str | None,
        loaded: list[_Slot],
        *,
        canary_change: bool,
    ) -> _Slot | None:
        """The slot for the adapter at `path` (None: the base model): for a canary
        change (`canary_change`: the record has a canary, or one runs now) the stable or
        canary slot already serving it, else a new load (appended to `loaded`).

        Raises AdapterRejected, AdapterLoadFailed.
        """
        if path is None:
            return None
        # Canary changes keep the versions they name loaded; a plain swap reloads, as
        # `activate` does, so a replica never keeps weights the publisher replaced.
        for slot in (state.slot, state.canary) if canary_change else ():
            if (
                slot is not None
                and slot.adapter.ref.path == Path(path)
                and version in (None, slot.adapter.version)
            ):
                return slot
        validated = await asyncio.to_thread(
            validate_adapter,
            Path(path),
            self._base,
            self._max_lora_rank,
            version=version,
            allow_base_model_mismatch=True,  # checked by the replica that published it
        )
        slot = await self._load(state.name, validated)
        loaded.append(slot)
        return slot

    async def _follow(self) -> None:
        """Apply every change other replicas publish (the store resyncs on reconnect)."""
        async for record in self._store.subscribe():
            try:
                await self._apply(record, fail=False)
            except Exception:  # keep following whatever one record does
                logger.exception("applying %s failed", record)
