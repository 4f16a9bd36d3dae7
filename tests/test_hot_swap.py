"""Hot-swapping personalities' LoRA adapters through the admin API, on the real
in-process engine, with signature adapters as the oracle (tests/swap_scenarios.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import pytest_asyncio

from service.engine import Engine
from tests.adapter_factory import BROKEN_KINDS, break_adapter
from tests.conftest import RedisServer, engine_settings, serve
from tests.swap_scenarios import (
    AUTH,
    SIGNATURES,
    TOKEN,
    ask,
    hot_swap_under_load,
    put_adapter,
    registry_of,
    write_manifest,
)

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("manifest") / "p.yaml", ("p1", "p2", "p3"))


def settings_for(model: Path, manifest: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "personalities_file": manifest,
        "admin_token": TOKEN,
        "warm_up": False,
    }
    values.update(overrides)
    return engine_settings(model, **values)


@pytest_asyncio.fixture(loop_scope="session")
async def gateway(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings_for(tiny_model_dir, manifest), engine) as client:
        yield client


async def test_admin_routes_need_the_token(gateway: httpx.AsyncClient) -> None:
    assert (await gateway.get("/admin/adapters")).status_code == 401
    wrong = await gateway.get("/admin/adapters", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert wrong.json()["detail"][0]["type"] == "forbidden"
    assert TOKEN not in wrong.text
    delete = await gateway.delete("/admin/personalities/p1/adapter")
    assert delete.status_code == 401
    assert (await gateway.get("/admin/adapters", headers=AUTH)).status_code == 200
    assert (await gateway.get("/personalities")).status_code == 200  # public


async def test_admin_api_is_off_without_a_token(
    engine: Engine, tiny_model_dir: Path, manifest: Path
) -> None:
    settings = settings_for(tiny_model_dir, manifest, admin_token=None)
    async with serve(settings, engine) as client:
        response = await client.get("/admin/adapters", headers=AUTH)
    assert response.status_code == 403
    assert "FASTRESP_ADMIN_TOKEN" in response.json()["detail"][0]["msg"]


async def test_put_and_delete_switch_between_adapter_and_base_model(
    gateway: httpx.AsyncClient, signature_adapters: dict[str, Path], engine: Engine
) -> None:
    base = await ask(gateway, "p1")
    assert base["adapter_version"] is None
    assert base["fast_response"] != SIGNATURES["alpha"]

    loaded = await put_adapter(gateway, "p1", signature_adapters["alpha"])
    assert loaded.status_code == 200, loaded.text
    active = loaded.json()["active"]
    assert active["version"] == "alpha"  # from the adapter's fastresp_card.json
    assert active["rank"] == 8
    assert active["path"] == str(signature_adapters["alpha"])
    answer = await ask(gateway, "p1")
    assert (answer["adapter_version"], answer["fast_response"]) == ("alpha", "alpha alpha")
    assert (await ask(gateway, "p2"))["adapter_version"] is None

    listed = (await gateway.get("/admin/adapters", headers=AUTH)).json()
    assert listed["personalities"]["p1"]["version"] == "alpha"
    assert listed["personalities"]["p2"] is None
    assert active["adapter_name"] in listed["engine"]["loaded_adapters"]
    public = (await gateway.get("/personalities")).json()["personalities"]
    assert {p["name"]: p["adapter_version"] for p in public}["p1"] == "alpha"

    deleted = await gateway.delete("/admin/personalities/p1/adapter", headers=AUTH)
    assert deleted.status_code == 200
    assert deleted.json()["previous"]["version"] == "alpha"
    after = await ask(gateway, "p1")
    assert after["adapter_version"] is None
    assert after["fast_response"] == base["fast_response"]  # greedy base model again
    await registry_of(gateway).drain()
    assert active["adapter_name"] not in await engine.loaded_adapters()


async def test_admin_body_is_strict_and_paths_are_normalised(
    gateway: httpx.AsyncClient, signature_adapters: dict[str, Path]
) -> None:
    url = "/admin/personalities/p1/adapter"
    alpha = str(signature_adapters["alpha"])
    loose = {"path": alpha, "allow_base_model_mismatch": "yes"}
    response = await gateway.put(url, json=loose, headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "allow_base_model_mismatch"]
    control = await gateway.put(url, json={"path": alpha + "\x00"}, headers=AUTH)
    assert control.status_code == 422
    assert control.json()["detail"][0]["loc"] == ["body", "path"]
    detour = str(
        signature_adapters["alpha"].parent
        / ".."
        / signature_adapters["alpha"].parent.name
        / "alpha"
    )
    loaded = await gateway.put(url, json={"path": detour}, headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["active"]["path"] == alpha


async def test_unknown_personality_gets_404(
    gateway: httpx.AsyncClient, signature_adapters: dict[str, Path]
) -> None:
    response = await put_adapter(gateway, "nobody", signature_adapters["alpha"])
    assert response.status_code == 404
    assert response.json()["detail"][0]["type"] == "unknown_personality"


async def test_bad_adapters_get_422_with_their_reason_and_the_old_version_keeps_serving(
    gateway: httpx.AsyncClient,
    signature_adapters: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    assert (await put_adapter(gateway, "p1", signature_adapters["alpha"])).status_code == 200
    for kind, check in BROKEN_KINDS.items():
        broken = break_adapter(tiny_model_dir, signature_adapters["beta"], kind, tmp_path / kind)
        response = await put_adapter(gateway, "p1", broken)
        assert response.status_code == 422, (kind, response.text)
        detail = response.json()["detail"][0]
        assert (detail["type"], detail["loc"]) == (check, ["body", "path"]), kind
        answer = await ask(gateway, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("alpha", "alpha alpha")


async def test_hot_swap_under_load_fails_nothing_and_serves_the_admitted_version(
    gateway: httpx.AsyncClient, signature_adapters: dict[str, Path]
) -> None:
    """8 clients for 20 s while p1 swaps 10 times between two signature adapters."""
    await hot_swap_under_load(gateway, signature_adapters, "p1")


async def test_no_cross_talk_between_three_personalities(
    gateway: httpx.AsyncClient, signature_adapters: dict[str, Path]
) -> None:
    names = {"p1": "alpha", "p2": "beta", "p3": "gamma"}
    for name, kind in names.items():
        assert (await put_adapter(gateway, name, signature_adapters[kind])).status_code == 200
    order = list(itertools.islice(itertools.cycle(names), 300))
    limit = asyncio.Semaphore(32)

    async def one(name: str) -> tuple[str, dict[str, Any]]:
        async with limit:
            return name, await ask(gateway, name)

    answers = await asyncio.gather(*(one(name) for name in order))
    wrong = [
        (name, body["fast_response"])
        for name, body in answers
        if body["fast_response"] != SIGNATURES[names[name]] or body["source"] != "model"
    ]
    assert not wrong, wrong[:5]
    assert len(answers) == 300


async def test_twenty_concurrent_loads_of_one_name_leave_one_version(
    gateway: httpx.AsyncClient,
    signature_adapters: dict[str, Path],
    engine: Engine,
) -> None:
    kinds = ["alpha", "beta"]
    responses = await asyncio.gather(
        *(put_adapter(gateway, "p2", signature_adapters[kinds[i % 2]], f"c{i}") for i in range(20))
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    listed = (await gateway.get("/admin/adapters", headers=AUTH)).json()
    active = listed["personalities"]["p2"]
    revisions = [r.json()["active"]["revision"] for r in responses]
    # The last load to get the lock wins: it holds the highest revision.
    assert active["revision"] == max(revisions)
    answer = await ask(gateway, "p2")
    version = active["version"]
    assert answer["adapter_version"] == version
    assert answer["fast_response"] == SIGNATURES[kinds[int(version[1:]) % 2]]
    registry = registry_of(gateway)
    await registry.drain()
    loaded = await engine.loaded_adapters()
    expected = {a.ref.name for a in registry.snapshot().values() if a is not None}
    assert loaded == expected, (loaded, expected)


def _rss_bytes() -> int:
    """RSS of this process and its children (vLLM's engine core) in bytes."""
    me = psutil.Process(os.getpid())
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


async def test_memory_over_50_load_unload_cycles(
    gateway: httpx.AsyncClient,
    signature_adapters: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One cycle first, so one-off allocations (the LoRA slots) are in the baseline.
    assert (await put_adapter(gateway, "p3", signature_adapters["gamma"])).status_code == 200
    assert (await gateway.delete("/admin/personalities/p3/adapter", headers=AUTH)).is_success
    before = _rss_bytes()
    for i in range(50):
        kind = ("alpha", "beta", "gamma")[i % 3]
        loaded = await put_adapter(gateway, "p3", signature_adapters[kind], f"m{i}")
        assert loaded.status_code == 200, loaded.text
        assert (await ask(gateway, "p3"))["fast_response"] == SIGNATURES[kind]
        deleted = await gateway.delete("/admin/personalities/p3/adapter", headers=AUTH)
        assert deleted.status_code == 200
    after = _rss_bytes()
    growth_mb = (after - before) / 1e6
    with capsys.disabled():  # in the test output even when pytest captures
        print(
            f"\nRSS before {before / 1e6:.0f} MB, after 50 cycles {after / 1e6:.0f} MB, "
            f"growth {growth_mb:+.0f} MB"
        )
    assert growth_mb < 200


async def wait_for_version(
    client: httpx.AsyncClient, name: str, version: str | None, limit_s: float
) -> dict[str, Any]:
    """Ask until `name` is served by `version`; fail after `limit_s` seconds."""
    deadline = time.perf_counter() + limit_s
    while True:
        answer = await ask(client, name)
        if answer["adapter_version"] == version or time.perf_counter() > deadline:
            return answer
        await asyncio.sleep(0.02)


async def test_two_replicas_sharing_redis_serve_a_swap_within_one_second(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    redis_url: str,
    signature_adapters: dict[str, Path],
) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = settings_for(tiny_model_dir, manifest, redis_url=redis_url, redis_key_prefix=prefix)
    async with serve(settings, engine) as one, serve(settings, engine) as two:
        assert (await ask(two, "p1"))["adapter_version"] is None
        assert (await put_adapter(one, "p1", signature_adapters["alpha"], "r1")).status_code == 200
        answer = await wait_for_version(two, "p1", "r1", limit_s=1.0)
        assert (answer["adapter_version"], answer["fast_response"]) == ("r1", "alpha alpha")

        deleted = await two.delete("/admin/personalities/p1/adapter", headers=AUTH)
        assert deleted.status_code == 200
        answer = await wait_for_version(one, "p1", None, limit_s=1.0)
        assert answer["adapter_version"] is None

        assert (await put_adapter(one, "p1", signature_adapters["beta"], "r2")).status_code == 200
        assert (await wait_for_version(two, "p1", "r2", limit_s=1.0))["adapter_version"] == "r2"
    # A replica that (re)starts picks up the current version from Redis.
    async with serve(settings, engine) as restarted:
        answer = await ask(restarted, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("r2", "beta beta")
        assert (await ask(restarted, "p2"))["adapter_version"] is None


async def test_a_swap_while_redis_is_down_is_refused_and_the_old_version_serves(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    redis_server: RedisServer,
    signature_adapters: dict[str, Path],
) -> None:
    settings = settings_for(tiny_model_dir, manifest, redis_url=redis_server.url)
    async with serve(settings, engine) as client:
        assert (await put_adapter(client, "p1", signature_adapters["alpha"])).status_code == 200
        redis_server.kill()
        refused = await put_adapter(client, "p1", signature_adapters["beta"])
        assert refused.status_code == 503
        assert refused.json()["detail"][0]["type"] == "registry_unavailable"
        answer = await ask(client, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("alpha", "alpha alpha")
        await registry_of(client).drain()
        # The refused version was unloaded again: only alpha's adapter is in the engine.
        names = {a.ref.name for a in registry_of(client).snapshot().values() if a}
        assert {n for n in await engine.loaded_adapters() if n.startswith("p1-")} == names


async def test_a_replica_started_while_redis_is_down_catches_up_when_it_returns(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    redis_server: RedisServer,
    signature_adapters: dict[str, Path],
) -> None:
    import redis.asyncio as redis

    settings = settings_for(tiny_model_dir, manifest, redis_url=redis_server.url)
    async with serve(settings, engine) as first:
        assert (await put_adapter(first, "p1", signature_adapters["alpha"])).status_code == 200
    client = redis.from_url(redis_server.url)
    await client.save()  # so the restarted server has the record (it runs without AOF)
    await client.aclose()
    redis_server.kill()
    async with serve(settings, engine) as late:
        down = await late.get("/readyz")  # Redis is optional: degraded, still ready
        assert down.status_code == 200 and down.json()["checks"]["redis"].startswith("degraded")
        assert (await ask(late, "p1"))["adapter_version"] is None  # the manifest meanwhile
        redis_server.start()
        answer = await wait_for_version(late, "p1", "alpha", limit_s=15.0)
        assert (answer["adapter_version"], answer["fast_response"]) == ("alpha", "alpha alpha")
        back = await late.get("/readyz")
        assert back.status_code == 200 and back.json()["checks"]["redis"] == "ok"
