"""Publish a trained adapter: check it, give it the next version, record it, and
hot-load it into a running service.

`publish_adapter` is what `fastresp adapters publish` runs. In order:

1. **Checks, before anything is written.** The adapter folder holds
   `adapter_config.json` and a `fastresp_card.json` whose `base_model` names the base
   model (`name`, and `config_sha256` when the card has one, against the sha256 of
   the model's `config.json`); the card's `personality`, when set, is the one
   published; the personality is in the manifest; the adapter passes the service's
   own checks (`service.adapter_validation.validate_adapter`: rank limit, target
   modules, tensor shapes, finite weights) against that base model. Each refusal is
   a `PublishError` naming the field.
2. **Copy.** The adapter folder's files go to a partial folder inside the store,
   outside the lock (a copy may take seconds).
3. **Record, under the store's lock.** The next version `vN` is assigned (one more
   than any recorded or on disk, never reused), written into the copy's card, the
   copy renamed to `<personality>/vN` and `published.json` rewritten atomically
   (service/adapter_store.py). Without a service URL the new version is also made
   `active` here: the service loads it at its next start.
4. **Hot-load** (with a service URL and admin token): `PUT
   {url}/admin/personalities/{name}/adapter` `{"path", "version"}`, retried on
   connection errors and 5xx answers (not on 4xx: the service refused the adapter).
   On success the version becomes `active`. On failure it is NOT made active:
   `published.json` keeps it with its `load_error` (and its folder, for inspection),
   the service keeps serving what it served (the registry switches only after a
   successful load), and a `HotLoadError` names the service's answer.

Two publishes at once (threads or processes) take distinct versions: the version
is assigned and recorded under one `fcntl.flock`. When several hot-loads of one
personality race, the service serves the last one it loaded and the store's
`active` is the last one whose hot-load returned; they can differ only in that
race, and the next publish or restart settles it.

Imports only httpx, tenacity, pydantic and the service's validation code: no
torch at import time (validation imports safetensors/torch when it runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from service.adapter_store import (
    PUBLISHED_FILE,
    PublishedPersonality,
    PublishedVersion,
    read_published,
    store_lock,
    write_published,
)
from service.adapter_validation import (
    ADAPTER_CARD,
    ADAPTER_CONFIG,
    BaseModelInfo,
    validate_adapter,
)
from service.atomic_files import file_sha256, fsync_dir, fsync_file, write_synced
from service.errors import AdapterRejected
from service.personalities import ManifestError, load_personalities

#: Attempts of the hot-load PUT (the first and the retries).
HOT_LOAD_ATTEMPTS = 4
#: Longest wait between two attempts, in seconds (exponential from 0.5 s).
HOT_LOAD_BACKOFF_MAX_S = 4.0
#: Seconds one PUT may take: the service validates, loads and warms the adapter up
#: (about 0.1 s for the tiny model, seconds for a 4B model's rank-16 adapter).
DEFAULT_TIMEOUT_S = 120.0


class PublishError(ValueError):
    """The adapter (or a publish argument) was refused; nothing was written.

    Attributes:
        field: what was refused, e.g. `card.base_model.name`, `personality`,
            `adapter.rank_over_limit` (an `adapter.` field is a check of
            `service.adapter_validation`).
        message: why, for a person.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class HotLoadError(RuntimeError):
    """The running service did not load the published version.

    The version is recorded in the store with its `load_error`, and is not active.

    Attributes:
        version: the version that was published.
        path: its folder in the store.
        status_code: the service's HTTP status, None when it could not be reached.
        message: the service's error (its `detail` type and message), for a person.
    """

    def __init__(self, version: str, path: Path, status_code: int | None, message: str) -> None:
        super().__init__(message)
        self.version = version
        self.path = path
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A published version.

    Attributes:
        version: the assigned version, `v1`, `v2`, ...
        path: its folder in the store (absolute).
        hot_loaded: True when the running service loaded it (a service URL was given).
        previous_version: the store's active version before, None if there was none.
    """

    version: str
    path: Path
    hot_loaded: bool
    previous_version: str | None


def _read_card(adapter_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The adapter's card and its bytes. Raises PublishError naming the card field."""
    card_file = adapter_dir / ADAPTER_CARD
    try:
        raw = card_file.read_bytes()
    except FileNotFoundError:
        raise PublishError(
            "card",
            f"{adapter_dir} has no {ADAPTER_CARD}: publish adapters written by the SFT "
            "trainer, whose card names the base model",
        ) from None
    except OSError as exc:
        raise PublishError("card", f"cannot read {card_file}: {exc.strerror or exc}") from None
    try:
        card = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PublishError("card", f"{card_file} is not JSON: {exc}") from None
    if not isinstance(card, dict):
        raise PublishError("card", f"{card_file} is not a JSON object")
    return card, raw


