"""`fastresp adapters ...`: publish trained adapters and list the published versions.

The work happens in adapters/publish.py (publishing) and service/adapter_store.py
(the store's format); this module parses options and prints. Defaults come from the
same `FASTRESP_*` settings the gateway reads, so a publish on the serving machine
needs no options besides the adapter and the personality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli_common import fail, load_settings, progress

app = typer.Typer(
    rich_markup_mode=None,
    help="Published adapters: give a trained adapter its next version, record it in the "
    "published-adapter store the gateway reads at startup, and hot-load it into a "
    "running gateway.",
    no_args_is_help=True,
)

#: CLI spelling of the fields `PublishError` names (card fields are printed as they are).
_OPTION_OF_FIELD = {
    "path": "PATH",
    "personality": "--personality",
    "personalities_file": "--personalities-file",
    "model": "--model",
    "url": "--url",
    "admin_token": "--token-env",
    "activate": "--no-activate",
}


StoreOption = Annotated[
    Path | None,
    typer.Option(
        help="Published-adapter store folder. Default: $FASTRESP_ADAPTER_STORE, else "
        "<cache dir>/adapters (~/.cache/pika-fastresp/adapters)."
    ),
]


@app.command()
def publish(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="The trained PEFT adapter folder, with its fastresp_card.json.",
            show_default=False,
        ),
    ],
    personality: Annotated[
        str, typer.Option(help="The manifest personality the adapter serves.", show_default=False)
    ],
    url: Annotated[
        str | None,
        typer.Option(
            help="Base URL of a running gateway (e.g. http://127.0.0.1:8000): hot-load the "
            "new version through its admin API. Without it the version is only recorded, "
            "and the gateway serves it from its next start."
        ),
    ] = None,
    token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the gateway's admin token (used with --url; "
            "the token itself is never a command-line value)."
        ),
    ] = "FASTRESP_ADMIN_TOKEN",
    store: StoreOption = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="The base model the gateway serves. Default: $FASTRESP_MODEL, else the "
            "prepared gemma-3-270m."
        ),
    ] = None,
    personalities_file: Annotated[
        Path | None,
        typer.Option(
            help="Personality manifest. Default: $FASTRESP_PERSONALITIES_FILE, else "
            "adapters/personalities.yaml."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds one hot-load attempt may take.")
    ] = 120.0,
    activate: Annotated[
        bool,
        typer.Option(
            help="--no-activate: record the version only; the gateway keeps serving its "
            "version, also after a restart. For a canary: then `fastresp adapters canary "
            "NAME --version VN`. Not with --url."
        ),
    ] = True,
) -> None:
    """Publish an adapter as the personality's next version (v1, v2, ...).

    Checks first, writing nothing when one fails: the card's base model (name, and the
    sha256 of config.json when the card has one) is the served base model, the card's
    personality (if any) is --personality, the personality is in the manifest, and the
    adapter passes the gateway's own checks (rank up to FASTRESP_MAX_LORA_RANK, target
    modules, shapes, finite weights). Then the adapter is copied into the store under
    its version and recorded in the store's published.json.

    Without --url the new version is made active in the store: the gateway loads it
    at its next start. (With a shared registry, FASTRESP_REDIS_URL, a version swapped
    in through the admin API since is the fleet's live choice and still wins at a
    restart: publish with --url to change a running fleet.) With --url it is
    hot-loaded first and made active only when the gateway accepted it; a refused
    version stays recorded with the gateway's error, not active, and the gateway keeps
    serving its current version.

    Exit codes: 0 published (and hot-loaded with --url); 1 the gateway did not load it,
    or the store could not be written; 2 refused (the message names the field).
    """
    from adapters.publish import HotLoadError, PublishError, publish_adapter
    from service.adapter_store import PublishedStoreError

    settings = load_settings(
        model=model, adapter_store=store, personalities_file=personalities_file
    )
    token: str | None = None
    if url is not None:
        token = os.environ.get(token_env) or None
        if token is None:
            fail(f"--token-env: ${token_env} is not set; --url needs the gateway's admin token")
    try:
        result = publish_adapter(
            path,
            personality,
            store=settings.resolved_adapter_store(),
            base_model_dir=settings.resolved_model(),
            personalities_file=settings.personalities_file,
            max_lora_rank=settings.max_lora_rank,
            service_url=url,
            admin_token=token,
            timeout_s=timeout,
            progress=progress,
            activate=activate,
        )
    except PublishError as exc:
        where = _OPTION_OF_FIELD.get(exc.field, exc.field)
        fail(f"{where}: {exc.message}; nothing was published")
        raise  # unreachable; keeps type checkers happy
    except HotLoadError as exc:
        fail(
            f"the gateway at {url} did not load {personality} {exc.version}: "
            f"{exc.message.rstrip('.')}. "
            f"{exc.version} is recorded in the store but not active; the gateway keeps "
            "serving its current version",
            code=1,
        )
        raise
    except PublishedStoreError as exc:
        fail(f"{exc}; nothing was published")
        raise
    except OSError as exc:
        fail(f"cannot write the store {settings.resolved_adapter_store()}: {exc}", code=1)
        raise
    before = f" (was {result.previous_version})" if result.previous_version else ""
    if not activate:
        typer.echo(
            f"published {personality} {result.version} at {result.path}; recorded, not "
            f"active: try it with `fastresp adapters canary {personality} --version "
            f"{result.version} --weight 10`"
        )
    elif result.hot_loaded:
        typer.echo(
            f"published {personality} {result.version} at {result.path}; "
            f"the gateway at {url} serves it now{before}"
        )
    else:
        typer.echo(
            f"published {personality} {result.version} at {result.path}; active in the "
            f"store{before}: the gateway serves it from its next start (or publish with "
            "--url to hot-load it now)"
        )


@app.command(name="list")
def list_versions(
    store: StoreOption = None,
    personality: Annotated[
        str | None, typer.Option(help="Only this personality. Default: all.")
    ] = None,
) -> None:
    """List the published versions: one line each, with the active one marked and
    the gateway's error for a version it refused.

    Columns: personality, version, state (active, -, or load failed), published (UTC),
    source folder. Exit code 2 when the store's published.json is invalid.
    """
    from service.adapter_store import PUBLISHED_FILE, PublishedStoreError, read_published

    root = (store if store is not None else load_settings().resolved_adapter_store()).absolute()
    try:
        published = read_published(root)
    except PublishedStoreError as exc:
        fail(f"--store: {exc}")
        raise
    names = [personality] if personality else list(published.personalities)
    lines = []
    for name in names:
        entry = published.personalities.get(name)
        if entry is None:
            continue
        for version in entry.versions:
            state = "active" if version.version == entry.active else "-"
            if version.load_error:
                state = f"load failed ({version.load_error})"
            lines.append(
                f"{name}\t{version.version}\t{state}\t{version.published_utc}\t{version.source}"
            )
    if not lines:
        which = f" for {personality!r}" if personality else ""
        typer.echo(f"no published adapters{which} in {root / PUBLISHED_FILE}")
        return
    typer.echo("personality\tversion\tstate\tpublished\tsource")
    for line in lines:
        typer.echo(line)


# -- canary rollout (admin API of a running gateway) -----------------------------------

UrlOption = Annotated[
    str,
    typer.Option(
        envvar="FASTRESP_URL",
        help="Base URL of the running gateway whose admin API is called ($FASTRESP_URL).",
    ),
]
TokenEnvOption = Annotated[
    str,
    typer.Option(
        help="Environment variable holding the gateway's admin token (the token itself is "
        "never a command-line value)."
    ),
]
NameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="The personality.", show_default=False)
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _admin(
    url: str,
    token_env: str,
    method: str,
    name: str,
    suffix: str,
    body: dict[str, object] | None = None,
    *,
    retry_server_errors: bool = True,
) -> dict[str, Any]:
    """Call the gateway's admin API; exits 1 with the gateway's answer when it refuses
    or cannot be reached, 2 when the token variable is unset."""
    import httpx

    from adapters.publish import _service_error, admin_request, personality_route

    token = os.environ.get(token_env) or None
    if token is None:
        fail(f"--token-env: ${token_env} is not set; the admin API needs the gateway's token")
    try:
        return admin_request(
            url,
            token,
            method,
            personality_route(name, suffix),
            body,
            retry_server_errors=retry_server_errors,
            progress=progress,
        )
    except httpx.HTTPStatusError as exc:
        fail(f"the gateway at {url} refused: {_service_error(exc.response)}", code=1)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {url}: {type(exc).__name__}: {exc}", code=1)


def _version_of(adapter: dict[str, Any] | None) -> str:
    return "the base model" if adapter is None else str(adapter["version"])


@app.command()
def canary(
    name: NameArgument,
    version: Annotated[
        str,
        typer.Option(
            help="The published version to try (as `fastresp adapters list` shows it, e.g. v3).",
            show_default=False,
        ),
    ],
    weight: Annotated[
        float,
        typer.Option(
            help="Percent of NAME's sessions, above 0 and below 100, that get the canary; "
            "the rest keep the stable version. A session keeps its version while the weight "
            "stays (a hash of session id and personality decides); run again with another "
            "weight to change it.",
        ),
    ] = 10.0,
    url: UrlOption = DEFAULT_URL,
    token_env: TokenEnvOption = "FASTRESP_ADMIN_TOKEN",
    store: StoreOption = None,
) -> None:
    """Serve a published version to WEIGHT percent of NAME's sessions beside its stable
    version, through the running gateway's admin API.

    Watch the Grafana rows "Canary rollout" (latency, fallback ratio and share per adapter
    version) and "Satisfaction", then `fastresp adapters promote NAME` or
    `fastresp adapters rollback NAME`.
    While a canary runs the gateway refuses a plain swap of NAME (publish --url).

    Exit codes: 0 the canary serves; 1 the gateway refused it or cannot be reached (it
    keeps serving what it served); 2 bad options (an unknown version, no token).
    """
    from service.adapter_store import PublishedStoreError, read_published

    if not 0 < weight < 100:
        fail(f"--weight: {weight:g} is not above 0 and below 100")
    root = (store if store is not None else load_settings().resolved_adapter_store()).absolute()
    try:
        entry = read_published(root).personalities.get(name)
    except PublishedStoreError as exc:
        fail(f"--store: {exc}")
    published = entry.get(version) if entry is not None else None
    if entry is None or published is None:
        known = ", ".join(v.version for v in entry.versions) if entry else "none"
        fail(
            f"--version: {name} has no published version {version!r} in {root} (published: {known})"
        )
    answer = _admin(
        url,
        token_env,
        "PUT",
        name,
        "canary",
        {"path": str(root / published.path), "version": version, "weight": weight},
    )
    typer.echo(
        f"{name}: canary {version} serves {weight:g}% of sessions; "
        f"{_version_of(answer.get('active'))} serves the rest"
    )


@app.command()
def promote(
    name: NameArgument,
    url: UrlOption = DEFAULT_URL,
    token_env: TokenEnvOption = "FASTRESP_ADMIN_TOKEN",
    store: StoreOption = None,
) -> None:
    """Make NAME's canary its stable version for every session, and record it as the
    store's active version so the gateway serves it after a restart too.

    Exit codes: 0 promoted; 1 the gateway refused (e.g. no canary runs: HTTP 409) or
    cannot be reached; 2 bad options.
    """
    from adapters.publish import mark_active
    from service.adapter_store import PublishedStoreError

    answer = _admin(url, token_env, "POST", name, "canary/promote", retry_server_errors=False)
    version, path = _version_of(answer["active"]), Path(answer["active"]["path"])
    typer.echo(f"{name}: {version} is the stable version for every session")
    root = (store if store is not None else load_settings().resolved_adapter_store()).absolute()
    restart = "a gateway restarted without Redis serves the store's previous active version"
    try:
        recorded = mark_active(root, name, path)
    except (PublishedStoreError, OSError) as exc:
        fail(f"the store {root} was not updated ({exc}); {restart}", code=1)
    if recorded is not None:
        typer.echo(f"{name}: recorded {recorded} as the active version in {root}")
    else:
        progress(f"note: {path} is not a published version of {name} in {root}; {restart}")


@app.command()
def rollback(
    name: NameArgument,
    url: UrlOption = DEFAULT_URL,
    token_env: TokenEnvOption = "FASTRESP_ADMIN_TOKEN",
) -> None:
    """Drop NAME's canary: every request admitted from now on gets the stable version
    (requests already running on the canary finish on it).

    Exit codes: 0 rolled back; 1 the gateway refused (e.g. no canary runs: HTTP 409) or
    cannot be reached; 2 bad options.
    """
    answer = _admin(url, token_env, "POST", name, "canary/rollback", retry_server_errors=False)
    typer.echo(
        f"{name}: canary {_version_of(answer['rolled_back'])} rolled back; "
        f"{_version_of(answer.get('active'))} serves every new request"
    )
