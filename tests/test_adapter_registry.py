"""Unit tests of AdapterRegistry with a recording fake engine (real adapters on disk,
the in-memory store). The real engine is covered in test_hot_swap.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.random_lora import make_random_lora
from service.adapter_registry import AdapterRegistry
from service.adapter_validation import BaseModelInfo
from service.engine import AdapterRef, GenerationRequest, GenerationResult
from service.errors import AdapterLoadFailed, AdapterRejected, EngineError
from service.metrics import Metrics
from service.personalities import Personality
from service.registry_store import InMemoryRegistryStore

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