def check_adapter(
    adapter_dir: Path,
    personality: str,
    *,
    base_model_dir: Path,
    personalities_file: Path,
    max_lora_rank: int,
) -> tuple[dict[str, Any], bytes]:
    """Every check of step 1 (module docstring); reads files only.

    Returns:
        (the card, its bytes).

    Raises:
        PublishError: a check failed; `field` names it.
    """
    if not adapter_dir.is_dir():
        raise PublishError("path", f"not an adapter folder: {adapter_dir}")
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise PublishError("path", f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter")
    card, raw = _read_card(adapter_dir)
    base_card = card.get("base_model")
    if not isinstance(base_card, dict):
        raise PublishError(
            "card.base_model", f"{adapter_dir / ADAPTER_CARD} does not name its base model"
        )
    card_personality = card.get("personality")
    if card_personality is not None and card_personality != personality:
        raise PublishError(
            "card.personality",
            f"the adapter was trained for personality {card_personality!r}, not {personality!r}",
        )
    try:
        manifest = load_personalities(personalities_file)
    except ManifestError as exc:
        raise PublishError("personalities_file", str(exc)) from None
    if personality not in manifest:
        raise PublishError(
            "personality",
            f"{personality!r} is not in {personalities_file}; known: {', '.join(manifest)}",
        )
    if not (base_model_dir / "config.json").is_file():
        raise PublishError("model", f"not a model folder (no config.json): {base_model_dir}")
    try:
        base = BaseModelInfo.from_dir(base_model_dir)
    except (OSError, ValueError) as exc:
        raise PublishError("model", f"cannot read the base model {base_model_dir}: {exc}") from None
    name = base_card.get("name")
    if not isinstance(name, str) or not base.matches(name):
        raise PublishError(
            "card.base_model.name",
            f"the adapter was trained on {name!r}, the base model is {base.display_name!r} "
            f"({base_model_dir})",
        )
    expected_sha = base_card.get("config_sha256")
    if expected_sha is not None:
        actual_sha = file_sha256(base_model_dir / "config.json")
        if expected_sha != actual_sha:
            raise PublishError(
                "card.base_model.config_sha256",
                f"the adapter was trained on a base model whose config.json has sha256 "
                f"{expected_sha}, {base_model_dir / 'config.json'} has {actual_sha}",
            )
    try:
        validate_adapter(adapter_dir.absolute(), base, max_lora_rank)
    except AdapterRejected as exc:
        raise PublishError(f"adapter.{exc.error_type}", exc.message) from None
    return card, raw


def _copy_files(source: Path, target: Path) -> None:
    """Copy `source`'s files (not its subfolders, e.g. trainer checkpoints) into the
    new folder `target`, each fsynced."""
    target.mkdir()
    for item in sorted(source.iterdir()):
        if not item.is_file():
            continue
        shutil.copyfile(item, target / item.name)
        fsync_file(target / item.name)


def _next_number(entry: PublishedPersonality, folder: Path) -> int:
    """One more than the largest version recorded or present on disk."""
    numbers = [v.number() for v in entry.versions]
    if folder.is_dir():
        numbers += [
            int(child.name[1:])
            for child in folder.iterdir()
            if child.name.startswith("v") and child.name[1:].isdigit()
        ]
    return max(numbers, default=0) + 1


def _record(
    store: Path,
    personality: str,
    partial: Path,
    card: dict[str, Any],
    card_sha: str,
    source: Path,
    activate: bool,
) -> tuple[str, Path, str | None]:
    """Step 3, under the lock: (version, its folder, the active version before)."""
    with store_lock(store):
        published = read_published(store)
        entry = published.personalities.setdefault(personality, PublishedPersonality())
        previous = entry.active
        folder = store / personality
        version = f"v{_next_number(entry, folder)}"
        final = folder / version
        card_file = partial / ADAPTER_CARD
        text = json.dumps({**card, "version": version}, indent=2) + "\n"
        write_synced(card_file, text.encode())
        folder.mkdir(exist_ok=True)
        partial.rename(final)  # fails, rather than merge, if the folder exists
        fsync_dir(folder)
        entry.versions.append(
            PublishedVersion(
                version=version,
                path=f"{personality}/{version}",
                published_utc=datetime.now(UTC).isoformat(timespec="seconds"),
                source=str(source),
                card_sha256=card_sha,
            )
        )
        if activate:
            entry.active = version
        write_published(store, published)
    return version, final, previous


def _settle(store: Path, personality: str, version: str, load_error: str | None) -> None:
    """After the hot-load: make `version` active, or record why the service refused it."""
    with store_lock(store):
        published = read_published(store)
        entry = published.personalities[personality]
        if load_error is None:
            entry.active = version
        else:
            entry.versions = [
                v.model_copy(update={"load_error": load_error}) if v.version == version else v
                for v in entry.versions
            ]
        write_published(store, published)


def _check_url(service_url: str) -> str:
    parts = urlsplit(service_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PublishError("url", f"not an http(s) URL like http://127.0.0.1:8000: {service_url!r}")
    return service_url.rstrip("/")


def _service_error(response: httpx.Response) -> str:
    """`HTTP 422 rank_over_limit: adapter rank 16 is over ...` from the service's answer."""
    try:
        detail = response.json()["detail"][0]
        return f"HTTP {response.status_code} {detail['type']}: {detail['msg']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


def _retryable(exc: BaseException) -> bool:
    """Connection failures and 5xx answers; never 4xx (the service refused the adapter)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500


def admin_request(
    service_url: str,
    admin_token: str,
    method: str,
    route: str,
    body: dict[str, Any] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retry_server_errors: bool = True,
    progress: Callable[[str], None] = lambda _: None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """One admin API call with the bearer token, retried on connection failures (and,
    with `retry_server_errors`, on 5xx answers; never on 4xx: the service refused it).

    Args:
        service_url: the gateway's base URL, e.g. `http://127.0.0.1:8000`.
        admin_token: its `FASTRESP_ADMIN_TOKEN`; sent as a bearer token, never logged.
        method, route: e.g. `PUT`, `/admin/personalities/calm/adapter`.
        body: the JSON body, if any.
        timeout_s: limit of one attempt, in seconds.
        retry_server_errors: False for a call that must not run twice (a promote a
            5xx may have applied anyway).
        progress: called with a line per retry.
        transport: an httpx transport to use instead of the network (tests).

    Returns:
        the service's JSON answer.

    Raises:
        httpx.HTTPStatusError: the service answered 4xx, or 5xx (after the retries).
        httpx.TransportError: it could not be reached (after the retries), or timed out.
    """
    from tenacity import (
        RetryCallState,
        Retrying,
        retry_if_exception,
        stop_after_attempt,
        wait_exponential,
    )

    def retryable(exc: BaseException) -> bool:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return True
        return retry_server_errors and _retryable(exc)

    def note(state: RetryCallState) -> None:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        reason = (
            _service_error(exc.response)
            if isinstance(exc, httpx.HTTPStatusError)
            else f"{type(exc).__name__}: {exc}"
        )
        progress(f"{method} {route}: attempt {state.attempt_number} failed ({reason}); retrying")

    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(timeout=timeout_s, transport=transport) as client:
        for attempt in Retrying(
            stop=stop_after_attempt(HOT_LOAD_ATTEMPTS),
            wait=wait_exponential(multiplier=0.5, max=HOT_LOAD_BACKOFF_MAX_S),
            retry=retry_if_exception(retryable),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                response = client.request(
                    method, f"{service_url.rstrip('/')}{route}", json=body, headers=headers
                )
                response.raise_for_status()
                answer: dict[str, Any] = response.json()
                return answer
    raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


def personality_route(personality: str, suffix: str) -> str:
    """`/admin/personalities/{personality}/{suffix}`, the name URL-quoted."""
    return f"/admin/personalities/{quote(personality, safe='')}/{suffix}"


def hot_load(
    service_url: str,
    admin_token: str,
    personality: str,
    path: Path,
    version: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[str], None] = lambda _: None,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """PUT the adapter into the running service, with retries (module docstring, step 4;
    `admin_request`).

    Returns:
        the service's answer: `{"active": {...}}` (`GET /admin/adapters` shape).

    Raises:
        httpx.HTTPStatusError: the service answered 4xx, or 5xx after the retries.
        httpx.TransportError: it could not be reached (after the retries), or timed out.
    """
    return admin_request(
        service_url,
        admin_token,
        "PUT",
        personality_route(personality, "adapter"),
        {"path": str(path), "version": version},
        timeout_s=timeout_s,
        progress=progress,
        transport=transport,
    )


def mark_active(store: Path, personality: str, adapter_path: Path) -> str | None:
    """Make the published version of `personality` whose folder is `adapter_path` the
    store's active one (the gateway loads it at its next start), e.g. after a canary
    promote. Matched by folder, not by label: a version label names a store folder only
    when the adapter was loaded from the store.

    Returns:
        that version, or None when no published version has that folder (nothing is
        written; also when the store has no published.json).

    Raises:
        PublishedStoreError: `published.json` is invalid. OSError: it cannot be written.
    """
    root = Path(os.path.abspath(store))
    if not (root / PUBLISHED_FILE).is_file():
        return None
    target = Path(os.path.normpath(adapter_path))
    with store_lock(root):
        published = read_published(root)
        entry = published.personalities.get(personality)
        versions = entry.versions if entry is not None else []
        match = next((v for v in versions if Path(os.path.normpath(root / v.path)) == target), None)
        if entry is None or match is None:
            return None
        entry.active = match.version
        write_published(root, published)
    return match.version


def publish_adapter(
    adapter_dir: Path,
    personality: str,
    *,
    store: Path,
    base_model_dir: Path,
    personalities_file: Path,
    max_lora_rank: int,
    service_url: str | None = None,
    admin_token: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[str], None] = lambda _: None,
    transport: httpx.BaseTransport | None = None,
    activate: bool = True,
) -> PublishResult:
    """Check, version, record and (with `service_url`) hot-load an adapter.

    Args:
        adapter_dir: the PEFT adapter folder with its `fastresp_card.json`.
        personality: the manifest personality it serves.
        store: the published-adapter store folder (created if needed).
        base_model_dir: the base model the service serves (for the card and shape checks).
        personalities_file: the manifest.
        max_lora_rank: the service's `max_lora_rank`.
        service_url: the running gateway's base URL; None: record only, the service
            loads the version at its next start.
        admin_token: the gateway's admin token; required with `service_url`.
        timeout_s: limit of one hot-load attempt, in seconds.
        progress: called with one line per step (the CLI prints them on stderr).
        transport: an httpx transport for the hot-load (tests).
        activate: False: record the version only, without making it active (for a
            canary, `fastresp adapters canary`); not with `service_url`.

    Returns:
        the published version (`hot_loaded` True when the service loaded it).

    Raises:
        PublishError: a check or argument was refused; nothing was written.
        HotLoadError: the version was recorded but the service did not load it; it is
            not active.
        OSError: the store could not be written; at most a partial folder (removed on
            the way out) or a version folder without a record is left.
    """
    url = _check_url(service_url) if service_url is not None else None
    if url is not None and not activate:
        raise PublishError("activate", "a hot-load (service URL) always makes the version active")
    if url is not None and not admin_token:
        raise PublishError("admin_token", "a service URL needs the service's admin token")
    progress(f"checking {adapter_dir} for personality {personality!r}")
    card, raw = check_adapter(
        adapter_dir,
        personality,
        base_model_dir=base_model_dir,
        personalities_file=personalities_file,
        max_lora_rank=max_lora_rank,
    )
    root = Path(os.path.abspath(store))
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".incoming-{uuid.uuid4().hex}"
    progress(f"copying into the store {root}")
    try:
        _copy_files(adapter_dir, partial)
        version, final, previous = _record(
            root,
            personality,
            partial,
            card,
            hashlib.sha256(raw).hexdigest(),
            adapter_dir.absolute(),
            activate=url is None and activate,
        )
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when it was renamed
    progress(f"recorded {personality} {version} at {final}")
    if url is None:
        return PublishResult(version, final, hot_loaded=False, previous_version=previous)

    assert admin_token is not None
    progress(f"hot-loading {version} into {url}")
    try:
        hot_load(
            url,
            admin_token,
            personality,
            final,
            version,
            timeout_s=timeout_s,
            progress=progress,
            transport=transport,
        )
    except httpx.HTTPStatusError as exc:
        message = _service_error(exc.response)
        _settle(root, personality, version, message)
        raise HotLoadError(version, final, exc.response.status_code, message) from exc
    except httpx.HTTPError as exc:
        message = f"{type(exc).__name__}: {str(exc) or 'no answer'}"
        if isinstance(exc, httpx.TimeoutException):
            message += " (the service may still load it: check GET /admin/adapters)"
        _settle(root, personality, version, message)
        raise HotLoadError(version, final, None, message) from exc
    _settle(root, personality, version, None)
    return PublishResult(version, final, hot_loaded=True, previous_version=previous)
