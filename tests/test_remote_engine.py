"""Remote-engine mode: `RemoteEngine` against two real vLLM OpenAI servers.

The servers are started with `fastresp engine serve` (the command under test too) on
the tiny model, concurrently, once for this module, with 0.5 GiB of KV cache each.
Upstream A accepts LoRA rank 16, upstream B only rank 8, so a rank-16 adapter loads on
A and fails on B: the deterministic way to test the all-or-nothing adapter load.
Which upstream served a request is read from that upstream's own Prometheus counters,
and which adapters it holds from its own `/v1/models`, never through `RemoteEngine`.

The tests run in file order and share the servers; the failover test kills B and the
last test kills A, so they come last.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError
from typer.testing import CliRunner

from adapters.random_lora import make_random_lora
from service.cli import app as cli_app
from service.engine import AdapterRef, GenerationRequest
from service.engine_server import server_command
from service.errors import EngineError, EngineUnavailable
from service.remote_engine import RemoteEngine, rendezvous_order
from service.settings import Settings
from tests.conftest import engine_settings, free_port, serve
from tests.swap_scenarios import (
    TOKEN,
    ask,
    hot_swap_under_load,
    put_adapter,
    registry_of,
    write_manifest,
)
from tests.vllm_servers import (
    SERVER_START_TIMEOUT_S,
    Server,
    launch_engine_server,
    wait_healthy,
)


def remote_settings(model: Path, urls: list[str], **overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": model,
        "engine_urls": urls,
        "engine_device": "cpu",
        "engine_connect_timeout_s": 10.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


# -- no servers needed ------------------------------------------------------------------


def test_engine_urls_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTRESP_ENGINE_URLS", " http://127.0.0.1:8100/, http://h2:8101 ,")
    assert Settings().engine_urls == ["http://127.0.0.1:8100", "http://h2:8101"]
    monkeypatch.setenv("FASTRESP_ENGINE_URLS", "")
    assert Settings().engine_urls == []


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1:8100", "ftp://h:1", "http://h:1,http://h:1/", "http://h:1/?x=1", "http://h:x"],
)
def test_bad_engine_urls_are_refused_naming_the_field(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(engine_urls=value)  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == ("engine_urls",)
    assert "engine_urls" in str(info.value)


def test_rendezvous_order_is_stable_and_spreads_keys() -> None:
    urls = [f"http://10.0.0.{i}:8100" for i in range(1, 4)]
    homes = [rendezvous_order(f"personality-{k}", urls)[0] for k in range(300)]
    assert homes == [rendezvous_order(f"personality-{k}", urls[::-1])[0] for k in range(300)]
    for url in urls:
        assert 60 <= homes.count(url) <= 140, homes.count(url)
    # Removing one upstream moves only the keys whose home it was.
    survivors = urls[:2]
    for k, home in enumerate(homes):
        if home in survivors:
            assert rendezvous_order(f"personality-{k}", survivors)[0] == home


@pytest.mark.asyncio(loop_scope="session")
async def test_start_fails_naming_every_unreachable_url(tiny_model_dir: Path) -> None:
    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    settings = remote_settings(tiny_model_dir, urls, engine_connect_timeout_s=0.5)
    with pytest.raises(EngineUnavailable, match="no engine upstream answered /health") as info:
        await RemoteEngine.start(settings)
    assert all(url in info.value.message for url in urls)


def test_engine_serve_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app, ["engine", "serve", "--model", str(tmp_path / "nothing"), "--dry-run"]
    )
    assert result.exit_code == 2
    assert "no config.json" in result.output


def test_engine_serve_prints_the_command(tiny_model_dir: Path) -> None:
    args = ["engine", "serve", "--model", str(tiny_model_dir), "--port", "8123", "--dry-run"]
    result = CliRunner().invoke(cli_app, [*args, "--cpu-kv-cache-gib", "0.5", "--", "--x-y"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in line
    assert "-m vllm.entrypoints.openai.api_server" in line
    assert f"--model {tiny_model_dir} --served-model-name tiny" in line
    assert line.endswith("--x-y")


@pytest.mark.engine
def test_server_flags_match_the_in_process_engine_args(tiny_model_dir: Path) -> None:
    """vLLM's own parser reads our command line into the in-process engine's arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from service.vllm_engine import engine_args

    settings = Settings(
        model=tiny_model_dir,
        cpu_kv_cache_gib=0.75,
        max_model_len=1024,
        max_num_seqs=7,
        enable_prefix_caching=False,
        max_lora_rank=32,
        max_loras=3,
        max_cpu_loras=5,
        enforce_eager=True,
        seed=3,
    )

    def parse(argv: list[str]) -> AsyncEngineArgs:
        return AsyncEngineArgs.from_cli_args(
            make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        )

    # Fields whose CLI default differs from the dataclass default: compared only where
    # engine_args sets them to something else than that default.
    cli_defaults = parse(["--model", str(tiny_model_dir)])
    dataclass_defaults = AsyncEngineArgs(model=str(tiny_model_dir))
    noise = {k for k, v in vars(dataclass_defaults).items() if getattr(cli_defaults, k) != v}
    for device in ("cpu", "cuda"):
        command = server_command(settings, device=device, host="127.0.0.1", port=8100)
        served = parse(command.argv[3:])
        expected = engine_args(settings, device)
        differing = {
            name: (getattr(served, name), value)
            for name, value in vars(expected).items()
            if name != "served_model_name"
            and not (name in noise and value == getattr(dataclass_defaults, name))
            and getattr(served, name) != value
        }
        assert differing == {}, device
        assert served.served_model_name == ["tiny"]


