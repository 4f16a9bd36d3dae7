"""Shared by the hot-swap tests on the in-process engine and on remote upstreams.

The oracle is the signature adapters (tests/signature_adapters.py): each one makes
the tiny model say its own string for any input, so a response's text proves which
adapter version produced it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.adapter_registry import AdapterRegistry
from tests.conftest import SIGNATURES as TRAINED

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: What each signature adapter says (the fixture `signature_adapters` trains them).
SIGNATURES = {version: signature for version, (signature, _) in TRAINED.items()}
TURN = {"pika_turn": "What did you eat today?", "user_turn": "I ate pho with my dad"}


def write_manifest(path: Path, names: Iterable[str]) -> Path:
    """A manifest of personalities on the base model: greedy, up to 12 tokens."""
    sampling = '{max_tokens: 12, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}'
    path.write_text(
        "personalities:\n"
        + "".join(
            f"  {name}:\n    description: d\n    style: s\n    max_words: 12\n"
            f"    sampling: {sampling}\n    fallback_phrases: [Hm.]\n"
            for name in names
        )
    )
    return path


def registry_of(client: httpx.AsyncClient) -> AdapterRegistry:
    """The AdapterRegistry of the app behind a `tests.conftest.serve()` client."""
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    registry: AdapterRegistry = transport.app.state.registry  # type: ignore[attr-defined]
    return registry


async def put_adapter(
    client: httpx.AsyncClient, name: str, path: Path, version: str | None = None
) -> httpx.Response:
    """PUT /admin/personalities/{name}/adapter with the test token."""
    body: dict[str, Any] = {"path": str(path)}
    if version is not None:
        body["version"] = version
    return await client.put(f"/admin/personalities/{name}/adapter", json=body, headers=AUTH)


async def ask(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """POST /fast-response for `name`; asserts 200 and returns the body."""
    response = await client.post("/fast-response", json={"personality": name, **TURN})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Swap:
    """One PUT: the version it activated, and when it was sent and answered."""

    version: str
    started: float
    ended: float


async def hot_swap_under_load(
    client: httpx.AsyncClient,
    adapters: dict[str, Path],
    name: str,
    *,
    clients: int = 8,
    duration_s: float = 20.0,
    swap_count: int = 10,
) -> int:
    """`clients` clients ask for `name` for `duration_s` (longer if the swaps take
    longer) while its adapter is swapped `swap_count` times between the alpha and beta
    signature adapters.

    Asserts: no request failed or fell back; every response's text is the signature
    of the version it reports; that version was active at some moment between the
    request's send and receive. Returns the number of requests.
    """
    signature_of = {"v0": SIGNATURES["alpha"]}
    assert (await put_adapter(client, name, adapters["alpha"], "v0")).status_code == 200
    swaps = [Swap("v0", 0.0, 0.0)]
    results: list[tuple[float, float, httpx.Response]] = []
    stop_at = time.perf_counter() + duration_s

    swapping = True

    async def client_loop() -> None:
        # At least `duration_s`, and on until the last swap: on a slow machine the
        # swaps may take longer, and traffic must span every one of them.
        while swapping or time.perf_counter() < stop_at:
            sent = time.perf_counter()
            response = await client.post("/fast-response", json={"personality": name, **TURN})
            results.append((sent, time.perf_counter(), response))

    async def swapper() -> None:
        for i in range(1, swap_count + 1):
            await asyncio.sleep(duration_s / (swap_count + 1))
            kind = "beta" if i % 2 else "alpha"
            version = f"v{i}"
            signature_of[version] = SIGNATURES[kind]
            started = time.perf_counter()
            response = await put_adapter(client, name, adapters[kind], version)
            assert response.status_code == 200, response.text
            swaps.append(Swap(version, started, time.perf_counter()))
        await asyncio.sleep(duration_s / (swap_count + 1))  # traffic on the last version too

    async def swap_then_stop() -> None:
        nonlocal swapping
        try:
            await swapper()
        finally:
            swapping = False

    await asyncio.gather(swap_then_stop(), *(client_loop() for _ in range(clients)))

    assert len(swaps) == swap_count + 1
    failed = [r for _, _, r in results if r.status_code != 200 or r.json()["source"] != "model"]
    assert not failed, [r.text for r in failed[:3]]
    seen_versions = set()
    for sent, received, response in results:
        body = response.json()
        version = body["adapter_version"]
        seen_versions.add(version)
        assert body["fast_response"] == signature_of[version], body
        # Admitted between sent and received: the version active when it was sent, or
        # one switched to while it ran.
        before = [s.version for s in swaps if s.ended <= sent][-1]
        during = {s.version for s in swaps if s.started <= received and s.ended >= sent}
        assert version in {before} | during, (version, before, during)
    print(f"\nhot swap: {len(results)} requests, {len(seen_versions)} versions served, 0 failed")
    assert len(seen_versions) == swap_count + 1  # traffic really spanned every swap
    return len(results)
