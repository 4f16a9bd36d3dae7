"""Canary rollout through the admin API, on the real in-process engine and a real Redis
shared by two gateway replicas.

The oracle is the signature adapters (tests/signature_adapters.py): each one makes the
tiny model say its own string, so a response's text proves which adapter version
produced it, whatever `adapter_version` claims.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.engine import Engine
from tests.conftest import engine_settings, serve
from tests.swap_scenarios import AUTH, SIGNATURES, TOKEN, TURN, put_adapter, write_manifest

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("manifest") / "p.yaml", ("p1", "p2"))


def replica_settings(model: Path, manifest: Path, redis_url: str, prefix: str) -> Any:
    return engine_settings(
        model,
        personalities_file=manifest,
        admin_token=TOKEN,
        warm_up=False,
        redis_url=redis_url,
        redis_key_prefix=prefix,
        deadline_ms=30_000,  # a fallback would hide which version answered
    )


async def ask_as(client: httpx.AsyncClient, session: str) -> dict[str, Any]:
    """POST /fast-response for p1 in `session`; 200 required. Adds `started`/`ended`
    (perf_counter seconds) and checks the text is the claimed version's signature."""
    started = time.perf_counter()
    response = await client.post(
        "/fast-response", json={"personality": "p1", "session_id": session, **TURN}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["source"] == "model", body
    assert body["fast_response"] == SIGNATURES[body["adapter_version"]], body
    return {**body, "started": started, "ended": time.perf_counter()}


async def ask_all(client: httpx.AsyncClient, sessions: list[str], width: int = 16) -> list[str]:
    """The version that answered each session, `width` requests at a time."""
    gate = asyncio.Semaphore(width)

    async def one(session: str) -> str:
        async with gate:
            version: str = (await ask_as(client, session))["adapter_version"]
            return version

    return list(await asyncio.gather(*(one(s) for s in sessions)))


async def put_canary(
    client: httpx.AsyncClient, path: Path, version: str, weight: float
) -> httpx.Response:
    body = {"path": str(path), "version": version, "weight": weight}
    return await client.put("/admin/personalities/p1/canary", json=body, headers=AUTH)


async def test_a_10_percent_canary_serves_8_to_12_percent_of_2000_sessions_stickily(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    redis_url: str,
    signature_adapters: dict[str, Path],
) -> None:
    settings = replica_settings(tiny_model_dir, manifest, redis_url, f"t-{uuid.uuid4().hex[:8]}")
    async with serve(settings, engine) as one, serve(settings, engine) as two:
        assert (
            await put_adapter(one, "p1", signature_adapters["alpha"], "alpha")
        ).status_code == 200
        answer = await put_canary(one, signature_adapters["beta"], "beta", 10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["active"]["version"] == "alpha"
        assert answer.json()["canary"]["version"] == "beta"
        assert answer.json()["canary"]["weight"] == 10

        # Replica two follows through Redis before it is asked.
        listed: dict[str, Any] = {}
        for _ in range(100):
            listed = (await two.get("/admin/adapters", headers=AUTH)).json()
            if "p1" in listed["canaries"]:
                break
            await asyncio.sleep(0.01)
        assert listed["canaries"]["p1"]["version"] == "beta"
        assert listed["canaries"]["p1"]["weight"] == 10

        sessions = [f"lesson-{i}" for i in range(2000)]
        versions = await ask_all(one, sessions)
        share = versions.count("beta") / len(versions)
        assert set(versions) == {"alpha", "beta"}
        assert 0.08 <= share <= 0.12, share

        # Sticky: every session hears the same version again, on either replica.
        sample = sessions[:150] + [
            s for s, v in zip(sessions, versions, strict=True) if v == "beta"
        ]
        first = dict(zip(sessions, versions, strict=True))
        for replica in (one, two, one):
            assert dict(zip(sample, await ask_all(replica, sample), strict=True)) == {
                s: first[s] for s in sample
            }
        # p2 has no canary and stays on the base model.
        other = await one.post("/fast-response", json={"personality": "p2", **TURN})
        assert other.json()["adapter_version"] is None

        # Metrics carry the version; a rating of a canary answer is filed under it.
        canary_answer = await ask_as(one, next(s for s in sessions if first[s] == "beta"))
        rated = await one.post(
            "/feedback", json={"request_id": canary_answer["request_id"], "rating": 2}
        )
        assert rated.status_code == 200, rated.text
        text = (await one.get("/metrics")).text
        for version in ("alpha", "beta"):
            assert (
                f'fastresp_requests_total{{adapter_version="{version}",outcome="ok",'
                f'personality="p1",source="model"}}' in text
            ), version
        assert 'fastresp_canary_weight_percent{adapter="' in text
        assert 'personality="p1",version="beta"} 10.0' in text
        assert 'fastresp_feedback_rating_count{adapter_version="beta",personality="p1"} 1.0' in text

        # Conflicts are refused with 409 and change nothing.
        swap = await put_adapter(one, "p1", signature_adapters["gamma"], "gamma")
        assert swap.status_code == 409, swap.text
        assert swap.json()["detail"][0]["type"] == "canary_conflict"
        same = await put_canary(one, signature_adapters["alpha"], "alpha", 10)
        assert same.status_code == 409, same.text
        bad_weight = await put_canary(one, signature_adapters["beta"], "beta", 100)
        assert bad_weight.status_code == 422
        assert bad_weight.json()["detail"][0]["loc"] == ["body", "weight"]
        assert (await ask_all(one, sample)) == [first[s] for s in sample]

        promoted = await one.post("/admin/personalities/p1/canary/promote", headers=AUTH)
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["active"]["version"] == "beta"
        for replica in (one, two):
            for _ in range(100):
                if (
                    "p1"
                    not in (await replica.get("/admin/adapters", headers=AUTH)).json()["canaries"]
                ):
                    break
                await asyncio.sleep(0.01)
            assert set(await ask_all(replica, sample)) == {"beta"}
        again = await one.post("/admin/personalities/p1/canary/promote", headers=AUTH)
        assert again.status_code == 409


async def test_a_rollback_under_load_fails_nothing_and_no_request_gets_the_canary_after_1_s(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    redis_url: str,
    signature_adapters: dict[str, Path],
) -> None:
    settings = replica_settings(tiny_model_dir, manifest, redis_url, f"t-{uuid.uuid4().hex[:8]}")
    async with serve(settings, engine) as one, serve(settings, engine) as two:
        assert (
            await put_adapter(one, "p1", signature_adapters["alpha"], "alpha")
        ).status_code == 200
        assert (await put_canary(one, signature_adapters["beta"], "beta", 50)).status_code == 200
        for _ in range(200):  # replica two follows through Redis before the load starts
            if "p1" in (await two.get("/admin/adapters", headers=AUTH)).json()["canaries"]:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("replica two did not apply the canary within 2 s")
        counter = itertools.count()
        answers: list[dict[str, Any]] = []
        failures: list[BaseException] = []
        stop = asyncio.Event()

        async def user(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                try:
                    answers.append(await ask_as(client, f"load-{next(counter)}"))
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(exc)

        users = [asyncio.create_task(user(c)) for c in (one, two) for _ in range(4)]
        try:
            waited_until = time.perf_counter() + 120
            while sum(a["adapter_version"] == "beta" for a in answers) < 20:
                assert not failures, failures
                assert time.perf_counter() < waited_until, "20 canary answers took over 120 s"
                await asyncio.sleep(0.05)
            # The rollback goes to replica one; replica two hears it through Redis.
            rolled_back = await one.post("/admin/personalities/p1/canary/rollback", headers=AUTH)
            returned = time.perf_counter()
            assert rolled_back.status_code == 200, rolled_back.text
            assert rolled_back.json()["rolled_back"]["version"] == "beta"
            await asyncio.sleep(2.5)  # load goes on for 2.5 s after the rollback
        finally:
            stop.set()
            await asyncio.gather(*users)
        assert failures == []
        late = [a for a in answers if a["started"] >= returned + 1.0]
        assert len(late) >= 8
        assert {a["adapter_version"] for a in late} == {"alpha"}
        assert {a["adapter_version"] for a in answers if a["ended"] < returned} == {
            "alpha",
            "beta",
        }
        again = await two.post("/admin/personalities/p1/canary/rollback", headers=AUTH)
        assert again.status_code == 409
