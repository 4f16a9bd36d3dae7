"""Unit tests of AdapterRegistry with a recording fake engine (real adapters on disk,
the in-memory store). The real engine is covered in test_hot_swap.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from adapters.random_lora import make_random_lora
from service.adapter_registry import AdapterRegistry, canary_bucket
from service.adapter_validation import BaseModelInfo
from service.engine import AdapterRef, GenerationRequest, GenerationResult
from service.errors import AdapterLoadFailed, AdapterRejected, CanaryConflict, EngineError
from service.metrics import Metrics
from service.personalities import Personality
from service.registry_store import CanaryRecord, InMemoryRegistryStore

PERSONALITIES = {
    name: Personality(name=name, description="d", style="s", fallback_phrases=("Hm.",))
    for name in ("p1", "p2")
}


class FakeEngine:
    """Records adapter loads and unloads; generation answers "ok" (or fails, if told)."""

    device = "cpu"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.loaded: dict[str, AdapterRef] = {}
        self.added: list[AdapterRef] = []
        self.refuse: str | None = None
        self.fail_generation = False

    async def add_adapter(self, adapter: AdapterRef) -> None:
        if self.refuse:
            raise EngineError(self.refuse)
        self.added.append(adapter)
        self.loaded[adapter.name] = adapter

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        self.loaded.pop(adapter.name, None)

    async def loaded_adapters(self) -> set[str]:
        return set(self.loaded)

    async def generate(self, request_id: str, request: GenerationRequest) -> GenerationResult:
        if self.fail_generation:
            raise EngineError("boom")
        return GenerationResult("ok", output_tokens=1, finish_reason="stop", ttft_s=0.0)

    def get_tokenizer(self) -> Any:
        return self.tokenizer


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry-loras")
    return {v: make_random_lora(tiny_model_dir, root / v, version=v) for v in ("v1", "v2")}


@pytest.fixture
def engine(tiny_model_dir: Path) -> FakeEngine:
    from transformers import AutoTokenizer

    return FakeEngine(AutoTokenizer.from_pretrained(tiny_model_dir))


def make_registry(engine: FakeEngine, model: Path) -> AdapterRegistry:
    base = BaseModelInfo.from_dir(model)
    return AdapterRegistry(engine, PERSONALITIES, base, 16, InMemoryRegistryStore(), Metrics())  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_every_load_gets_a_new_lora_id_even_for_the_same_folder(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    first = await registry.activate("p1", loras["v1"])
    second = await registry.activate("p1", loras["v2"])
    again = await registry.activate("p1", loras["v1"])
    other = await registry.activate("p2", loras["v1"])
    ids = [a.ref.lora_int_id for a in (first, second, again, other)]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    assert len({a.ref.name for a in (first, second, again, other)}) == 4
    assert [a.revision for a in (first, second, again, other)] == [1, 2, 3, 4]
    await registry.drain()
    assert set(engine.loaded) == {again.ref.name, other.ref.name}


@pytest.mark.asyncio
async def test_a_replaced_adapter_stays_loaded_while_a_request_holds_it(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    old = await registry.activate("p1", loras["v1"])
    with registry.lease("p1") as held:
        assert held == old
        new = await registry.activate("p1", loras["v2"])
        await registry.drain()
        assert registry.active("p1") == new
        assert old.ref.name in engine.loaded  # still answering the admitted request
    await registry.drain()
    assert old.ref.name not in engine.loaded
    assert new.ref.name in engine.loaded


@pytest.mark.asyncio
async def test_a_failed_load_or_warm_up_changes_nothing(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    old = await registry.activate("p1", loras["v1"])
    engine.refuse = "rank too large for this upstream"
    with pytest.raises(AdapterLoadFailed, match="rank too large"):
        await registry.activate("p1", loras["v2"])
    engine.refuse = None
    engine.fail_generation = True
    with pytest.raises(AdapterLoadFailed, match="warm-up"):
        await registry.activate("p1", loras["v2"])
    await registry.drain()
    assert registry.active("p1") == old
    assert set(engine.loaded) == {old.ref.name}  # the warmed-up failure was unloaded


@pytest.mark.asyncio
async def test_a_base_model_without_chat_template_refuses_adapters_before_loading(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    """gemma-3-270m has no chat template; adapters are served with it (prompts.py)."""
    engine.tokenizer.chat_template = None
    registry = make_registry(engine, tiny_model_dir)
    with pytest.raises(AdapterRejected) as refused:
        await registry.activate("p1", loras["v1"])
    assert refused.value.error_type == "no_chat_template"
    assert engine.added == []
    assert registry.active("p1") is None


@pytest.mark.asyncio
async def test_deactivate_returns_to_the_base_model_and_unloads(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    assert await registry.deactivate("p1") is None
    old = await registry.activate("p1", loras["v1"])
    assert await registry.deactivate("p1") == old
    assert registry.active("p1") is None
    await registry.drain()
    assert engine.loaded == {}


# -- canary rollout ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_canary_serves_its_share_of_sessions_and_promote_keeps_the_loaded_adapter(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    stable = await registry.activate("p1", loras["v1"])
    canary = await registry.start_canary("p1", loras["v2"], 25.0)
    sessions = [f"s{i}" for i in range(400)]

    def served() -> dict[str, str | None]:
        picks = {}
        for session in sessions:
            with registry.lease("p1", session) as active:
                picks[session] = active.version if active else None
        return picks

    first = served()
    assert set(first.values()) == {"v1", "v2"}
    assert first == served()  # sticky
    on_canary = {s for s, v in first.items() if v == "v2"}
    assert on_canary == {s for s in sessions if canary_bucket("p1", s) < 25.0}
    with registry.lease("p2", "s1") as other:
        assert other is None  # another personality is untouched

    # The same version again changes only the weight: nothing is reloaded, and every
    # session on the canary at 25% stays on it at 50%.
    added = len(engine.added)
    assert (await registry.start_canary("p1", loras["v2"], 50.0)).ref == canary.ref
    assert len(engine.added) == added
    assert on_canary < {s for s, v in served().items() if v == "v2"}

    promoted = await registry.promote("p1")
    await registry.drain()
    assert promoted.ref == canary.ref and registry.active("p1") == promoted
    assert registry.canary("p1") is None
    assert set(served().values()) == {"v2"}
    assert set(engine.loaded) == {canary.ref.name}  # v1 unloaded, v2 not reloaded
    assert stable.ref.name not in engine.loaded


@pytest.mark.asyncio
async def test_rollback_unloads_the_canary_and_conflicting_changes_are_refused(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    with pytest.raises(CanaryConflict, match="no canary"):
        await registry.rollback("p1")
    with pytest.raises(CanaryConflict, match="no canary"):
        await registry.promote("p1")
    canary = await registry.start_canary("p1", loras["v2"], 10.0)  # stable: the base model
    with pytest.raises(CanaryConflict, match="promote or roll it back"):
        await registry.activate("p1", loras["v1"])
    with pytest.raises(CanaryConflict, match="promote or roll it back"):
        await registry.deactivate("p1")
    assert registry.canary("p1") == (canary, 10.0)
    with pytest.raises(ValueError, match="weight"):
        await registry.start_canary("p1", loras["v2"], 100.0)

    dropped = await registry.rollback("p1")
    await registry.drain()
    assert dropped.ref == canary.ref and registry.canary("p1") is None
    assert engine.loaded == {}
    assert all(lease_version(registry, f"s{i}") is None for i in range(200))

    await registry.activate("p1", loras["v1"])
    with pytest.raises(CanaryConflict, match="stable version"):
        await registry.start_canary("p1", loras["v1"], 10.0)


def lease_version(registry: AdapterRegistry, session: str) -> str | None:
    with registry.lease("p1", session) as active:
        return active.version if active else None


@pytest.mark.asyncio
async def test_a_request_admitted_on_the_canary_keeps_it_through_a_rollback(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    registry = make_registry(engine, tiny_model_dir)
    canary = await registry.start_canary("p1", loras["v2"], 99.0)
    session = next(f"s{i}" for i in range(100) if canary_bucket("p1", f"s{i}") < 99.0)
    with registry.lease("p1", session) as held:
        assert held == canary
        await registry.rollback("p1")
        await registry.drain()
        assert canary.ref.name in engine.loaded
    await registry.drain()
    assert canary.ref.name not in engine.loaded


def test_canary_buckets_are_uniform_and_independent_per_personality() -> None:
    # 2,000 sessions at a 10% canary: the share is within 8-12% (binomial sd 0.67%).
    sessions = [f"session-{i}" for i in range(2000)]
    for personality in ("p1", "p2", "cheerful"):
        share = sum(canary_bucket(personality, s) < 10.0 for s in sessions) / len(sessions)
        assert 0.08 <= share <= 0.12, (personality, share)
    same = sum((canary_bucket("p1", s) < 10.0) == (canary_bucket("p2", s) < 10.0) for s in sessions)
    assert same < 1900  # not the same 10% of sessions for every personality
    assert all(0.0 <= canary_bucket("p1", s) < 100.0 for s in sessions)


@pytest.mark.asyncio
async def test_a_follower_reuses_loaded_versions_for_canary_changes(
    loras: dict[str, Path], tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = InMemoryRegistryStore()
    base = BaseModelInfo.from_dir(tiny_model_dir)
    engines = [FakeEngine(tokenizer), FakeEngine(tokenizer)]
    leader, follower = (
        AdapterRegistry(e, PERSONALITIES, base, 16, store, Metrics())  # type: ignore[arg-type]
        for e in engines
    )
    await follower.start()
    try:

        async def settled(revision: int) -> None:
            for _ in range(200):
                active = follower.active("p1")
                canary = follower.canary("p1")
                newest = max(active.revision if active else 0, canary[0].revision if canary else 0)
                if newest >= revision:
                    await follower.drain()
                    return
                await asyncio.sleep(0.01)
            pytest.fail(f"the follower did not apply revision {revision}")

        stable = await leader.activate("p1", loras["v1"])
        await settled(stable.revision)
        assert len(engines[1].added) == 1
        canary = await leader.start_canary("p1", loras["v2"], 10.0)
        await settled(canary.revision)
        assert len(engines[1].added) == 2  # only the canary is loaded
        assert follower.canary("p1") is not None
        weight = await leader.start_canary("p1", loras["v2"], 60.0)
        await settled(weight.revision)
        assert len(engines[1].added) == 2 and follower.canary("p1")[1] == 60.0  # type: ignore[index]
        promoted = await leader.promote("p1")
        await settled(promoted.revision)
        assert len(engines[1].added) == 2  # the canary's adapter is now the stable one
        assert follower.canary("p1") is None and follower.active("p1").version == "v2"  # type: ignore[union-attr]
        assert set(engines[1].loaded) == {engines[1].added[1].name}
    finally:
        await follower.close()
        await store.close()


@pytest.mark.asyncio
async def test_a_replica_whose_canary_folder_is_gone_starts_on_the_stable_version(
    engine: FakeEngine, loras: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    store = InMemoryRegistryStore()
    base = BaseModelInfo.from_dir(tiny_model_dir)
    gone = shutil.copytree(loras["v2"], tmp_path / "v2-copy")
    await store.publish("p1", str(loras["v1"]), "v1", CanaryRecord(str(gone), "v2", 50.0))
    shutil.rmtree(gone)
    registry = AdapterRegistry(engine, PERSONALITIES, base, 16, store, Metrics())  # type: ignore[arg-type]
    await registry.start()
    try:
        assert registry.canary("p1") is None
        assert {lease_version(registry, f"s{i}") for i in range(50)} == {"v1"}
    finally:
        await registry.close()
        await store.close()
