"""`fastresp adapters publish` and the gateway reading published versions.

The oracle is the signature adapters (tests/signature_adapters.py): the tiny model
answers "alpha alpha" only through the alpha adapter, "beta beta" only through beta,
so an answer's text proves which published version served it. Each adapter is
published with a card like the SFT trainer's, written here from the base model's own
files (its marker's name, the sha256 of its config.json), not by the code under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from adapters.publish import HotLoadError, PublishError, hot_load, mark_active, publish_adapter
from service.adapter_store import PUBLISHED_FILE, PublishedFile, PublishedStoreError
from service.app import create_app
from service.cli import app as cli
from service.engine import Engine
from service.errors import AdapterRejected
from service.model_prep import TINY_MODEL_NAME
from tests.conftest import engine_settings, live_gateway, serve
from tests.swap_scenarios import AUTH, SIGNATURES, TOKEN, TURN, ask, put_adapter, write_manifest

runner = CliRunner()
#: The environment variable the CLI tests read the admin token from.
TOKEN_ENV = "PIKA_TEST_ADMIN_TOKEN"


# --- helpers ------------------------------------------------------------------------------


def sft_card(base: Path, personality: str | None = "p1", **base_changes: Any) -> dict[str, Any]:
    """A card shaped like the SFT trainer's, for the tiny model `base`."""
    base_model = {
        "name": TINY_MODEL_NAME,
        "path": str(base),
        "config_sha256": hashlib.sha256((base / "config.json").read_bytes()).hexdigest(),
    }
    base_model.update(base_changes)
    return {
        "format": 1,
        "kind": "sft",
        "personality": personality,
        "base_model": base_model,
        "metrics": {"eval_loss": 1.5},
        "version": None,
    }


def with_card(adapter: Path, out: Path, card: dict[str, Any] | None) -> Path:
    """A copy of `adapter`'s files in `out`, with `card` as its fastresp_card.json
    (None: no card)."""
    out.mkdir(parents=True)
    for item in adapter.iterdir():
        if item.is_file() and item.name != "fastresp_card.json":
            shutil.copyfile(item, out / item.name)
    if card is not None:
        (out / "fastresp_card.json").write_text(json.dumps(card))
    return out


def published(store: Path) -> PublishedFile:
    """The store's published.json, parsed with the store's own schema."""
    return PublishedFile.model_validate_json((store / PUBLISHED_FILE).read_text())


def publish_cli(
    adapter: Path, personality: str, *options: str, env: Mapping[str, str | None] | None = None
) -> Result:
    return runner.invoke(
        cli,
        ["adapters", "publish", str(adapter), "--personality", personality, *options],
        env={TOKEN_ENV: None, **(env or {})},
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("manifest") / "p.yaml", ("p1", "p2"))


@pytest.fixture
def publish_to(tiny_model_dir: Path, manifest: Path, tmp_path: Path) -> Callable[..., Any]:
    """publish_adapter with the tiny model, the test manifest and `tmp_path/store`."""

    def run(adapter: Path, personality: str = "p1", **kwargs: Any) -> Any:
        values: dict[str, Any] = {
            "store": tmp_path / "store",
            "base_model_dir": tiny_model_dir,
            "personalities_file": manifest,
            "max_lora_rank": 16,
        }
        values.update(kwargs)
        return publish_adapter(adapter, personality, **values)

    return run


# --- checks before anything is written ------------------------------------------------------