# -- two real vLLM servers --------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    """Upstream A (LoRA rank <= 16) and B (rank <= 8), started concurrently; killed after."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    servers: list[Server] = []
    try:
        servers.append(launch_engine_server(tiny_model_dir, 16, logs / "a.log", core=0))
        servers.append(launch_engine_server(tiny_model_dir, 8, logs / "b.log", core=1))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.kill(signal.SIGTERM)
        for server in servers:
            try:
                server.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill(signal.SIGKILL)
                server.process.wait(timeout=20)


@dataclass(frozen=True)
class Loras:
    rank8: Path
    rank16: Path


@pytest.fixture(scope="module")
def loras(
    launched: tuple[Server, Server], tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Loras:
    """Random-weight PEFT LoRAs, built while the servers start."""
    folder = tmp_path_factory.mktemp("remote-loras")
    return Loras(
        make_random_lora(tiny_model_dir, folder / "r8", version="v8", rank=8, alpha=64),
        make_random_lora(tiny_model_dir, folder / "r16", version="v16", rank=16, alpha=64),
    )


@pytest.fixture(scope="module")
def servers(launched: tuple[Server, Server], loras: Loras) -> tuple[Server, Server]:
    started = time.monotonic()
    wait_healthy(list(launched), SERVER_START_TIMEOUT_S)
    print(f"both vLLM servers healthy {time.monotonic() - started:.1f} s after the LoRAs")
    return launched


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def remote(
    servers: tuple[Server, Server], tiny_model_dir: Path
) -> AsyncIterator[RemoteEngine]:
    a, b = servers
    engine = await RemoteEngine.start(remote_settings(tiny_model_dir, [a.url, b.url]))
    try:
        yield engine
    finally:
        await engine.close()


def keys_homed_on(url: str, urls: list[str], count: int = 2) -> list[str]:
    keys = (f"personality-{i}" for i in range(1000))
    return [k for k in keys if rendezvous_order(k, urls)[0] == url][:count]


async def metric(url: str, name: str) -> float:
    """Sum of the samples of a vLLM Prometheus metric on one upstream.

    The timeout is 30 s: while the deadline test's upstream streams a 1,900-token
    completion of the tiny model, its API server sends an event per token and once took
    over 5 s to accept this connection (CI, 2026-11-30)."""
    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def wait_metric(
    url: str,
    name: str,
    predicate: Callable[[float], bool],
    timeout_s: float = 5.0,
) -> float:
    """Poll `metric` until `predicate` holds or `timeout_s` passes; the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await metric(url, name)
        if predicate(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def served_models(url: str) -> set[str]:
    """The LoRA adapters an upstream lists, read from it directly."""
    async with httpx.AsyncClient(timeout=5) as client:
        data = (await client.get(f"{url}/v1/models")).json()["data"]
    return {m["id"] for m in data if m["parent"] is not None}


FINISHED = "vllm:request_success_total"
RUNNING = "vllm:num_requests_running"
GENERATED = "vllm:generation_tokens_total"


def request(key: str | None, adapter: AdapterRef | None = None, **kw: object) -> GenerationRequest:
    values: dict[str, object] = {
        "prompt": "Pika: What did you eat?\nChild: I ate pho with my dad\nPika:",
        "max_tokens": 6,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": (),
        "adapter": adapter,
        "routing_key": key,
    }
    values.update(kw)
    return GenerationRequest(**values)  # type: ignore[arg-type]


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_start_discovers_the_served_model(remote: RemoteEngine) -> None:
    assert remote.served_model == "tiny"
    assert remote.device == "cpu"
    await remote.check_health()
    tokenizer = remote.get_tokenizer()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_each_key_is_served_by_its_home_upstream(
    remote: RemoteEngine, servers: tuple[Server, Server]
) -> None:
    urls = [s.url for s in servers]
    for server in servers:
        for key in keys_homed_on(server.url, urls):
            before = {u: await metric(u, FINISHED) for u in urls}
            for i in range(3):
                result = await remote.generate(f"route-{key}-{i}", request(key))
                assert result.output_tokens == 6 and result.finish_reason == "length"
            target = before[server.url] + 3
            await wait_metric(server.url, FINISHED, lambda v, target=target: v >= target)
            after = {u: await metric(u, FINISHED) for u in urls}
            served = {u: after[u] - before[u] for u in urls}
            assert served == {u: (3 if u == server.url else 0) for u in urls}, key
    assert remote.num_unfinished_requests() == 0


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_adapter_loads_on_every_upstream_and_serves(
    remote: RemoteEngine, servers: tuple[Server, Server], loras: Loras
) -> None:
    ref = AdapterRef("cheerful-1", 1, loras.rank8)
    await remote.add_adapter(ref)
    for server in servers:
        assert "cheerful-1" in await served_models(server.url), server.url
    assert await remote.loaded_adapters() == {"cheerful-1"}
    assert await remote.loaded_adapters_by_upstream() == {s.url: {"cheerful-1"} for s in servers}

    urls = [s.url for s in servers]
    for server in servers:  # the adapter changes greedy output on both upstreams
        key = keys_homed_on(server.url, urls, 1)[0]
        tuned = await remote.generate(f"lora-{key}", request(key, ref, max_tokens=8))
        base = await remote.generate(f"base-{key}", request(key, max_tokens=8))
        assert tuned.output_tokens > 0 and base.output_tokens > 0
        assert tuned.text != base.text, server.url

    await remote.remove_adapter(ref)
    await remote.remove_adapter(ref)  # a second removal is a no-op
    for server in servers:
        assert "cheerful-1" not in await served_models(server.url)
    with pytest.raises(EngineError, match="does not exist"):
        await remote.generate("after-removal", request("k", ref))


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_a_load_refused_by_one_upstream_is_rolled_back_on_the_other(
    remote: RemoteEngine, servers: tuple[Server, Server], loras: Loras
) -> None:
    a, b = servers
    with pytest.raises(EngineError) as info:
        await remote.add_adapter(AdapterRef("wide-2", 2, loras.rank16))
    message = info.value.message
    assert f"{b.url}: failed" in message and "max_lora_rank" in message, message
    assert f"{a.url}: loaded, rolled back" in message, message
    for server in servers:
        assert "wide-2" not in await served_models(server.url), server.url
    assert await remote.loaded_adapters() == set()


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_an_upstream_that_lost_an_adapter_gets_it_again_on_demand(
    remote: RemoteEngine, servers: tuple[Server, Server], loras: Loras
) -> None:
    """As after a restart: the upstream no longer lists the adapter this engine added."""
    a, b = servers
    ref = AdapterRef("cheerful-3", 3, loras.rank8)
    await remote.add_adapter(ref)
    try:
        async with httpx.AsyncClient(timeout=5) as client:  # behind RemoteEngine's back
            lost = await client.post(
                f"{a.url}/v1/unload_lora_adapter", json={"lora_name": ref.name}
            )
        assert lost.status_code == 200
        assert ref.name not in await served_models(a.url)
        key = keys_homed_on(a.url, [a.url, b.url], 1)[0]
        results = await asyncio.gather(
            *(remote.generate(f"reload-{i}", request(key, ref)) for i in range(3))
        )
        assert all(r.output_tokens == 6 for r in results)
        assert ref.name in await served_models(a.url)
    finally:
        await remote.remove_adapter(ref)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_streamed_and_whole_completions_give_the_same_text(
    servers: tuple[Server, Server], tiny_model_dir: Path
) -> None:
    """`engine_stream` off: one JSON body per completion, the same greedy text and token
    count as the streamed one, and no time to first token."""
    a, _ = servers
    results = {}
    for stream in (True, False):
        engine = await RemoteEngine.start(
            remote_settings(tiny_model_dir, [a.url], engine_stream=stream)
        )
        try:
            results[stream] = await engine.generate(f"stream-{stream}", request("k"))
        finally:
            await engine.close()
    streamed, whole = results[True], results[False]
    assert (whole.text, whole.output_tokens) == (streamed.text, streamed.output_tokens)
    assert whole.output_tokens == 6 and whole.finish_reason == "length"
    assert streamed.ttft_s is not None and streamed.ttft_s > 0
    assert whole.ttft_s is None


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_start_needs_one_healthy_upstream_and_skips_the_others(
    servers: tuple[Server, Server], tiny_model_dir: Path
) -> None:
    a, _ = servers
    dead = f"http://127.0.0.1:{free_port()}"
    settings = remote_settings(tiny_model_dir, [dead, a.url], engine_down_s=60.0)
    engine = await RemoteEngine.start(settings)
    try:
        key = keys_homed_on(dead, [dead, a.url], 1)[0]
        assert engine.route(key) == [a.url, dead]  # down since start: tried last
        assert (await engine.generate("skip-dead", request(key))).output_tokens == 6
    finally:
        await engine.close()


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_start_refuses_a_served_model_the_upstreams_do_not_serve(
    servers: tuple[Server, Server], tiny_model_dir: Path
) -> None:
    urls = [s.url for s in servers]
    settings = remote_settings(tiny_model_dir, urls, engine_served_model="gemma")
    with pytest.raises(EngineUnavailable, match="does not serve engine_served_model 'gemma'"):
        await RemoteEngine.start(settings)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_the_gateway_serves_through_the_remote_engine(
    remote: RemoteEngine, servers: tuple[Server, Server], loras: Loras, tiny_model_dir: Path
) -> None:
    """The app with a RemoteEngine: its adapter reaches both upstreams, requests answer."""
    manifest = loras.rank8.parent / "personalities.yaml"
    sampling = '{max_tokens: 8, temperature: 0.0, top_p: 1.0, stop: ["\\n"]}'
    manifest.write_text(
        "personalities:\n"
        "  tuned:\n    description: d\n    style: s\n    max_words: 40\n"
        f"    sampling: {sampling}\n    adapter: {loras.rank8.name}\n"
        "    fallback_phrases: [Hm.]\n"
        "  base:\n    description: d\n    style: s\n    max_words: 40\n"
        f"    sampling: {sampling}\n    fallback_phrases: [Hm.]\n"
    )
    urls = [s.url for s in servers]
    settings = engine_settings(tiny_model_dir, personalities_file=manifest, engine_urls=urls)
    turn = {"pika_turn": "What did you eat?", "user_turn": "I ate pho with my dad"}
    async with serve(settings, remote) as client:
        assert (await client.get("/readyz")).status_code == 200
        for server in servers:
            held = await served_models(server.url)
            assert any(name.startswith("tuned-") for name in held), (server.url, held)
        for personality in ("tuned", "base"):
            response = await client.post(
                "/fast-response", json={"personality": personality, **turn}
            )
            assert response.status_code == 200, response.text
            assert response.json()["source"] in {"model", "fallback"}
        assert (await client.post("/fast-response", json={"personality": "tuned", **turn})).json()[
            "adapter_version"
        ] == "v8"


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_a_deadline_aborts_the_upstream_request(
    remote: RemoteEngine, servers: tuple[Server, Server]
) -> None:
    a, b = servers
    key = keys_homed_on(a.url, [a.url, b.url], 1)[0]
    # vLLM's metrics are no way to see the request start: the running gauge read 0 for
    # 20 s while it ran (two CI runs), and once the first read of the token counter held
    # all 1900 tokens (the tiny model makes thousands a second on an idle machine). So the
    # request is cut by a deadline at a fixed point, and afterwards the counters prove it
    # had started upstream (tokens were made for it) and was aborted there (no request
    # finished, fewer than 1900 tokens). Too early (no token yet on a loaded machine): a
    # longer window. Finished before the cut (one CI run made all 1900 tokens within
    # 0.15 s): a shorter window, and each attempt another prompt.
    outcomes: list[str] = []
    window_s, proven = 0.15, False
    for attempt in range(12):
        assert await wait_metric(a.url, RUNNING, lambda v: v == 0, timeout_s=30) == 0
        finished, generated = await metric(a.url, FINISHED), await metric(a.url, GENERATED)
        prompt = f"Pika: What did you eat? ({attempt})\nChild: I ate pho with my dad\nPika:"
        long = request(key, max_tokens=1900, prompt=prompt)
        task = asyncio.create_task(remote.generate(f"long-{attempt}", long))
        await asyncio.sleep(window_s / 2)
        cut = False
        if not task.done():
            assert remote.num_unfinished_requests() == 1
            try:
                async with asyncio.timeout(window_s / 2):  # what the gateway's deadline does
                    await task
            except TimeoutError:
                cut = True
        if not cut:
            result = await task
            outcomes.append(f"{window_s:.3f} s: finished first ({result.finish_reason})")
            window_s /= 2  # a fast machine (one CI run made 1900 tokens in 0.15 s)
            continue
        assert task.cancelled() and remote.num_unfinished_requests() == 0
        started = time.monotonic()
        assert await wait_metric(a.url, RUNNING, lambda v: v == 0, timeout_s=5) == 0
        back_s = time.monotonic() - started
        await asyncio.sleep(0.5)
        done = await metric(a.url, FINISHED) - finished
        made = await metric(a.url, GENERATED) - generated
        outcomes.append(f"{window_s:.3f} s: {made:.0f} tokens, {done:.0f} finished, {back_s:.2f} s")
        print(f"cut after {window_s} s: {made:.0f} of 1900 tokens, running 0 {back_s:.2f} s later")
        if made == 0:
            window_s *= 2  # too early: not started upstream yet
        elif done > 0 or made >= 1900:
            window_s /= 2  # the upstream finished before the abort reached it
        else:
            # aborted, not finished: no request completed, and fewer than 1900 tokens
            proven = True
            break
    assert proven, outcomes


# -- the gateway's hot swaps over the two upstreams ---------------------------------------


def gateway_settings(model: Path, servers: tuple[Server, Server], manifest: Path) -> Settings:
    return engine_settings(
        model,
        personalities_file=manifest,
        engine_urls=[s.url for s in servers],
        admin_token=TOKEN,
        warm_up=False,
    )


@pytest.fixture(scope="module")
def remote_manifest(
    servers: tuple[Server, Server], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """A manifest with one personality homed on upstream A and one on B: (path, a, b)."""
    urls = [s.url for s in servers]
    home_a = keys_homed_on(urls[0], urls, 1)[0]
    home_b = keys_homed_on(urls[1], urls, 1)[0]
    path = write_manifest(tmp_path_factory.mktemp("remote-manifest") / "p.yaml", (home_a, home_b))
    return path, home_a, home_b


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("home", ["a", "b"])
async def test_gateway_hot_swap_under_load_on_two_upstreams(
    home: str,
    remote: RemoteEngine,
    servers: tuple[Server, Server],
    remote_manifest: tuple[Path, str, str],
    signature_adapters: dict[str, Path],
    tiny_model_dir: Path,
) -> None:
    """The in-process hot-swap test (tests/swap_scenarios.py), once for a personality
    homed on each upstream: 8 clients, 20 s, 10 swaps, nothing fails."""
    manifest, home_a, home_b = remote_manifest
    name = home_a if home == "a" else home_b
    settings = gateway_settings(tiny_model_dir, servers, manifest)
    async with serve(settings, remote) as client:
        await hot_swap_under_load(client, signature_adapters, name)
        active = registry_of(client).active(name)
        assert active is not None
        for server in servers:  # the active version is on both upstreams, for failover
            assert active.ref.name in await served_models(server.url), server.url


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_gateway_swap_refused_by_one_upstream_is_rolled_back_on_both(
    remote: RemoteEngine,
    servers: tuple[Server, Server],
    remote_manifest: tuple[Path, str, str],
    signature_adapters: dict[str, Path],
    tiny_model_dir: Path,
) -> None:
    """delta16 is rank 16: the gateway (max_lora_rank 16) and A accept it, B (8) refuses."""
    manifest, name, _ = remote_manifest
    a, b = servers
    settings = gateway_settings(tiny_model_dir, servers, manifest)
    async with serve(settings, remote) as client:
        assert (await put_adapter(client, name, signature_adapters["alpha"])).status_code == 200
        before = {s.url: await served_models(s.url) for s in servers}
        refused = await put_adapter(client, name, signature_adapters["delta16"])
        assert refused.status_code == 502, refused.text
        detail = refused.json()["detail"][0]
        assert detail["type"] == "adapter_load_failed"
        assert (
            f"{b.url}: failed" in detail["msg"] and f"{a.url}: loaded, rolled back" in detail["msg"]
        ), detail["msg"]
        for server in servers:  # rolled back everywhere: each upstream holds what it held
            assert await served_models(server.url) == before[server.url], server.url
        answer = await ask(client, name)
        assert (answer["adapter_version"], answer["fast_response"]) == ("alpha", "alpha alpha")


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_gateway_fails_over_when_an_upstream_dies(
    remote: RemoteEngine,
    servers: tuple[Server, Server],
    remote_manifest: tuple[Path, str, str],
    signature_adapters: dict[str, Path],
    tiny_model_dir: Path,
) -> None:
    """Kill B mid-traffic: the personality homed on B keeps answering from A, with its
    own adapter (loaded on both), and no request fails. Leaves B dead."""
    manifest, home_a, home_b = remote_manifest
    a, b = servers
    settings = gateway_settings(tiny_model_dir, servers, manifest)
    async with serve(settings, remote) as client:
        assert (await put_adapter(client, home_b, signature_adapters["beta"])).status_code == 200
        assert (await put_adapter(client, home_a, signature_adapters["gamma"])).status_code == 200
        before = await metric(a.url, FINISHED)
        answers = [await ask(client, home_b) for _ in range(3)]
        assert await metric(a.url, FINISHED) == before  # homed on B: A served none of them
        b.kill(signal.SIGKILL)
        b.process.wait(timeout=20)
        for _ in range(10):
            answers.append(await ask(client, home_b))
            assert (await ask(client, home_a))["fast_response"] == "gamma gamma"
        assert all((x["source"], x["fast_response"]) == ("model", "beta beta") for x in answers), (
            answers
        )
        assert await wait_metric(a.url, FINISHED, lambda v: v >= before + 20) >= before + 20
        assert (await client.get("/healthz")).status_code == 200  # one upstream is enough


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_requests_fail_over_when_their_upstream_dies(
    remote: RemoteEngine, servers: tuple[Server, Server]
) -> None:
    a, b = servers
    keys = keys_homed_on(b.url, [a.url, b.url])
    b.kill(signal.SIGKILL)
    b.process.wait(timeout=20)
    before = await metric(a.url, FINISHED)
    for i, key in enumerate(keys):
        started = time.monotonic()
        result = await remote.generate(f"failover-{i}", request(key))
        assert result.output_tokens == 6
        print(f"failover request {i}: {time.monotonic() - started:.3f} s")
    assert await wait_metric(a.url, FINISHED, lambda v: v >= before + len(keys)) == before + 2
    assert remote.route(keys[0]) == [a.url, b.url]  # b is remembered as down
    await remote.check_health()  # one upstream is enough
    assert set(await remote.loaded_adapters_by_upstream()) == {a.url}


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_with_every_upstream_down_requests_fail_naming_them(
    remote: RemoteEngine, servers: tuple[Server, Server]
) -> None:
    a, b = servers
    a.kill(signal.SIGKILL)
    a.process.wait(timeout=20)
    with pytest.raises(EngineUnavailable) as info:
        await remote.generate("nowhere", request("k"))
    assert a.url in info.value.message and b.url in info.value.message
    with pytest.raises(EngineUnavailable) as health:
        await remote.check_health()
    assert a.url in health.value.message and b.url in health.value.message
    with pytest.raises(EngineError) as load:
        await remote.add_adapter(AdapterRef("x", 9, Path("/nonexistent")))
    assert f"{a.url}: failed" in load.value.message and f"{b.url}: failed" in load.value.message
