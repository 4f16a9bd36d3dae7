"""The metrics catalogue on the real in-process vLLM engine (tiny model): time to first
token and output tokens against vLLM's own counters, request outcomes, and the
active-adapter info gauge across hot swaps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapters.random_lora import make_random_lora
from service.engine import Engine
from tests.conftest import engine_settings, serve
from tests.swap_scenarios import AUTH, TOKEN, ask, put_adapter, write_manifest
from tests.test_metrics import requests_total, samples

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

GOOD = {"personality": "cheerful", "user_turn": "I ate pho with my dad"}


def total(text: str, name: str) -> float:
    """Sum of every sample called exactly `name` (any labels) in an exposition."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_ttft_and_output_tokens_match_vllms_own_counts(
    engine: Engine, tiny_model_dir: Path
) -> None:
    async with serve(engine_settings(tiny_model_dir, warm_up=False), engine) as client:
        before = (await client.get("/metrics")).text
        for _ in range(3):
            assert (await client.post("/fast-response", json=GOOD)).status_code == 200
        # vLLM updates its counters in its output loop; wait for them to catch up.
        for _ in range(100):
            text = (await client.get("/metrics")).text
            finished = total(text, "vllm:request_success_total") - total(
                before, "vllm:request_success_total"
            )
            if finished >= total(text, "fastresp_output_tokens_count"):
                break
            await asyncio.sleep(0.05)
    generations = total(text, "fastresp_output_tokens_count")
    assert generations >= 3  # one per request, plus any guard resample
    assert total(text, "fastresp_time_to_first_token_seconds_count") == generations
    assert finished == generations
    tokens = total(text, "vllm:generation_tokens_total") - total(
        before, "vllm:generation_tokens_total"
    )
    assert total(text, "fastresp_output_tokens_sum") == tokens > 0
    ttft = total(text, "fastresp_time_to_first_token_seconds_sum")
    assert 0 < ttft <= total(text, "fastresp_engine_duration_seconds_sum")
    mean_ttft = ttft / generations
    print(f"\n{generations:.0f} generations, {tokens:.0f} tokens, mean TTFT {mean_ttft:.3f} s")


async def test_outcomes_on_the_real_engine(engine: Engine, tiny_model_dir: Path) -> None:
    async with serve(engine_settings(tiny_model_dir, warm_up=False), engine) as client:
        ok = await client.post("/fast-response", json=GOOD)
        unknown = await client.post("/fast-response", json={**GOOD, "personality": "grumpy"})
        bad = await client.post("/fast-response", json={**GOOD, "user_turn": " "})
        big = await client.post(
            "/fast-response",
            content=json.dumps({**GOOD, "user_turn": "a" * 70_000}),
            headers={"content-type": "application/json"},
        )
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in (ok, unknown, bad, big)] == [200, 404, 422, 413]
    assert requests_total(text) == {
        ("cheerful", ok.json()["source"], "ok"): 1,
        ("_unknown", "none", "client_error"): 2,
        ("cheerful", "none", "client_error"): 1,
    }


async def test_active_adapter_info_follows_swaps(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path / "p.yaml", ("p1", "p2"))
    lora_a = make_random_lora(tiny_model_dir, tmp_path / "lora-a", version="v1")
    lora_b = make_random_lora(tiny_model_dir, tmp_path / "lora-b", seed=2)
    settings = engine_settings(
        tiny_model_dir, personalities_file=manifest, admin_token=TOKEN, warm_up=False
    )

    def info(text: str) -> set[tuple[str, str, str]]:
        series = samples(text, "fastresp_active_adapter_info")
        assert set(series.values()) == {1.0}
        return {(dict(k)["personality"], dict(k)["adapter"], dict(k)["version"]) for k in series}

    async with serve(settings, engine) as client:

        async def current() -> set[tuple[str, str, str]]:
            return info((await client.get("/metrics")).text)

        assert await current() == {("p1", "none", "base"), ("p2", "none", "base")}
        assert (await put_adapter(client, "p1", lora_a)).status_code == 200
        assert (await ask(client, "p1"))["adapter_version"] == "v1"
        assert await current() == {("p1", "lora-a", "v1"), ("p2", "none", "base")}
        assert (await put_adapter(client, "p1", lora_b, "v2")).status_code == 200
        assert await current() == {("p1", "lora-b", "v2"), ("p2", "none", "base")}
        refused = await put_adapter(client, "p1", tmp_path / "missing")
        assert refused.status_code == 422
        assert await current() == {("p1", "lora-b", "v2"), ("p2", "none", "base")}
        deleted = await client.delete("/admin/personalities/p1/adapter", headers=AUTH)
        assert deleted.status_code == 200
        assert await current() == {("p1", "none", "base"), ("p2", "none", "base")}
        text = (await client.get("/metrics")).text
    swaps = samples(text, "fastresp_adapter_swaps_total")
    assert swaps[(("outcome", "ok"), ("personality", "p1"))] == 2