#: case -> (the expected text naming the refused field in the CLI's error).
REFUSALS = {
    "wrong_base_model_name": "card.base_model.name",
    "wrong_config_sha256": "card.base_model.config_sha256",
    "missing_card": "error: card:",
    "card_without_base_model": "card.base_model:",
    "card_for_another_personality": "card.personality",
    "unknown_personality": "--personality: 'nobody' is not in",
    "rank_over_limit": "adapter.rank_over_limit",
    "corrupt_weights": "adapter.weights_corrupt",
    "not_an_adapter_folder": "PATH:",
    "url_without_token": "--token-env: $PIKA_TEST_ADMIN_TOKEN is not set",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_adapter_names_the_field_and_writes_nothing(
    case: str,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    alpha = signature_adapters["alpha"]
    card = sft_card(tiny_model_dir)
    personality, extra, env = "p1", list[str](), dict[str, str]()
    if case == "wrong_base_model_name":
        card["base_model"]["name"] = "gemma-3-270m"
    elif case == "wrong_config_sha256":
        card["base_model"]["config_sha256"] = "0" * 64
    elif case == "card_without_base_model":
        del card["base_model"]
    elif case == "card_for_another_personality":
        card["personality"] = "p2"
    elif case == "unknown_personality":
        card["personality"] = None
        personality = "nobody"
    elif case == "rank_over_limit":
        alpha = signature_adapters["delta16"]  # rank 16
        env["FASTRESP_MAX_LORA_RANK"] = "8"
    elif case == "url_without_token":
        extra = ["--url", "http://127.0.0.1:9", "--token-env", TOKEN_ENV]
    adapter = with_card(alpha, tmp_path / "adapter", None if case == "missing_card" else card)
    if case == "corrupt_weights":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "not_an_adapter_folder":
        (adapter / "adapter_config.json").unlink()
    store = tmp_path / "store"
    result = publish_cli(
        adapter,
        personality,
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--personalities-file",
        str(manifest),
        *extra,
        env=env,
    )
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert REFUSALS[case] in result.stderr, result.stderr
    assert "nothing was published" in result.stderr or case == "url_without_token"
    assert not store.exists()


def test_the_function_raises_publish_error_with_the_field(
    publish_to: Callable[..., Any],
    tiny_model_dir: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    card = sft_card(tiny_model_dir, config_sha256="f" * 64)
    adapter = with_card(signature_adapters["alpha"], tmp_path / "a", card)
    with pytest.raises(PublishError) as refused:
        publish_to(adapter)
    assert refused.value.field == "card.base_model.config_sha256"
    assert not (tmp_path / "store").exists()


# --- versions ---------------------------------------------------------------------------


def test_versions_are_assigned_in_order_and_recorded(
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    options = ["--store", str(store), "--model", str(tiny_model_dir)]
    options += ["--personalities-file", str(manifest)]
    alpha = with_card(signature_adapters["alpha"], tmp_path / "alpha", sft_card(tiny_model_dir))
    beta = with_card(signature_adapters["beta"], tmp_path / "beta", sft_card(tiny_model_dir))

    first = publish_cli(alpha, "p1", *options)
    assert first.exit_code == 0, first.stderr
    assert "published p1 v1" in first.stdout
    assert "next start" in first.stdout
    second = publish_cli(beta, "p1", *options)
    assert second.exit_code == 0, second.stderr
    assert "published p1 v2" in second.stdout and "(was v1)" in second.stdout
    other = publish_cli(
        with_card(alpha, tmp_path / "a2", sft_card(tiny_model_dir, "p2")), "p2", *options
    )
    assert other.exit_code == 0, other.stderr
    assert "published p2 v1" in other.stdout  # versions count per personality

    record = published(store)
    p1 = record.personalities["p1"]
    assert [v.version for v in p1.versions] == ["v1", "v2"]
    assert p1.active == "v2"
    assert p1.versions[0].source == str(alpha.absolute())
    card_bytes = (beta / "fastresp_card.json").read_bytes()
    assert p1.versions[1].card_sha256 == hashlib.sha256(card_bytes).hexdigest()
    copy = store / "p1" / "v2"
    assert p1.versions[1].path == "p1/v2"
    copied_card = json.loads((copy / "fastresp_card.json").read_text())
    assert copied_card == {**sft_card(tiny_model_dir), "version": "v2"}
    weights = "adapter_model.safetensors"
    assert (copy / weights).read_bytes() == (signature_adapters["beta"] / weights).read_bytes()
    # An immutable copy: changing the source afterwards changes nothing in the store.
    (beta / weights).write_bytes(b"overwritten")
    assert (copy / weights).read_bytes() == (signature_adapters["beta"] / weights).read_bytes()
    assert not [p.name for p in store.iterdir() if p.name.startswith(".incoming")]

    listed = runner.invoke(cli, ["adapters", "list", "--store", str(store)])
    assert listed.exit_code == 0, listed.output
    rows = [line.split("\t")[:3] for line in listed.stdout.splitlines()[1:]]
    assert rows == [["p1", "v1", "-"], ["p1", "v2", "active"], ["p2", "v1", "active"]]


def test_concurrent_publishes_take_distinct_versions(
    publish_to: Callable[..., Any],
    tiny_model_dir: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    adapter = with_card(signature_adapters["alpha"], tmp_path / "a", sft_card(tiny_model_dir))
    start = threading.Barrier(8)
    versions: list[str] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            start.wait()
            versions.append(publish_to(adapter).version)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    expected = [f"v{i}" for i in range(1, 9)]
    assert sorted(versions, key=lambda v: int(v[1:])) == expected
    entry = published(tmp_path / "store").personalities["p1"]
    assert sorted((v.version for v in entry.versions), key=lambda v: int(v[1:])) == expected
    assert sorted(p.name for p in (tmp_path / "store" / "p1").iterdir()) == sorted(expected)


def test_hot_load_retries_5xx_and_connection_errors_but_not_4xx(tmp_path: Path) -> None:
    seen: list[int] = []
    answers = [503, 502, 200]

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append(len(seen))
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        status = answers[len(seen) - 1]
        body: dict[str, Any] = {"active": {"version": "v3"}} if status == 200 else {"detail": []}
        return httpx.Response(status, json=body)

    answer = hot_load(
        "http://svc", TOKEN, "p1", tmp_path, "v3", transport=httpx.MockTransport(flaky)
    )
    assert answer["active"]["version"] == "v3"
    assert len(seen) == 3

    refused: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        refused.append(request)
        detail = [{"loc": ["body", "path"], "msg": "no", "type": "rank_over_limit"}]
        return httpx.Response(422, json={"detail": detail})

    with pytest.raises(httpx.HTTPStatusError):
        hot_load("http://svc", TOKEN, "p1", tmp_path, "v3", transport=httpx.MockTransport(refuse))
    assert len(refused) == 1

    dials: list[int] = []

    def down(request: httpx.Request) -> httpx.Response:
        dials.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(httpx.ConnectError):
        hot_load("http://svc", TOKEN, "p1", tmp_path, "v3", transport=httpx.MockTransport(down))
    assert len(dials) == 4


def test_a_refused_hot_load_keeps_the_active_version_and_its_number_is_not_reused(
    publish_to: Callable[..., Any],
    tiny_model_dir: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    adapter = with_card(signature_adapters["alpha"], tmp_path / "a", sft_card(tiny_model_dir))
    bodies: list[dict[str, Any]] = []

    def accept(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"active": {}})

    def refuse(request: httpx.Request) -> httpx.Response:
        detail = [{"loc": ["body", "path"], "msg": "too big", "type": "rank_over_limit"}]
        return httpx.Response(422, json={"detail": detail})

    assert publish_to(adapter).version == "v1"
    loaded = publish_to(
        adapter, service_url="http://svc", admin_token=TOKEN, transport=httpx.MockTransport(accept)
    )
    assert (loaded.version, loaded.hot_loaded, loaded.previous_version) == ("v2", True, "v1")
    store = (tmp_path / "store").absolute()
    assert bodies == [{"path": str(store / "p1" / "v2"), "version": "v2"}]
    with pytest.raises(HotLoadError) as failed:
        publish_to(
            adapter,
            service_url="http://svc",
            admin_token=TOKEN,
            transport=httpx.MockTransport(refuse),
        )
    assert (failed.value.version, failed.value.status_code) == ("v3", 422)
    assert "rank_over_limit: too big" in failed.value.message
    entry = published(store).personalities["p1"]
    assert entry.active == "v2"
    assert entry.versions[2].load_error == "HTTP 422 rank_over_limit: too big"
    assert publish_to(adapter).version == "v4"
    assert published(store).personalities["p1"].active == "v4"


def test_publish_into_a_corrupt_store_exits_2_naming_the_file(
    tiny_model_dir: Path, manifest: Path, signature_adapters: dict[str, Path], tmp_path: Path
) -> None:
    adapter = with_card(signature_adapters["alpha"], tmp_path / "adapter", sft_card(tiny_model_dir))
    store = tmp_path / "store"
    store.mkdir()
    file = store / PUBLISHED_FILE
    file.write_text('{"format": 1, "personalities": {')
    result = publish_cli(
        adapter,
        "p1",
        "--store",
        str(store),
        "--model",
        str(tiny_model_dir),
        "--personalities-file",
        str(manifest),
    )
    assert result.exit_code == 2, result.output
    assert str(file) in result.stderr and "nothing was published" in result.stderr
    assert "Traceback" not in result.output
    # no version folder and no partial copy: only the file and the store's lock file
    assert {p.name for p in store.iterdir()} <= {PUBLISHED_FILE, ".publish.lock"}
    assert file.read_text() == '{"format": 1, "personalities": {'


# --- the gateway reading the store ----------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_corrupt_published_json_fails_startup_naming_the_file(
    tiny_model_dir: Path, manifest: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    file = store / PUBLISHED_FILE
    settings = engine_settings(tiny_model_dir, personalities_file=manifest, adapter_store=store)
    bad_active = {"format": 1, "personalities": {"p1": {"active": "v9", "versions": []}}}
    for content, field in (("{not json", "json"), (json.dumps(bad_active), "personalities.p1")):
        file.write_text(content)
        # No engine is passed: the lifespan must fail before it would start one.
        app = create_app(settings)
        with pytest.raises(PublishedStoreError) as failed:
            async with app.router.lifespan_context(app):
                pass
        assert str(file) in str(failed.value) and field in str(failed.value)
        listed = runner.invoke(cli, ["adapters", "list", "--store", str(store)])
        assert listed.exit_code == 2
        assert str(file) in listed.stderr


def gateway_settings(model: Path, manifest: Path, store: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "personalities_file": manifest,
        "admin_token": TOKEN,
        "warm_up": False,
        "adapter_store": store,
    }
    values.update(overrides)
    return engine_settings(model, **values)


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_publish_hot_loads_into_a_live_gateway_and_rolls_back_a_refused_one(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    options = ["--store", str(store), "--model", str(tiny_model_dir)]
    options += ["--personalities-file", str(manifest), "--token-env", TOKEN_ENV]
    card = sft_card(tiny_model_dir)
    alpha = with_card(signature_adapters["alpha"], tmp_path / "alpha", card)
    beta = with_card(signature_adapters["beta"], tmp_path / "beta", card)
    delta16 = with_card(signature_adapters["delta16"], tmp_path / "delta16", card)

    # A: published while no gateway runs; the gateway then starts on it.
    first = publish_cli(alpha, "p1", *options)
    assert first.exit_code == 0, first.stderr
    # The gateway allows rank 8 only; the publisher's default limit is 16.
    settings = gateway_settings(tiny_model_dir, manifest, store, max_lora_rank=8)
    async with live_gateway(settings, engine) as url, httpx.AsyncClient(base_url=url) as client:
        answer = await ask(client, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("v1", SIGNATURES["alpha"])

        # B with --url: served by the next request, no restart.
        env = {TOKEN_ENV: TOKEN}
        second = await asyncio.to_thread(publish_cli, beta, "p1", *options, "--url", url, env=env)
        assert second.exit_code == 0, second.stderr
        assert f"published p1 v2 at {store.absolute() / 'p1' / 'v2'}" in second.stdout
        assert "serves it now (was v1)" in second.stdout
        answer = await ask(client, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("v2", SIGNATURES["beta"])
        assert published(store).personalities["p1"].active == "v2"

        # A rank-16 adapter passes the publisher's checks; the gateway refuses it.
        third = await asyncio.to_thread(publish_cli, delta16, "p1", *options, "--url", url, env=env)
        assert third.exit_code == 1, (third.stdout, third.stderr)
        assert "did not load p1 v3: HTTP 422 rank_over_limit" in third.stderr
        assert "keeps serving its current version" in third.stderr
        answer = await ask(client, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("v2", SIGNATURES["beta"])
        listed = (await client.get("/admin/adapters", headers=AUTH)).json()
        assert listed["personalities"]["p1"]["version"] == "v2"
        entry = published(store).personalities["p1"]
        assert entry.active == "v2"
        assert [v.version for v in entry.versions] == ["v1", "v2", "v3"]
        assert entry.versions[2].load_error is not None
        assert "rank_over_limit" in entry.versions[2].load_error
        assert TOKEN not in third.stdout + third.stderr

    # A restart reads the store: the active version, not the refused one.
    async with serve(settings, engine) as restarted:
        answer = await ask(restarted, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("v2", SIGNATURES["beta"])
        assert (await ask(restarted, "p2"))["adapter_version"] is None


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_published_beats_the_manifest_and_a_live_redis_record_beats_both(
    engine: Engine,
    tiny_model_dir: Path,
    signature_adapters: dict[str, Path],
    redis_url: str,
    publish_to: Callable[..., Any],
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path / "p.yaml", ("p1",))
    text = manifest.read_text().replace(
        "fallback_phrases", f"adapter: {signature_adapters['gamma']}\n    fallback_phrases"
    )
    manifest.write_text(text)
    store = tmp_path / "store"
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = gateway_settings(
        tiny_model_dir, manifest, store, redis_url=redis_url, redis_key_prefix=prefix
    )
    async with serve(settings, engine) as gateway:
        assert (await ask(gateway, "p1"))["fast_response"] == SIGNATURES["gamma"]  # manifest

    alpha = with_card(signature_adapters["alpha"], tmp_path / "alpha", sft_card(tiny_model_dir))
    assert publish_to(alpha, personalities_file=manifest).version == "v1"
    async with serve(settings, engine) as gateway:
        answer = await ask(gateway, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("v1", SIGNATURES["alpha"])
        # A live swap through the admin API goes into the shared registry (Redis).
        swapped = await put_adapter(gateway, "p1", signature_adapters["beta"], "live")
        assert swapped.status_code == 200, swapped.text

    assert publish_to(alpha, personalities_file=manifest).version == "v2"
    async with serve(settings, engine) as gateway:
        answer = await ask(gateway, "p1")
        assert (answer["adapter_version"], answer["fast_response"]) == ("live", SIGNATURES["beta"])


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_a_missing_published_folder_fails_startup_naming_the_version(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    publish_to: Callable[..., Any],
    tmp_path: Path,
) -> None:
    alpha = with_card(signature_adapters["alpha"], tmp_path / "alpha", sft_card(tiny_model_dir))
    result = publish_to(alpha)
    shutil.rmtree(result.path)
    settings = gateway_settings(tiny_model_dir, manifest, tmp_path / "store")
    with pytest.raises(AdapterRejected) as failed:
        async with serve(settings, engine):
            pass
    message = str(failed.value)
    assert "personality 'p1' in published version v1 in" in message
    assert str((tmp_path / "store").absolute() / PUBLISHED_FILE) in message
    assert failed.value.error_type == "adapter_not_found"


def adapters_cli(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return runner.invoke(cli, ["adapters", *args], env={TOKEN_ENV: None, **(env or {})})


async def versions_heard(client: httpx.AsyncClient, sessions: int = 60) -> set[str | None]:
    """The adapter versions that answer p1 over `sessions` sessions (text checked)."""
    heard = set()
    for i in range(sessions):
        response = await client.post(
            "/fast-response", json={"personality": "p1", "session_id": f"s{i}", **TURN}
        )
        body = response.json()
        assert response.status_code == 200 and body["source"] == "model", body
        heard.add(body["adapter_version"])
    return heard


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_canary_rollback_and_promote_from_the_cli_against_a_live_gateway(
    engine: Engine,
    tiny_model_dir: Path,
    manifest: Path,
    signature_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    options = ["--store", str(store), "--model", str(tiny_model_dir)]
    options += ["--personalities-file", str(manifest), "--token-env", TOKEN_ENV]
    card = sft_card(tiny_model_dir)
    alpha = with_card(signature_adapters["alpha"], tmp_path / "alpha", card)
    assert publish_cli(alpha, "p1", *options).exit_code == 0  # v1, active
    beta = with_card(signature_adapters["beta"], tmp_path / "beta", card)
    recorded = publish_cli(beta, "p1", *options, "--no-activate")  # v2, recorded only
    assert recorded.exit_code == 0, recorded.stderr
    assert "recorded, not active: try it with `fastresp adapters canary p1" in recorded.stdout
    assert published(store).personalities["p1"].active == "v1"
    assert mark_active(store, "p1", tmp_path / "alpha") is None  # not a store folder
    settings = gateway_settings(tiny_model_dir, manifest, store, deadline_ms=30_000)
    env = {TOKEN_ENV: TOKEN}
    async with live_gateway(settings, engine) as url, httpx.AsyncClient(base_url=url) as client:
        assert await versions_heard(client) == {"v1"}
        common = ["--url", url, "--token-env", TOKEN_ENV]

        unknown = adapters_cli("canary", "p1", "--version", "v9", "--store", str(store), *common)
        assert unknown.exit_code == 2 and "--version" in unknown.stderr, unknown.stderr
        assert "published: v1, v2" in unknown.stderr
        no_token = adapters_cli("canary", "p1", "--version", "v2", "--store", str(store), *common)
        assert no_token.exit_code == 2 and "--token-env" in no_token.stderr
        early = await asyncio.to_thread(adapters_cli, "promote", "p1", *common, env=env)
        assert early.exit_code == 1 and "409 canary_conflict" in early.stderr, early.stderr

        started = await asyncio.to_thread(
            adapters_cli,
            "canary", "p1", "--version", "v2", "--weight", "50", "--store", str(store), *common,
            env=env,
        )  # fmt: skip
        assert started.exit_code == 0, started.stderr
        assert "p1: canary v2 serves 50% of sessions; v1 serves the rest" in started.stdout
        assert await versions_heard(client) == {"v1", "v2"}

        rolled = await asyncio.to_thread(adapters_cli, "rollback", "p1", *common, env=env)
        assert rolled.exit_code == 0, rolled.stderr
        assert "canary v2 rolled back; v1 serves every new request" in rolled.stdout
        assert await versions_heard(client) == {"v1"}

        args = ("canary", "p1", "--version", "v2", "--weight", "20", "--store", str(store))
        assert (await asyncio.to_thread(adapters_cli, *args, *common, env=env)).exit_code == 0
        promoted = await asyncio.to_thread(
            adapters_cli, "promote", "p1", "--store", str(store), *common, env=env
        )
        assert promoted.exit_code == 0, promoted.stderr
        assert "p1: v2 is the stable version for every session" in promoted.stdout
        assert f"p1: recorded v2 as the active version in {store.absolute()}" in promoted.stdout
        assert await versions_heard(client) == {"v2"}
        assert published(store).personalities["p1"].active == "v2"
        assert TOKEN not in started.stdout + started.stderr + promoted.stdout + promoted.stderr

        # A promote whose store cannot be updated says so, after the gateway promoted.
        args = ("canary", "p1", "--version", "v1", "--weight", "20", "--store", str(store))
        assert (await asyncio.to_thread(adapters_cli, *args, *common, env=env)).exit_code == 0
        broken = tmp_path / "broken-store"
        broken.mkdir()
        (broken / PUBLISHED_FILE).write_text("{")
        half = await asyncio.to_thread(
            adapters_cli, "promote", "p1", "--store", str(broken), *common, env=env
        )
        assert half.exit_code == 1, (half.stdout, half.stderr)
        assert "p1: v1 is the stable version for every session" in half.stdout
        assert f"the store {broken} was not updated" in half.stderr
        assert await versions_heard(client) == {"v1"}
